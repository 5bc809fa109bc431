"""StreamingLLM (Xiao et al., 2023): attention sinks + a recent window, an exact positional policy.

Row t reads the first ``s`` tokens and the last ``W = budget - s`` tokens:
``M[t, j] = [j <= t] and ([j < s] or [t - j < W])`` with s = n_sink (4), reduced to budget - 1 when the
budget is smaller than the sinks. Absolute RoPE positions are kept (the paper's re-rotation to in-cache
positions is a different model input, not expressible as a mask). The cache stores exactly the sinks
and the window: s + W - 1 keys between steps, s + W = budget while attending.
"""

from __future__ import annotations

import torch

from pikv_train.cache.policies.base import CachePolicy, PolicyCache, causal_mask
from pikv_train.cache.policies.blocks import BlockPlan, window_plan


def sink_window(budget: int, n_sink: int) -> tuple[int, int]:
    s = min(n_sink, budget - 1)
    return s, budget - s


def streaming_mask(t: int, budget: int, n_sink: int, device) -> torch.Tensor:
    """(T, T) bool: causal ∧ (sink ∨ recent window)."""
    s, w = sink_window(budget, n_sink)
    i = torch.arange(t, device=device)[:, None]
    j = torch.arange(t, device=device)[None]
    return causal_mask(t, device) & ((j < s) | (i - j < w))


def streaming_plan(t: int, budget: int, n_sink: int, device, block_rows: int = 64) -> BlockPlan:
    """Block-sparse form of :func:`streaming_mask`: blocks of ``block_rows`` rows, each reading its sinks and
    the window range of its rows (s + W + block_rows - 1 key slots)."""
    s, w = sink_window(budget, n_sink)
    c = min(block_rows, t)
    return window_plan(list(range(0, t, c)), t, c, s, w, device)


class StreamingLLMCache(PolicyCache):
    def _step(self, layer_idx, h, st, q, k_all, p_all, n_old):
        s, w = sink_window(self.budget, self.policy.cfg.n_sink)
        return streaming_step(p_all, n_old, s, w)


def streaming_step(p_all, n_old, s, w):
    t = p_all[n_old:]  # positions of the new tokens
    rows = (p_all[None] <= t[:, None]) & ((p_all[None] < s) | (t[:, None] - p_all[None] < w))
    keep = (p_all < s) | (p_all >= t[-1] + 2 - w) if len(t) else torch.ones_like(p_all, dtype=torch.bool)
    return rows, keep


class StreamingLLMScheduler(CachePolicy):
    """Sinks + recent window (exact; the inference cache equals the masked parallel forward)."""

    cache_cls = StreamingLLMCache

    def mask(self, q, k, ctx, budget):
        return streaming_mask(q.shape[2], budget, self.cfg.n_sink, q.device)[None, None]

    def block_plan(self, q, k, ctx, budget):
        return streaming_plan(q.shape[2], budget, self.cfg.n_sink, q.device)

    def mask_mod(self, q, k, ctx, budget):
        s, w = sink_window(budget, self.cfg.n_sink)
        return lambda b, h, qi, ki: (ki < s) | (qi - ki < w)

    def held_mask(self, t, ctx):
        """Row t arrives to the sinks and the window (the cache dropped the key leaving it after row t - 1)."""
        return streaming_mask(t, self.budget_tokens(), self.cfg.n_sink, ctx.positions.device)[None, None]
