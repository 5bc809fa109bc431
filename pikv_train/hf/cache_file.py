"""``pikv_cache.json``: the KV cache an exported student was trained under, beside its Hugging Face weights.

The file (format ``pikv_cache/1``) holds exactly four keys::

    {"format": "pikv_cache/1",
     "cache": asdict(CacheConfig) of the policy the student trained under, or null (full attention),
     "sharding": asdict(ShardingConfig) of its expert-sharded KV, or null (unsharded),
     "state": "pikv_cache.safetensors" (learned policy parameters, e.g. DuoAttention gates), or null}

The state file holds the policy's own parameter names (``gates``, ``compressor.lora_a.0``, ...), i.e. the checkpoint's
``cache_policy.*`` keys with that prefix removed, so ``policy.load_state_dict`` takes it as it is.
:meth:`pikv_train.hf.PiKVCache.from_pretrained` reads the file; :func:`read_cache_config` checks it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, is_dataclass
from pathlib import Path

from pikv_train.errors import ConfigError, MissingFileError

CACHE_FILE = "pikv_cache.json"
CACHE_FORMAT = "pikv_cache/1"
STATE_FILE = "pikv_cache.safetensors"
_KEYS = ("format", "cache", "sharding", "state")


def _plain(value):
    """A dataclass, mapping or None as plain JSON-able data (tuples become lists through json)."""
    if value is None:
        return None
    if is_dataclass(value):
        return asdict(value)
    return {k: _plain(v) if isinstance(v, dict) or is_dataclass(v) else v for k, v in dict(value).items()}


def write_cache_config(out_dir, cache: dict | None, sharding: dict | None, policy_state: dict | None) -> dict:
    """Write ``pikv_cache.json`` (and ``pikv_cache.safetensors`` when ``policy_state`` holds tensors) into
    ``out_dir``; returns what was written to the JSON file.

    Args:
        cache: the CacheConfig (or its dict) the student trained under; None for full attention.
        sharding: the ShardingConfig (or its dict) of its sharded KV; None or ``enabled: false`` for none.
        policy_state: learned policy parameters under their policy names (no ``cache_policy.`` prefix).
    """
    out = Path(out_dir)
    sharding = _plain(sharding)
    if sharding is not None and not sharding.get("enabled", True):
        sharding = None
    state = None
    stale = out / STATE_FILE
    if policy_state:
        from safetensors.torch import save_file

        # safetensors refuses views sharing storage: store each tensor on its own.
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in policy_state.items()}, str(out / STATE_FILE))
        state = STATE_FILE
    elif stale.is_file():  # an earlier export into this folder (--force) must not leave its state behind
        stale.unlink()
    spec = {"format": CACHE_FORMAT, "cache": _plain(cache), "sharding": sharding, "state": state}
    (out / CACHE_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    return json.loads((out / CACHE_FILE).read_text())


def read_cache_config(folder) -> dict:
    """The checked contents of ``folder/pikv_cache.json`` (the four keys of the module docstring).

    Raises a one-line MissingFileError or ConfigError that names the problem and the fix: the file or the state file
    it names is missing, it is not JSON, its format is not ``pikv_cache/1``, it has other keys, or ``cache`` /
    ``sharding`` are not valid settings.
    """
    f = Path(folder) / CACHE_FILE
    again = "re-export the student with `python -m pikv_train export --ckpt CKPT --out DIR --force`"
    if not f.is_file():
        raise MissingFileError(f"{f} not found; export the student with `python -m pikv_train export --ckpt CKPT "
                               f"--out {folder}`, or pass the folder it was exported to")
    try:
        spec = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{f} is not valid JSON ({e}); {again}") from None
    if not isinstance(spec, dict) or spec.get("format") != CACHE_FORMAT:
        got = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
        raise ConfigError(f"{f} has format {got!r}, expected {CACHE_FORMAT!r}; {again}")
    if set(spec) != set(_KEYS):
        raise ConfigError(f"{f} must hold exactly the keys {list(_KEYS)}, it has {sorted(spec)}; {again}")
    from pikv_train.cache.config import CacheConfig
    from pikv_train.cache.sharding import ShardingConfig
    from pikv_train.errors import UserError

    for key, cls in (("cache", CacheConfig), ("sharding", ShardingConfig)):
        value = spec[key]
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{f}: '{key}' must be a mapping of settings or null, not {type(value).__name__}; "
                              f"{again}")
        try:
            cls.from_dict(value) if hasattr(cls, "from_dict") else cls(**value)
        except (UserError, TypeError, ValueError) as e:
            raise ConfigError(f"{f}: '{key}' holds invalid settings ({' '.join(str(e).split())}); {again}") from None
    state = spec["state"]
    if state is not None and (not isinstance(state, str) or not (Path(folder) / state).is_file()):
        raise MissingFileError(f"{f} names the state file {state!r}, which is not in {folder}; copy it there or "
                               f"{again}")
    return spec
