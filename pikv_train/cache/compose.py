"""One place where the deployed inference cache is composed: policy × sharding (× compression).

DESIGN: "Cache = policy (which tokens) × compressor (how stored) × sharding (where), one object each,
composed in one place, held to SPEC §7". The training forward composes the same objects as attention
hooks (their masks ANDed in ``CausalSelfAttention``); :func:`deployed_cache` builds the cache that gives
the same logits when decoding token by token (tests/cache/test_contract.py).
"""

from __future__ import annotations

from pikv_train.cache.kv_cache import KVCache
from pikv_train.cache.policies.full import ShardedFullCache


def deployed_cache(model, seq_len: int | None = None) -> KVCache:
    """The inference cache of ``model`` (a :class:`~pikv_train.models.decoder.Decoder`) as configured:

    * no policy, no sharding: a plain :class:`KVCache`;
    * sharding alone: :class:`ShardedFullCache` (each key stored once, with its shard membership);
    * a policy (with or without sharding): the policy's cache, reading through the sharding rule when
      sharding is on (each key stored once, with its shard membership), storing each kept token as the
      policy's compressor does (``policy: full`` with a compressor is the policy ``FullScheduler``).
    """
    n_layer = model.cfg.n_layer
    policy, sharding = model.cache_policy, model.kv_sharding
    if policy is None and sharding is None:
        return KVCache(n_layer)
    if policy is None:
        return ShardedFullCache(sharding, n_layer)
    return policy.new_cache(n_layer, seq_len, sharding=sharding)
