"""The decoder stack used for teachers (dense SwiGLU) and PiKV students (MoE FFN).

``Decoder.forward`` returns the final normalised hidden states, not logits: losses apply the LM head
chunk by chunk (``pikv_train.distill.chunked``) so no (B*T, V) logits tensor is needed in training.
"""

from __future__ import annotations

from pikv_train.errors import ConfigError

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pikv_train.models.attention import CausalSelfAttention
from pikv_train.models.config import ModelConfig
from pikv_train.models.head import LogitHead
from pikv_train.models.hooks import AttentionContext, AttentionHook
from pikv_train.models.layers import RMSNorm, Rotary, SwiGLU
from pikv_train.models.moe import MoEFeedForward
from pikv_train.routing import RouterOutput


@dataclass
class DecoderOutput:
    """hidden: (B, T, d) after the final norm; routing: one RouterOutput per MoE layer (empty if dense)."""

    hidden: Tensor
    routing: list[RouterOutput] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    """Hook statistics of this forward (e.g. cache/kept_fraction), filled by attention hooks."""

    @property
    def router_loss(self) -> Tensor:
        """Sum of all layers' weighted router losses."""
        if not self.routing:
            return self.hidden.new_zeros((), dtype=torch.float32)
        return torch.stack([r.loss for r in self.routing]).sum()


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)); x + ffn(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = (MoEFeedForward(cfg.d_model, cfg.moe, max_seq_len=cfg.max_seq_len) if cfg.moe is not None
                    else SwiGLU(cfg.d_model, cfg.d_ff))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, **attn_kw) -> tuple[Tensor, RouterOutput | None]:
        ctx = attn_kw.get("ctx")
        # PiKVRouter learns to predict the attention mass a token receives in this layer (detached target).
        wants_mass = (
            self.training and ctx is not None and attn_kw.get("cache") is None
            and isinstance(self.ffn, MoEFeedForward) and hasattr(self.ffn.router, "importance_loss")
        )
        if wants_mass:
            ctx.want_attention_probs = True
        x = x + self.attn(self.attn_norm(x), cos, sin, **attn_kw)
        h = self.ffn_norm(x)
        if isinstance(self.ffn, MoEFeedForward):
            target = None
            if wants_mass and ctx.attention_probs is not None:
                target = self.ffn.router.attention_mass_target(ctx.attention_probs, relative=True)  # (B, T)
                ctx.attention_probs = None
            # Decoding: expert-capacity queues continue from earlier steps, in the cache's `extra` dict.
            cache = attn_kw.get("cache")
            y, routing = self.ffn(h, importance_target=target, positions=attn_kw.get("positions"),
                                  state=None if cache is None else getattr(cache, "extra", None),
                                  layer_idx=attn_kw.get("layer_idx", 0), incremental=cache is not None)
            return x + y, routing
        return x + self.ffn(h), None


class Decoder(nn.Module):
    """Token embedding -> L blocks -> final RMSNorm; LM head tied to the embedding by default."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)
        # Attention hooks (see models/hooks.py): expert-sharded KV placement and the cache policy.
        self.kv_sharding: AttentionHook | None = None
        self.cache_policy: AttentionHook | None = None
        # Recompute each block's activations in the backward instead of storing them (training only).
        self.activation_checkpointing = False
        self.apply(self._init)
        if cfg.qkv_bias:  # start as the bias-free projection (other Linear biases, e.g. a router head's, keep theirs)
            for blk in self.blocks:
                nn.init.zeros_(blk.attn.q_proj.bias)
                nn.init.zeros_(blk.attn.kv_proj.bias)
        # GPT-2 style: scale residual output projections by depth so the residual stream starts small.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down.weight")):
                nn.init.normal_(p, std=0.02 / (2 * cfg.n_layer) ** 0.5)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def set_cache_policy(self, policy: AttentionHook | None) -> None:
        """Train / evaluate under a cache scheduling policy hook (None = full attention). A policy whose
        fractional budget has no fixed reference length yet takes the model's ``max_seq_len``."""
        old = self.cache_policy
        if old is not None and old is not policy and hasattr(old, "detach"):
            old.detach(self)  # e.g. a trained low-rank latent folds back into the K/V projection
        if policy is not None and hasattr(policy, "bind"):
            policy.bind(self.cfg)
        self.cache_policy = policy
        if policy is not None and hasattr(policy, "attach"):
            policy.attach(self)  # e.g. a low-rank compressor initialises from our K/V projections

    def set_kv_sharding(self, sharding: AttentionHook | None) -> None:
        """Place keys in expert shards and read them through routing (None = unsharded)."""
        self.kv_sharding = sharding

    def new_cache(self, n_layer: int | None = None, *, seq_len: int | None = None):
        """The inference cache this model is deployed with: its cache policy, KV sharding (and KV
        compression) composed, as trained (SPEC §7). Every generation path builds its cache here.

        Args:
            n_layer: accepted so that ``generate(..., cache_factory=model.new_cache)`` works; must equal
                the model's.
            seq_len: reference length of a fractional budget (default: the policy's fixed reference length).
        """
        from pikv_train.cache.compose import deployed_cache

        if n_layer is not None and n_layer != self.cfg.n_layer:
            raise ValueError(f"new_cache(n_layer={n_layer}) but the model has {self.cfg.n_layer} layers")
        return deployed_cache(self, seq_len)

    @property
    def is_moe(self) -> bool:
        return self.cfg.moe is not None

    @property
    def head_weight(self) -> Tensor:
        """(V, d) weight of the LM head."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    @property
    def head(self) -> LogitHead:
        """The LM head as a :class:`LogitHead` (a plain projection: our decoder has no bias or logit transform),
        the form losses and generation share with Hugging Face models."""
        return LogitHead(self.head_weight)

    def logits(self, hidden: Tensor) -> Tensor:
        """Apply the LM head: (..., d) -> (..., V)."""
        return hidden @ self.head_weight.t()

    def forward(
        self,
        input_ids: Tensor,
        *,
        positions: Tensor | None = None,
        cache=None,
        masks: list[Tensor | None] | None = None,
    ) -> DecoderOutput:
        """Run the stack.

        Args:
            input_ids: (B, T) token ids.
            positions: (B, T) absolute positions (default 0..T-1; -1 marks left padding in generation).
            cache: an inference KV cache (``pikv_train.cache.KVCache`` or a policy cache), updated in place.
            masks: optional per-layer (B|1, 1|H_kv, T, T) bool visibility masks for the training forward.
        """
        b, t = input_ids.shape
        if cache is not None and t > 1 and getattr(cache, "row_by_row", False):
            # A versioned compressor (KIVI) stores a token differently depending on the reading query's position:
            # the cache takes one token per step, so a prompt is fed as decode steps (exactly the training rule).
            if positions is None:
                positions = torch.arange(t, device=input_ids.device).expand(b, t)
            outs = [self(input_ids[:, i: i + 1], positions=positions[:, i: i + 1], cache=cache) for i in range(t)]
            return DecoderOutput(hidden=torch.cat([o.hidden for o in outs], 1), routing=outs[-1].routing,
                                 stats=outs[-1].stats)
        if positions is None:
            if t > self.cfg.max_seq_len:
                raise ConfigError(
                    f"sequence length {t} exceeds the model's max_seq_len={self.cfg.max_seq_len}; "
                    "lower data.seq_len or raise max_seq_len in the model config"
                )
            positions = torch.arange(t, device=input_ids.device).expand(b, t)
        cos, sin = self.rotary(positions.clamp_min(0))
        x = self.embed(input_ids)
        routing, by_layer, stats = [], {}, {}
        off = self._cache_off
        hooks = [h for h in (self.kv_sharding, self.cache_policy) if h is not None] if cache is None and not off else []
        compressor = None if off else getattr(self.cache_policy, "compressor", None)
        for i, block in enumerate(self.blocks):
            ctx = AttentionContext(layer_idx=i, positions=positions, routing_by_layer=by_layer, stats=stats)
            kw = dict(cache=cache, layer_idx=i, positions=positions, mask=None if masks is None else masks[i],
                      hooks=hooks, ctx=ctx, compressor=compressor)
            if self.activation_checkpointing and self.training and cache is None and torch.is_grad_enabled():
                x, r = checkpoint(block, x, cos, sin, use_reentrant=False, **kw)
            else:
                x, r = block(x, cos, sin, **kw)
            if r is not None:
                routing.append(r)
                by_layer[i] = r
                if cache is not None and hasattr(cache, "record_routing"):
                    # Expert-sharded caches place the next layer's keys by this layer's routing.
                    cache.record_routing(i, r)
        return DecoderOutput(hidden=self.norm(x), routing=routing, stats=stats)

    _cache_off = False

    @contextmanager
    def cache_off(self):
        """Inside: the training forward without the cache policy, its compressor and KV sharding (the uncompressed
        model; KV-Distill's teacher is the student itself run this way)."""
        prev, self._cache_off = self._cache_off, True
        try:
            yield self
        finally:
            self._cache_off = prev

    def num_parameters(self, active: bool = False) -> int:
        """Parameter count; ``active=True`` counts only top_k of the routed experts per layer."""
        n = sum(p.numel() for p in self.parameters())
        if active and self.is_moe:
            per_expert = sum(p.numel() for p in self.blocks[0].ffn.experts[0].parameters())
            n -= self.cfg.n_layer * per_expert * (self.cfg.moe.n_experts - self.cfg.moe.router.top_k)
        return n
