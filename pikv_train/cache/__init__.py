"""KV caches, scheduling policies, sharding and compression."""

from pikv_train.cache.kv_cache import KVCache, causal_position_mask

__all__ = ["KVCache", "causal_position_mask"]
