"""Typed model configurations and named presets.

Every field is a YAML key (``model.init_args.model.d_model`` and so on); the string under each field is
its documentation, shown by ``--help`` and ``--print_config=comments``.
"""

from __future__ import annotations

from pikv_train.errors import ConfigError

from dataclasses import asdict, dataclass, field, fields, replace

from pikv_train.routing.base import RouterConfig


@dataclass
class MoEConfig:
    """Mixture-of-Experts feed-forward settings (the PiKV student's FFN)."""

    n_experts: int = 4
    """Number of routed experts per layer."""
    d_expert: int = 128
    """Hidden width of each SwiGLU expert."""
    shared_expert: bool = False
    """Add an always-on SwiGLU expert of width d_expert beside the routed ones."""
    router: RouterConfig = field(default_factory=RouterConfig)
    """Router settings (which router, top-k, loss weights, capacity)."""


@dataclass
class ModelConfig:
    """Decoder architecture: pre-RMSNorm blocks, RoPE, grouped-query attention, SwiGLU or MoE FFN."""

    vocab_size: int = 258
    """Vocabulary size; must equal the tokenizer's (the byte tokenizer has 258)."""
    n_layer: int = 4
    """Number of decoder blocks."""
    n_head: int = 4
    """Query heads."""
    n_kv_head: int = 2
    """Key/value heads (grouped-query attention); must divide n_head."""
    d_model: int = 128
    """Residual stream width."""
    d_ff: int = 344
    """Hidden width of the dense SwiGLU FFN (ignored when moe is set)."""
    max_seq_len: int = 512
    """Longest sequence (prompt + generation) the model accepts."""
    rope_base: float = 10000.0
    """RoPE frequency base."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = True
    """Share the token embedding with the LM head."""
    moe: MoEConfig | None = None
    """MoE FFN settings; None gives a dense decoder (teachers)."""

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise ConfigError(f"d_model={self.d_model} must be divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if (self.d_model // self.n_head) % 2:
            raise ConfigError(f"head dim d_model/n_head={self.d_model // self.n_head} must be even for RoPE")
        if self.moe is not None and not 1 <= self.moe.router.top_k <= self.moe.n_experts:
            raise ConfigError(
                f"router top_k={self.moe.router.top_k} exceeds n_experts={self.moe.n_experts}; "
                "lower moe.router.top_k or raise moe.n_experts"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Rebuild from :meth:`to_dict` output (as stored in checkpoints)."""
        d = dict(d)
        moe = d.pop("moe", None)
        if isinstance(moe, dict):
            moe = dict(moe)
            router = moe.pop("router", None)
            moe = MoEConfig(**moe, router=RouterConfig(**router) if isinstance(router, dict) else (router or RouterConfig()))
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known}, moe=moe)

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        """A named size: see :data:`PRESETS`."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return replace(PRESETS[name](), **overrides)


PRESETS = {
    # Test-sized (a few thousand parameters).
    "nano": lambda: ModelConfig(n_layer=2, n_head=2, n_kv_head=1, d_model=32, d_ff=64, max_seq_len=64),
    "nano-moe": lambda: ModelConfig(
        n_layer=2, n_head=2, n_kv_head=1, d_model=32, max_seq_len=64, moe=MoEConfig(n_experts=4, d_expert=32)
    ),
    # CPU demo sizes. "student-moe" is the distillation student of recipes/distill.yaml
    # (configs/model/student_moe.yaml, 0.58 M parameters) and DistillationTask's default student.
    "student-moe": lambda: ModelConfig(
        n_layer=4, n_head=4, n_kv_head=2, d_model=96, max_seq_len=512,
        moe=MoEConfig(n_experts=4, d_expert=96, router=RouterConfig(name="topk_balanced", top_k=2,
                                                                    aux_loss_weight=0.01, z_loss_weight=0.001)),
    ),
    "tiny": lambda: ModelConfig(n_layer=4, n_head=4, n_kv_head=2, d_model=128, d_ff=344),
    "tiny-moe": lambda: ModelConfig(n_layer=4, n_head=4, n_kv_head=2, d_model=128, moe=MoEConfig(n_experts=4, d_expert=128)),
    "small": lambda: ModelConfig(n_layer=6, n_head=6, n_kv_head=2, d_model=384, d_ff=1024, max_seq_len=1024),
    "small-moe": lambda: ModelConfig(
        n_layer=6, n_head=6, n_kv_head=2, d_model=384, max_seq_len=1024, moe=MoEConfig(n_experts=8, d_expert=384)
    ),
}
