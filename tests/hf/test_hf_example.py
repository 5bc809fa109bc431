"""``examples/hf_generate.py`` (issue 15, item 4): exports a student checkpoint, reloads it with plain transformers and
generates with transformers' DynamicCache, the cache the student trained under and a chosen PiKVCache, printing the
text, tokens/s and KV bytes of each (run here on a hand-made checkpoint of a tiny student trained under H2O)."""

from __future__ import annotations

import re
import runpy
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from pikv_train.cache.config import CacheConfig
from pikv_train.models import Decoder, ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hf_generate.py"


def _checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=40, max_seq_len=64)
    model = Decoder(cfg)
    with torch.no_grad():
        for blk in model.blocks:  # peaky attention: evictions change the tokens
            blk.attn.q_proj.weight.mul_(8.0)
            blk.attn.kv_proj.weight[: cfg.n_kv_head * cfg.head_dim].mul_(8.0)
    torch.save({"pikv_model_config": cfg.to_dict(), "pikv_task": "distill",
                "state_dict": {f"student.{k}": v for k, v in model.state_dict().items()},
                "pikv_cache_policy": asdict(CacheConfig(policy="h2o", budget=12, chunk_size=4)),
                "hyper_parameters": {}, "datamodule_hyper_parameters": {"tokenizer": "byte"}}, path)
    return path


def test_example_exports_reloads_and_compares_the_caches(tmp_path, monkeypatch, capsys):
    ckpt = _checkpoint(tmp_path / "last.ckpt")
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), "--ckpt", str(ckpt), "--out", str(tmp_path / "hf"),
                                      "--new-tokens", "24", "--policy", "streaming_llm", "--budget", "8"])
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    out = capsys.readouterr().out
    assert (tmp_path / "hf" / "pikv_cache.json").is_file() and "architecture  LlamaForCausalLM" in out
    rows = re.findall(r"=== (.+?): (\d+) tokens/s, KV ([\d.]+) KiB \(([\d.]+)% of full\)", out)
    assert [r[0] for r in rows] == ["transformers DynamicCache (full)", "PiKVCache as trained: h2o, budget 12",
                                    "PiKVCache streaming_llm, budget 8"]
    full, trained, chosen = (float(r[3]) for r in rows)
    # Every row of the batch sees at least 5 + 24 tokens; H2O holds 11 per head, StreamingLLM 7 (+ positions).
    assert full == 100.0 and trained < 60.0 and chosen < trained
    assert out.count("'import os") == 3  # each run prints its continuations
    assert re.search(r"tokens equal to full attention's: \d+/72 with the trained cache, \d+/72 with the chosen one", out)
