"""``pikv_cache.json`` (format ``pikv_cache/1``): written with exactly its four keys and the learned policy state, read
back checked; a damaged or foreign file is one line naming the problem and the fix."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from pikv_train.cache.config import CacheConfig
from pikv_train.cache.sharding import ShardingConfig
from pikv_train.errors import ConfigError, MissingFileError
from pikv_train.hf.cache_file import read_cache_config, write_cache_config


def test_written_file_has_the_format_and_reads_back(tmp_path):
    cache = asdict(CacheConfig(policy="duo_attention", budget=0.25, reference_len=64))
    gates = torch.rand(2, 3)
    spec = write_cache_config(tmp_path, cache, ShardingConfig(enabled=True, window=8), {"gates": gates})
    on_disk = json.loads((tmp_path / "pikv_cache.json").read_text())
    assert on_disk == spec == read_cache_config(tmp_path)
    assert list(on_disk) == ["format", "cache", "sharding", "state"] and on_disk["format"] == "pikv_cache/1"
    assert on_disk["cache"]["policy"] == "duo_attention" and on_disk["cache"]["lru_plus_weights"] == [0.3, 0.3, 0.4]
    assert on_disk["sharding"]["window"] == 8 and on_disk["state"] == "pikv_cache.safetensors"
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(tmp_path / "pikv_cache.safetensors"))["gates"], gates)
    # Full attention, sharding off, nothing learned: nulls, and no stale state file from the earlier write.
    spec = write_cache_config(tmp_path, None, ShardingConfig(enabled=False), {})
    assert spec == {"format": "pikv_cache/1", "cache": None, "sharding": None, "state": None}
    assert not (tmp_path / "pikv_cache.safetensors").exists() and read_cache_config(tmp_path) == spec


@pytest.mark.parametrize("content,error,match", [
    (None, MissingFileError, "pikv_cache.json not found; export the student with `python -m pikv_train export"),
    ("{not json", ConfigError, "is not valid JSON"),
    ({"format": "pikv_cache/0", "cache": None, "sharding": None, "state": None}, ConfigError,
     "has format 'pikv_cache/0', expected 'pikv_cache/1'"),
    ({"format": "pikv_cache/1", "cache": None}, ConfigError, "must hold exactly the keys"),
    ({"format": "pikv_cache/1", "cache": {"policy": "h2o", "bugdet": 0.5}, "sharding": None, "state": None},
     ConfigError, "'cache' holds invalid settings"),
    ({"format": "pikv_cache/1", "cache": None, "sharding": None, "state": "pikv_cache.safetensors"},
     MissingFileError, "names the state file 'pikv_cache.safetensors', which is not in"),
])
def test_bad_files_are_one_line_errors(tmp_path, content, error, match):
    if content is not None:
        (tmp_path / "pikv_cache.json").write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(error, match=match) as e:
        read_cache_config(tmp_path)
    assert "\n" not in str(e.value) and ("re-export" in str(e.value) or "export the student" in str(e.value))
