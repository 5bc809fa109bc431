"""Cache scheduling policies (H2O, StreamingLLM, Quest, FlexGen, LRU, LRU+, AdaKV, DuoAttention).

Each is one object: the training-forward visibility mask (``training_mask``) and the inference cache
(``new_cache``) that appends, evicts and selects by the same rule.
"""

from pikv_train.cache.policies.ada_kv import AdaKVScheduler
from pikv_train.cache.policies.base import CachePolicy, PolicyCache, resolve_budget
from pikv_train.cache.policies.duo_attention import DuoAttentionScheduler, calibrate_gates
from pikv_train.cache.policies.flexgen import FlexGenScheduler
from pikv_train.cache.policies.full import FullScheduler
from pikv_train.cache.policies.h2o import H2OScheduler
from pikv_train.cache.policies.lru import LRUScheduler
from pikv_train.cache.policies.lru_plus import LRUPlusScheduler
from pikv_train.cache.policies.quest import QuestScheduler
from pikv_train.cache.policies.sequential import ChunkSequentialPolicy
from pikv_train.cache.policies.streaming_llm import StreamingLLMScheduler

__all__ = [
    "AdaKVScheduler", "CachePolicy", "ChunkSequentialPolicy", "DuoAttentionScheduler", "FlexGenScheduler", "FullScheduler",
    "H2OScheduler", "LRUPlusScheduler", "LRUScheduler", "PolicyCache", "QuestScheduler", "StreamingLLMScheduler",
    "calibrate_gates", "resolve_budget",
]
