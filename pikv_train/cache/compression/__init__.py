"""KV storage compressors (SPEC §6): how each kept token's key and value are stored.

Selected with ``model.init_args.cache.compressor: {name: ..., ...}``; the cache policy holds the compressor,
so it composes with every policy and with expert sharding, trains with the student and is checkpointed.
"""

from pikv_train.cache.compression.base import KVCompressor, Store, Versions
from pikv_train.cache.compression.config import COMPRESSORS, CompressorConfig
from pikv_train.cache.compression.kivi import QuantizedCompressor
from pikv_train.cache.compression.lowrank import LoRACompressor, LoRaPlusPlusCompressor, SVDCompressor
from pikv_train.cache.compression.pyramid import PyramidCompressor
from pikv_train.cache.compression.think import PruningCompressor

REGISTRY = {
    "quantized": QuantizedCompressor,
    "pyramid": PyramidCompressor,
    "svd": SVDCompressor,
    "lora": LoRACompressor,
    "lora_plus": LoRaPlusPlusCompressor,
    "pruning": PruningCompressor,
}


def build_compressor(cfg: CompressorConfig | dict | str | None, model_cfg) -> KVCompressor | None:
    """The compressor for ``cfg`` (None for ``none``); ``model_cfg`` gives the head sizes."""
    cfg = CompressorConfig.from_any(cfg).validate()
    if cfg.name == "none":
        return None
    if cfg.name not in REGISTRY:
        from pikv_train.errors import ConfigError

        raise ConfigError(f"model.init_args.cache.compressor.name={cfg.name} is not built yet; choose one of "
                          f"{', '.join(sorted(REGISTRY))}")
    if model_cfg is None:
        from pikv_train.errors import ConfigError

        raise ConfigError("a KV compressor needs the model config (head sizes): build the policy with "
                          "build_policy(cache_cfg, model.cfg)")
    return REGISTRY[cfg.name](cfg, model_cfg)


__all__ = [
    "COMPRESSORS", "CompressorConfig", "KVCompressor", "LoRACompressor", "LoRaPlusPlusCompressor", "PruningCompressor",
    "PyramidCompressor", "QuantizedCompressor", "SVDCompressor", "Store", "Versions", "build_compressor",
]
