"""The interface through which cache policies and expert-sharded KV placement act on attention.

The decoder holds up to two hooks, ``Decoder.kv_sharding`` and ``Decoder.cache_policy`` (both
``nn.Module`` so learnable parts such as DuoAttention gates are trained and checkpointed). In the
training forward (no inference cache), every layer asks each hook for a visibility mask and ANDs them
with causality; a hook may also replace the attention computation itself (``attend``). At inference the
hook's cache object (``new_cache``) decides what each query reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn


@dataclass
class AttentionContext:
    """What a hook may look at for layer ``layer_idx`` of one training forward.

    positions: (B, T) absolute positions.
    routing: RouterOutputs of the layers already run (MoE layers only, in order); routing of layer l-1
        is ``routing_by_layer[l - 1]``.
    """

    layer_idx: int
    positions: Tensor
    routing_by_layer: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    want_attention_probs: bool = False
    """Set by the block when its router needs detached attention statistics (PiKVRouter)."""
    attention_probs: Tensor | None = None
    """(B, H, T, T) no-grad attention probabilities of this layer, when requested."""
    prior_mask: Tensor | None = None
    """AND of the masks of the hooks consulted before this one (e.g. expert sharding before the cache
    policy), (B|1, 1|H_kv, T, T) bool or None: a policy that decides from the attention a query really
    pays (H2O, LRU, LRU+) computes it under this mask, as its inference cache does."""
    versions: object = None
    """A versioned KV compressor's stored forms for this layer (:class:`~pikv_train.cache.compression.Versions`):
    row t reads key j in the form it gives; policies that score from attention use
    :func:`~pikv_train.cache.compression.base.scoring_logits` with it. None: ``k`` is what every row reads."""
    scratch: dict = field(default_factory=dict)
    """Per-layer values a hook computes in ``training_mask`` and reuses in ``attend`` (e.g. its mask_mod)."""


class AttentionHook(nn.Module):
    """Base class: no extra mask, default attention, plain full cache."""

    def training_mask(self, q: Tensor, k: Tensor, ctx: AttentionContext) -> Tensor | None:
        """Visibility for the training forward.

        Args:
            q: (B, H, T, hd) rotated queries; k: (B, H_kv, T, hd) rotated keys (use under no_grad for scores).
        Returns:
            None (no restriction) or a bool mask (B|1, 1|H_kv, T, T), True = may read; it must be causal
            and keep the diagonal.
        """
        return None

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, ctx: AttentionContext) -> Tensor | None:
        """Optionally compute attention itself ((B, H, T, hd) output); None uses the default SDPA path."""
        return None
