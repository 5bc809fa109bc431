"""Expert-sharded KV cache settings (SPEC §3) and the factory that builds the sharding hook."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ShardingConfig:
    """Expert-sharded KV placement: each key lives in the shards of its routed experts."""

    enabled: bool = False
    """Turn sharded KV placement on."""


def build_sharding(cfg: ShardingConfig | None, model_cfg):
    """The sharding hook for ``cfg`` (None when disabled)."""
    if cfg is None or not cfg.enabled:
        return None
    raise NotImplementedError("expert-sharded KV is not implemented yet")
