"""One place where the deployed inference cache is composed: policy × sharding (× compression).

DESIGN: "Cache = policy (which tokens) × compressor (how stored) × sharding (where), one object each,
composed in one place, held to SPEC §7". The training forward composes the same objects as attention
hooks (their masks ANDed in ``CausalSelfAttention``); :func:`deployed_cache` builds the cache that gives
the same logits when decoding token by token (tests/cache/test_contract.py).
"""

from __future__ import annotations

import torch

from pikv_train.cache.kv_cache import KVCache
from pikv_train.cache.policies.base import PolicyCache


class ShardedFullCache(PolicyCache):
    """Expert sharding without a cache policy: every key stored once per (sequence, kv-head) with its shard
    membership, each query reading only its shards (+ sinks and window), as the training mask. Unlike
    :class:`~pikv_train.cache.sharded_cache.ShardedKVCache` (one copy per shard, the physical layout for
    expert-parallel placement) it stores a key's bytes once, plus one bool membership flag per shard. With
    per-shard budgets (``kv_sharding.shard_budget``) a key leaves once no shard holds it and neither the
    sinks nor the window show it, so storage is bounded by sinks + window + n_shards x shard_budget."""

    def __init__(self, sharding, n_layer: int):
        KVCache.__init__(self, n_layer)
        self.policy, self.budget, self.ref_len = None, None, None
        self.store = [None] * n_layer
        self.sharding, self._routing, self.allow = sharding, {}, None
        self._read_sum, self._read_n = 0.0, 0

    def _step(self, layer_idx, h, st, q, k_all, p_all, n_old):
        t = p_all[n_old:]
        keep = torch.ones_like(p_all, dtype=torch.bool)
        cfg = self.sharding.cfg
        if cfg.shard_budget is not None and "midx_all" in st and len(t):
            # Per-shard budgets: a key no shard holds any more, past the sinks and out of the window, can never
            # be read again (its member counts and its age only grow): it leaves the cache.
            aged = ((st["scnt"][None] - st["midx_all"] >= cfg.shard_budget) | ~st["mem_all"]).all(-1)  # (S_all,)
            keep = ~(aged & (p_all >= cfg.n_sink) & (t[-1] + 1 - p_all >= cfg.window))
        return p_all[None] <= t[:, None], keep


def deployed_cache(model, seq_len: int | None = None) -> KVCache:
    """The inference cache of ``model`` (a :class:`~pikv_train.models.decoder.Decoder`) as configured:

    * no policy, no sharding: a plain :class:`KVCache`;
    * sharding alone: :class:`ShardedFullCache` (each key stored once, with its shard membership);
    * a policy (with or without sharding): the policy's cache, reading through the sharding rule when
      sharding is on (each key stored once, with its shard membership).
    """
    n_layer = model.cfg.n_layer
    policy, sharding = model.cache_policy, model.kv_sharding
    if policy is None and sharding is None:
        return KVCache(n_layer)
    if policy is None:
        return ShardedFullCache(sharding, n_layer)
    return policy.new_cache(n_layer, seq_len, sharding=sharding)
