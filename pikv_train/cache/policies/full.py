"""``policy: full`` with a KV compressor or expert sharding: every key is kept, stored as the compressor
stores it, and read through the sharding rule when sharding is on."""

from __future__ import annotations

import torch

from pikv_train.cache.kv_cache import KVCache
from pikv_train.cache.policies.base import CachePolicy, PolicyCache


class FullCache(PolicyCache):
    """Every key stored once per (sequence, kv-head) (compressed when a compressor is set), each query reading
    all earlier keys, or only its shards (+ sinks and window) under expert sharding, as the training mask. With
    per-shard budgets (``kv_sharding.shard_budget``) a key leaves once no shard holds it and neither the sinks
    nor the window show it, so storage is bounded by sinks + window + n_shards x shard_budget."""

    def _step(self, layer_idx, h, st, q, k_all, p_all, n_old):
        t = p_all[n_old:]
        keep = torch.ones_like(p_all, dtype=torch.bool)
        cfg = None if self.sharding is None else self.sharding.cfg
        if cfg is not None and cfg.shard_budget is not None and "midx_all" in st and len(t):
            # Per-shard budgets: a key no shard holds any more, past the sinks and out of the window, can never
            # be read again (its member counts and its age only grow): it leaves the cache.
            aged = ((st["scnt"][None] - st["midx_all"] >= cfg.shard_budget) | ~st["mem_all"]).all(-1)  # (S_all,)
            keep = ~(aged & (p_all >= cfg.n_sink) & (t[-1] + 1 - p_all >= cfg.window))
        return p_all[None] <= t[:, None], keep


class ShardedFullCache(FullCache):
    """Expert sharding without a cache policy or compressor (built by ``deployed_cache``)."""

    def __init__(self, sharding, n_layer: int):
        KVCache.__init__(self, n_layer)
        self.policy, self.budget, self.ref_len = None, None, None
        self.compressor, self.row_by_row = None, False
        self.store = [None] * n_layer
        self.sharding, self._routing, self.allow = sharding, {}, None
        self._read_sum, self._read_n = 0.0, 0


class FullScheduler(CachePolicy):
    """No scheduling: the holder of a compressor when ``cache.policy`` is ``full``."""

    evicts = False
    cache_cls = FullCache

    def training_mask(self, q, k, ctx):
        self.log_stats(ctx, None, self.budget_tokens(), k)
        return None

    def mask(self, q, k, ctx, budget):
        return None

    def mask_mod(self, q, k, ctx, budget):
        return None

    def held_mask(self, t, ctx):
        """Every earlier key, except those per-shard budgets retire (see ``FullCache``; the sharding hook's)."""
        return ctx.scratch.get("shard_held")
