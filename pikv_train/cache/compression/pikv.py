"""The PiKV hybrid (ours, SPEC §6): every token of a (sequence, kv-head) is kept at full precision, 4-bit or
2-bit, or evicted, ranked by the importance the PiKVRouter already learns, under one byte budget.

Importance: the PiKVRouter's importance head predicts, per token, the attention mass it will receive (trained by
the router's own regression loss, SPEC §2). Layer l's cache ranks its keys by the importance the router of the
MoE layer before it (l - 1) gave each token: known when the token's key is stored, in training and decoding
alike (the router of layer l itself runs after layer l's attention). Where no such score exists (layer 0, a dense
layer before, or another router) the tiers rank by accumulated attention, MiKV's score, and the log says so.

Allocation, at every decision (every ``tier_every`` tokens, the ``recent`` most recent tokens always at full
precision): the budget is ``byte_budget`` x the full-precision bytes of every token seen so far. If every
candidate fits at the lowest tier, nothing is evicted and MiKV's split applies (the x most important candidates at
full precision, the next x at 4 bits, the rest at 2 bits, x the largest that fits); otherwise all candidates go to
the lowest tier and only the most important that fit stay: the others are evicted for good. A token is only ever
demoted, as in MiKV; an evicted one never returns. With the router's importance the ranking is static, so the
training pass is a cheap loop without attention.

Built on :class:`~pikv_train.cache.compression.pyramid.PyramidCompressor` (the tier forms, the straight-through
training attention, the store), with a fourth tier. It chooses which tokens stay, so ``cache.policy`` must be
``full``; expert sharding composes (it limits what each row reads among the tokens held).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from pikv_train.cache.compression.pyramid import PyramidCompressor


class PiKVCompressor(PyramidCompressor):
    """Full / 4-bit / 2-bit / evicted by the PiKVRouter's importance under a byte budget."""

    name = "pikv"
    evicts = True
    uses_importance = True

    def _check_budget(self) -> None:
        """Any budget works: below the lowest tier's size the least important tokens are evicted."""

    def allocate(self, n_seen, n_held, n_recent, n_cand, element_size):
        full, mid, low = self.token_bytes(element_size)
        budget = self.cfg.byte_budget * n_seen * full
        n_recent, n_cand = torch.as_tensor(n_recent), torch.as_tensor(n_cand)
        fits = n_recent * full + n_cand * low <= budget
        left = budget - n_recent * full - n_cand * low
        x = torch.floor(left.double() / (full + mid - 2 * low)).clamp_min(0)
        x = torch.minimum(x, torch.div(n_cand, 2, rounding_mode="floor").double()).long()
        keep = torch.floor(((budget - n_recent * full) / low)).clamp_min(0).long()
        return torch.where(fits, x, torch.zeros_like(x)), torch.where(fits, n_cand, torch.minimum(keep, n_cand))

    def bytes_per_token_head(self, element_size, context):
        """An upper bound on the bytes per token of a ``context``-token stream: the byte budget for the decided
        tokens (or the recent window alone when the budget is below it), the tokens since the last decision at full
        precision, and a float64 score and int8 tier per token (evicted tokens hold none: ``bytes_stored()`` is
        exact)."""
        full, _, _ = self.token_bytes(element_size)
        n, c, r = context, min(self.cfg.tier_every, context), min(self.cfg.recent, context)
        decided = n - c
        kv = max(decided * self.cfg.byte_budget * full, min(r, decided) * full) + c * full
        return kv / n + 9

    def attach(self, model) -> None:
        router = getattr(getattr(model.cfg, "moe", None), "router", None)
        name = getattr(router, "name", None)
        if name != "pikv":
            warnings.warn(f"cache.compressor pikv: the student's router is {name or 'absent (dense model)'}, which has "
                          "no importance head; the tiers rank by accumulated attention (MiKV's score) in every layer. "
                          "Use model router name pikv to rank by the learned importance", stacklevel=2)
        else:
            warnings.warn("cache.compressor pikv: layer 0 has no router before it and ranks its keys by accumulated "
                          "attention; layers 1.. rank by the PiKVRouter importance of the layer before", stacklevel=2)
        super().attach(model)


def token_importance(routing, b: int, t: int) -> Tensor | None:
    """(B, T) the PiKVRouter importance in ``routing`` (a RouterOutput), or None when the router has none."""
    if routing is None:
        return None
    imp = routing.extras.get("importance") if getattr(routing, "extras", None) else None
    return None if imp is None else imp.detach().reshape(b, t)
