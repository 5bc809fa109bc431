"""KV caches, scheduling policies, sharding and compression."""

from pikv_train.cache.config import CacheConfig, build_policy
from pikv_train.cache.kv_cache import KVCache, causal_position_mask
from pikv_train.cache.policies import (
    AdaKVScheduler,
    DuoAttentionScheduler,
    FlexGenScheduler,
    H2OScheduler,
    LRUPlusScheduler,
    LRUScheduler,
    QuestScheduler,
    StreamingLLMScheduler,
)

__all__ = [
    "AdaKVScheduler", "CacheConfig", "DuoAttentionScheduler", "FlexGenScheduler", "H2OScheduler", "KVCache",
    "LRUPlusScheduler", "LRUScheduler", "QuestScheduler", "StreamingLLMScheduler", "build_policy",
    "causal_position_mask",
]
