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
from helpers import assert_close_rel

from pikv_train.cache.config import CacheConfig
from pikv_train.models import Decoder, ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hf_generate.py"


def _checkpoint(path: Path, cache: CacheConfig | None = None, hook_state: dict | None = None) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=40, max_seq_len=64)
    model = Decoder(cfg)
    with torch.no_grad():
        for blk in model.blocks:  # peaky attention: evictions change the tokens
            blk.attn.q_proj.weight.mul_(8.0)
            blk.attn.kv_proj.weight[: cfg.n_kv_head * cfg.head_dim].mul_(8.0)
    torch.save({"pikv_model_config": cfg.to_dict(), "pikv_task": "distill",
                "state_dict": {**{f"student.{k}": v for k, v in model.state_dict().items()},
                               **{f"student.cache_policy.{k}": v for k, v in (hook_state or {}).items()}},
                "pikv_cache_policy": asdict(cache or CacheConfig(policy="h2o", budget=12, chunk_size=4)),
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


def test_an_exported_students_learned_cache_state_comes_back_through_from_pretrained(tmp_path):
    """DuoAttention gates travel in pikv_cache.safetensors; PiKVCache.from_pretrained(folder) decodes with them exactly
    as pikv_train does with the checkpoint's policy (and differently from the initial all-retrieval gates)."""
    import transformers

    from pikv_train.cache.config import build_policy
    from pikv_train.evaluate import load_decoder
    from pikv_train.hf import PiKVCache, export_checkpoint
    from pikv_train.models.generation import left_pad

    cache = CacheConfig(policy="duo_attention", budget=8, n_sink=2, duo_hard=True)
    gates = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # (layers, kv-heads): one retrieval and one streaming head each
    ckpt = _checkpoint(tmp_path / "duo.ckpt", cache, {"gates": gates})
    export_checkpoint(ckpt, tmp_path / "hf")
    assert (tmp_path / "hf" / "pikv_cache.safetensors").is_file()
    model = load_decoder(ckpt)
    model.set_cache_policy(build_policy(cache, model.cfg))
    model.load_state_dict({f"cache_policy.{k}": v for k, v in model.hook_state.items()
                           if k.startswith("cache_policy.")} | {"cache_policy.gates": gates}, strict=False)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g) for n in (20, 13)]
    ids, pos = left_pad(prompts, 257)
    ours = ids
    with torch.no_grad():
        c = model.new_cache()
        logits = model.logits(model(ids, positions=pos, cache=c).hidden[:, -1])
        nxt, toks, outs = pos.max(1).values + 1, [], []
        for _ in range(10):
            outs.append(logits)
            toks.append(logits.argmax(-1))
            logits = model.logits(model(toks[-1][:, None], positions=nxt[:, None], cache=c).hidden[:, -1])
            nxt = nxt + 1
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="pikv")

    def theirs(cache):
        out = hf.generate(input_ids=ours, attention_mask=(pos >= 0).long(), cache=cache, max_new_tokens=10,
                          do_sample=False, pad_token_id=257, eos_token_id=None, return_dict_in_generate=True,
                          output_logits=True)
        return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1)

    want = torch.stack(outs, 1)
    got_toks, got = theirs(PiKVCache.from_pretrained(tmp_path / "hf"))
    assert torch.equal(got_toks, torch.stack(toks, 1))
    assert_close_rel(got, want, 1e-4)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "learned parameters but no state": the point of this comparison
        _, initial = theirs(PiKVCache(**asdict(cache)))
    assert float((initial - want).abs().max()) > 1e-3 * float(want.abs().max())


def test_the_main_help_names_the_export_command(capsys):
    from pikv_train.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "python -m pikv_train export --ckpt CKPT --out DIR" in capsys.readouterr().out
