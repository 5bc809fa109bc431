"""KV compressors (SPEC §6). Storage compressors (how each kept token's key and value are stored) are held by
the cache policy, so they compose with every policy and with expert sharding, train with the student and are
checkpointed. Token compressors (FastV, PyramidKV, ChunkKV: which tokens stay) take the policy's place
(``cache.policy: full``) and compose with expert sharding.

Selected with ``model.init_args.cache.compressor: {name: ..., ...}``.
"""

from pikv_train.cache.compression.base import KVCompressor, Store, Versions
from pikv_train.cache.compression.config import COMPRESSORS, TOKEN_COMPRESSORS, CompressorConfig
from pikv_train.cache.compression.kivi import QuantizedCompressor
from pikv_train.cache.compression.lowrank import LoRACompressor, LoRaPlusPlusCompressor, SVDCompressor
from pikv_train.cache.compression.pikv import PiKVCompressor
from pikv_train.cache.compression.pyramid import PyramidCompressor
from pikv_train.cache.compression.think import PruningCompressor

REGISTRY = {
    "quantized": QuantizedCompressor,
    "pyramid": PyramidCompressor,
    "svd": SVDCompressor,
    "lora": LoRACompressor,
    "lora_plus": LoRaPlusPlusCompressor,
    "pruning": PruningCompressor,
    "pikv": PiKVCompressor,
}


# Token compressors (FastV, PyramidKV, ChunkKV, KV-Distill) are cache policies (they import the policy machinery, which imports this package's config):
# loaded on first use.
TOKEN_REGISTRY = {
    "fastv": ("pikv_train.cache.compression.fastv", "FastVCompressor"),
    "pyramid_kv": ("pikv_train.cache.compression.pyramid_kv", "PyramidKVCompressor"),
    "chunk_kv": ("pikv_train.cache.compression.chunk_kv", "ChunkKVCompressor"),
    "distillation": ("pikv_train.cache.compression.kv_distill", "DistillationCompressor"),
}


def token_compressor_class(name: str):
    """The policy class of a token compressor (``fastv``, ``pyramid_kv``, ``chunk_kv``, ``distillation``)."""
    import importlib

    module, cls = TOKEN_REGISTRY[name]
    return getattr(importlib.import_module(module), cls)


def __getattr__(name):  # FastVCompressor, PyramidKVCompressor, ChunkKVCompressor, DistillationCompressor
    for key, (_, cls) in TOKEN_REGISTRY.items():
        if cls == name:
            return token_compressor_class(key)
    raise AttributeError(name)


def build_compressor(cfg: CompressorConfig | dict | str | None, model_cfg) -> KVCompressor | None:
    """The storage compressor for ``cfg`` (None for ``none`` and for token compressors, which are the policy);
    ``model_cfg`` gives the head sizes."""
    cfg = CompressorConfig.from_any(cfg).validate()
    if cfg.name == "none" or cfg.name in TOKEN_COMPRESSORS:
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
    "COMPRESSORS", "TOKEN_COMPRESSORS", "ChunkKVCompressor", "CompressorConfig", "DistillationCompressor", "FastVCompressor", "PyramidKVCompressor", "KVCompressor", "LoRACompressor", "LoRaPlusPlusCompressor", "PiKVCompressor", "PruningCompressor",
    "PyramidCompressor", "QuantizedCompressor", "SVDCompressor", "Store", "Versions", "build_compressor",
]
