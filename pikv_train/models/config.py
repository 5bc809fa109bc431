"""Typed model configurations and named presets.

Every field is a YAML key (``model.init_args.model.d_model`` and so on); the string under each field is
its documentation, shown by ``--help`` and ``--print_config=comments``.
"""

from __future__ import annotations

from pikv_train.errors import ConfigError, bad_value, check_range

from dataclasses import asdict, dataclass, field, fields, replace

from pikv_train.models.lora import LoRAConfig
from pikv_train.models.upcycle import UpcycleConfig
from pikv_train.routing.base import RouterConfig


MODEL_KEY = "model.init_args.{model|student}"
"""How messages name a ModelConfig: the LM task's ``model.init_args.model`` or the distillation student's
``model.init_args.student`` (the same dataclass; a teacher's comes from its checkpoint)."""


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
    qkv_bias: bool = False
    """Give the query and key/value projections a bias (Qwen2's attention; the output projection never has one)."""
    moe: MoEConfig | None = None
    """MoE FFN settings; None gives a dense decoder (teachers)."""
    hf_path: str | None = None
    """Start from a Hugging Face causal LM in this local folder (Llama, Mistral or Qwen2: dense, RMSNorm, RoPE,
    GQA, SwiGLU): the architecture fields above come from its config.json (leave them unset) and the weights from
    its safetensors; the data use its tokenizer unless data.tokenizer is given. Checkpoints store the resolved
    architecture (hf_path null), so they reload without the folder."""
    upcycle: UpcycleConfig | None = None
    """Sparse upcycling: turn the pretrained dense FFN of every layer (from hf_path or init_from / student_init)
    into an MoE of copies of it with a fresh router; moe must then be unset (the resolved config has it)."""
    lora: LoRAConfig | None = None
    """LoRA / LoRA+ adapters (students from pretrained weights: student_init or hf_path): the base weights freeze and
    low-rank updates of the chosen projections train; None trains every weight."""

    def __post_init__(self) -> None:
        k = MODEL_KEY
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "max_seq_len"):
            check_range(f"{k}.{name}", getattr(self, name), lo=1, fix=f"set {k}.{name} to a positive integer")
        if self.moe is None:
            check_range(f"{k}.d_ff", self.d_ff, lo=1, fix=f"set {k}.d_ff to a positive integer")
        if self.d_model % self.n_head:
            raise bad_value(f"{k}.d_model", self.d_model, f"must be divisible by n_head={self.n_head}",
                            f"set {k}.d_model to a multiple of {k}.n_head (e.g. {self.n_head * max(1, round(self.d_model / self.n_head))})")
        if self.n_head % self.n_kv_head:
            raise bad_value(f"{k}.n_kv_head", self.n_kv_head, f"must divide n_head={self.n_head} (grouped-query attention)",
                            f"set {k}.n_kv_head to a divisor of {self.n_head}")
        if (self.d_model // self.n_head) % 2:
            raise bad_value(f"{k}.d_model", self.d_model, f"head dim d_model/n_head={self.d_model // self.n_head} must be even "
                            "for RoPE", f"change {k}.d_model or {k}.n_head so that d_model/n_head is even")
        if isinstance(self.upcycle, dict):
            self.upcycle = UpcycleConfig.from_dict(self.upcycle)
        if self.upcycle is not None:
            self.upcycle.validate()
            if self.moe is not None and self.hf_path is None:
                raise ConfigError(f"{k}.upcycle builds the MoE from the dense FFN, but {k}.moe is set too; set {k}.moe: "
                                  "null (the dense architecture of the init_from / student_init checkpoint)")
        if isinstance(self.lora, dict):
            self.lora = LoRAConfig(**self.lora)
        if self.lora is not None:
            self.lora.validate()
        if self.moe is not None:
            m, r = f"{k}.moe", f"{k}.moe.router"
            check_range(f"{m}.n_experts", self.moe.n_experts, lo=1, fix=f"set {m}.n_experts to a positive integer")
            check_range(f"{m}.d_expert", self.moe.d_expert, lo=1, fix=f"set {m}.d_expert to a positive integer")
            if self.moe.router.top_k > self.moe.n_experts:
                raise ConfigError(
                    f"{r}.top_k={self.moe.router.top_k} exceeds n_experts={self.moe.n_experts}; "
                    f"lower {r}.top_k or raise {m}.n_experts"
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
