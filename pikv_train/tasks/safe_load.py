"""Checkpoint reading with ``torch.load(weights_only=True)`` and our config classes allow-listed."""

from __future__ import annotations

from pikv_train.errors import ConfigError

import pickle
from pathlib import Path

import torch


def _safe_globals() -> list:
    from pikv_train.models.config import ModelConfig, MoEConfig
    from pikv_train.routing.base import RouterConfig
    from pikv_train.tasks.base import OptimConfig

    from pikv_train.cache.compression.config import CompressorConfig
    from pikv_train.cache.config import CacheConfig
    from pikv_train.cache.sharding import ShardingConfig

    from pikv_train.models.lora import LoRAConfig

    extra = [ModelConfig, MoEConfig, RouterConfig, OptimConfig, CacheConfig, CompressorConfig, ShardingConfig,
             LoRAConfig]
    try:
        from pikv_train.tasks.distill import DistillLossConfig
        from pikv_train.tasks.teacher import TeacherConfig

        extra += [DistillLossConfig, TeacherConfig]
    except ImportError:  # pragma: no cover
        pass
    return extra


def load_checkpoint_file(path: str | Path) -> dict:
    """Load a checkpoint safely; a damaged or foreign file gives a one-line error naming it."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ConfigError(f"cannot read checkpoint {str(path)!r} ({e.strerror}); fix the path or its permissions") from None
    # torch.save writes a zip archive (PK..) or, in the legacy format, a pickle (0x80 ..): anything else,
    # such as a text file, is not a checkpoint at all (torch.load would fail with e.g. "KeyError: 101").
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        kind = "an empty file" if not head else "a text file" if _is_text(path) else "another kind of file"
        raise ConfigError(
            f"cannot read checkpoint {str(path)!r}: it is not a checkpoint ({kind}, not written by torch.save); "
            "pass a .ckpt written by "
            "pikv_train (e.g. <out_dir>/checkpoints/last.ckpt)"
        )
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"cannot read checkpoint {str(path)!r} ({first[:160]}); it is damaged or not a pikv_train checkpoint"
        ) from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError(f"{str(path)!r} is not a Lightning checkpoint (no state_dict); pass a .ckpt written by pikv_train")
    return ckpt


def _is_text(path) -> bool:
    with open(path, "rb") as f:
        chunk = f.read(1024)
    try:
        chunk.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\x00" not in chunk
