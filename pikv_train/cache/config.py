"""Typed cache-policy settings (``cache:`` in recipes) and the factory that builds the policy hook."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PolicyName = Literal["full", "h2o", "streaming_llm", "quest", "flexgen", "lru", "lru_plus", "ada_kv", "duo_attention"]


@dataclass
class CacheConfig:
    """Which cache scheduling policy the model trains and decodes under, and its budget."""

    policy: PolicyName = "full"
    """full | h2o | streaming_llm | quest | flexgen | lru | lru_plus | ada_kv | duo_attention."""
    budget: float = 1.0
    """Keys each query may read: a fraction of the sequence (<= 1) or a token count (> 1)."""


def build_policy(cfg: CacheConfig | None):
    """The policy hook for ``cfg`` (None for ``full``)."""
    if cfg is None or cfg.policy == "full":
        return None
    raise NotImplementedError(f"cache policy {cfg.policy!r} is not implemented yet")
