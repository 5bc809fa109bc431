"""SPEC §8: ``PiKVCache`` inside transformers' ``generate()``. Greedy generation of an exported student with a
PiKVCache equals pikv_train's own decoding under the same policy (same tokens, logits <= 1e-4 relative) on a
left-padded batch with peaky attention; the cache stores fewer bytes for real; misuse is a one-line error."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_close_rel

from pikv_train.cache.config import CacheConfig, build_policy
from pikv_train.errors import ConfigError, MissingFileError
from pikv_train.hf import PiKVCache, to_hf
from pikv_train.models import Decoder, ModelConfig
from pikv_train.models.config import MoEConfig
from pikv_train.models.generation import left_pad
from pikv_train.routing import RouterConfig

pytestmark = pytest.mark.usefixtures("one_thread")

PAD, NEW = 257, 12
CASES = {  # the three policies and a compressor (KIVI: its cache takes one token per step), and a token one
    "streaming_llm": dict(policy="streaming_llm", budget=8, n_sink=2),
    "h2o": dict(policy="h2o", budget=8, chunk_size=4),
    "quest": dict(policy="quest", budget=8, page_size=4, quest_dense_layers=0),
    "kivi": dict(policy="full", compressor={"name": "quantized", "bits": 2, "group_size": 4, "residual": 4}),
    "chunk_kv": dict(policy="full", budget=10, compressor={"name": "chunk_kv", "obs_window": 4, "chunk_length": 2}, chunk_size=4),
}


def _student(moe: bool = False) -> Decoder:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=40, max_seq_len=64, rope_base=500.0,
                      moe=MoEConfig(n_experts=4, d_expert=24, router=RouterConfig(name="topk_balanced", top_k=2))
                      if moe else None)
    model = Decoder(cfg)
    with torch.no_grad():  # peaky attention: the policy's choices change the outputs
        for blk in model.blocks:
            blk.attn.q_proj.weight.mul_(8.0)
            blk.attn.kv_proj.weight[: cfg.n_kv_head * cfg.head_dim].mul_(8.0)
    return model.eval()


def _prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (n,), generator=g) for n in (14, 9)]


@torch.no_grad()
def _ours(model: Decoder, prompts, n: int):
    """pikv_train's greedy decoding with the model's deployed cache: (tokens (B, n), logits (B, n, V))."""
    ids, pos = left_pad(prompts, PAD)
    cache = model.new_cache()
    logits = model.logits(model(ids, positions=pos, cache=cache).hidden[:, -1])
    nxt_pos, toks, outs = pos.max(1).values + 1, [], []
    for _ in range(n):
        outs.append(logits)
        toks.append(logits.argmax(-1))
        logits = model.logits(model(toks[-1][:, None], positions=nxt_pos[:, None], cache=cache).hidden[:, -1])
        nxt_pos = nxt_pos + 1
    return torch.stack(toks, 1), torch.stack(outs, 1)


@torch.no_grad()
def _theirs(hf, prompts, n: int, cache=None):
    ids, pos = left_pad(prompts, PAD)
    out = hf.generate(input_ids=ids, attention_mask=(pos >= 0).long(), cache=cache, max_new_tokens=n, do_sample=False,
                      pad_token_id=PAD, eos_token_id=None, return_dict_in_generate=True, output_logits=True)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1)


@pytest.mark.parametrize("name", list(CASES))
def test_generate_with_pikv_cache_equals_our_decoding_under_the_same_policy(name):
    settings = CASES[name]
    model = _student(moe=name == "h2o")  # one MoE student (Mixtral), the others dense (Llama)
    model.set_cache_policy(build_policy(CacheConfig.from_dict(settings), model.cfg))
    hf = to_hf(model)
    hf.set_attn_implementation("pikv")
    toks, logits = _ours(model, _prompts(), NEW)
    cache = PiKVCache(**settings)
    htoks, hlogits = _theirs(hf, _prompts(), NEW, cache)
    assert torch.equal(htoks, toks)
    assert_close_rel(hlogits, logits, 1e-4)
    # The policy matters here: full attention gives other logits (so equality above is not by accident).
    hf.set_attn_implementation("sdpa")
    _, full = _theirs(hf, _prompts(), NEW)
    assert (full - logits).abs().max() > 1e-2 * logits.abs().max()
    if name == "quest":  # a selection policy keeps every key and reads a budget of them
        assert cache.inner.read_fraction() < 0.8
        return
    # Fewer bytes, for real: below a full cache of the same tokens (keys + values + int64 positions).
    seen = len(_prompts()[0]) + NEW - 1
    full_bytes = model.cfg.n_layer * 2 * model.cfg.n_kv_head * seen * (2 * model.cfg.head_dim * 4 + 8)
    assert 0 < cache.bytes_stored() < 0.8 * full_bytes


def test_streaming_llm_bytes_are_exactly_sinks_plus_window():
    settings = CASES["streaming_llm"]
    model = _student()
    hf = to_hf(model)
    hf.set_attn_implementation("pikv")
    cache = PiKVCache(**settings)
    _theirs(hf, _prompts(), NEW, cache)
    # Every (sequence, kv-head, layer) holds 7 tokens (the next query reads them and itself: the budget of 8), each an
    # fp32 key + value (hd 8) and an int64 position.
    c = model.cfg
    assert cache.bytes_stored() == c.n_layer * 2 * c.n_kv_head * 7 * (2 * c.head_dim * 4 + 8)
    assert cache.get_seq_length() == 14 + NEW - 1  # tokens seen (what generate slices its inputs by)


def test_from_pretrained_rebuilds_the_exported_cache_configuration(tmp_path):
    model = _student()
    settings = CASES["h2o"]
    to_hf(model).save_pretrained(tmp_path)
    cfg = CacheConfig.from_dict(settings)
    from dataclasses import asdict

    (tmp_path / "pikv_cache.json").write_text(json.dumps({"format": "pikv_cache/1", "cache": asdict(cfg),
                                                          "sharding": None, "state": None}))
    cache = PiKVCache.from_pretrained(tmp_path)
    assert cache.cache_cfg == cfg and cache.inner is not None and cache.policy.budget_tokens() == 8
    model.set_cache_policy(build_policy(cfg, model.cfg))
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="pikv")
    toks, _ = _ours(model, _prompts(), 6)
    assert torch.equal(_theirs(hf, _prompts(), 6, cache)[0], toks)


def test_misuse_is_a_one_line_error(tmp_path):
    model = _student()
    hf = to_hf(model)
    hf.set_attn_implementation("sdpa")
    with pytest.raises(ConfigError, match="attn_implementation='pikv'"):
        _theirs(hf, _prompts(), 2, PiKVCache(**CASES["h2o"]))
    with pytest.raises(ConfigError, match="unknown settings"):
        PiKVCache("h2o", budgett=8)
    with pytest.raises(ConfigError, match="compressor lora stores latents"):
        PiKVCache("full", compressor={"name": "lora", "rank": 0.5})
    with pytest.raises(MissingFileError, match="pikv_cache.json not found"):
        PiKVCache.from_pretrained(tmp_path)
    (tmp_path / "pikv_cache.json").write_text(json.dumps({"format": "pikv_cache/1", "cache": None,
                                                          "sharding": {"enabled": True}, "state": None}))
    with pytest.raises(ConfigError, match="expert shards"):
        PiKVCache.from_pretrained(tmp_path)
    hf.set_attn_implementation("pikv")
    ids, pos = left_pad(_prompts(), PAD)
    with pytest.raises(ConfigError, match="beam search"):
        hf.generate(input_ids=ids, attention_mask=(pos >= 0).long(), cache=PiKVCache(**CASES["h2o"]), num_beams=2,
                    max_new_tokens=3, do_sample=False, pad_token_id=PAD)


def test_a_hand_written_loop_without_position_ids_decodes_as_generate_does():
    # transformers then gives padded rows RoPE positions above 0; our caches count each row's real tokens instead
    # (Quest's pages would otherwise be misaligned), and relative positions, hence attention, are unchanged.
    settings = CASES["quest"]
    model = _student()
    hf = to_hf(model)
    hf.set_attn_implementation("pikv")
    toks, _ = _theirs(hf, _prompts(), 6, PiKVCache(**settings))
    ids, pos = left_pad(_prompts(), PAD)
    mask, cache, out = (pos >= 0).long(), PiKVCache(**settings), []
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True).logits[:, -1]
        for _ in range(6):
            out.append(logits.argmax(-1))
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            logits = hf(input_ids=out[-1][:, None], attention_mask=mask, cache=cache, use_cache=True).logits[:, -1]
    assert torch.equal(torch.stack(out, 1), toks)


def test_a_used_cache_or_use_cache_false_is_refused_rather_than_corrupted():
    model = _student()
    hf = to_hf(model)
    hf.set_attn_implementation("pikv")
    cache = PiKVCache(**CASES["h2o"])
    _theirs(hf, _prompts(), 3, cache)
    with pytest.raises(ConfigError, match="fresh PiKVCache per generate"):
        _theirs(hf, _prompts(), 3, cache)
    ids, pos = left_pad(_prompts(), PAD)
    with pytest.raises(ConfigError, match="use_cache=True"):
        hf.generate(input_ids=ids, attention_mask=(pos >= 0).long(), cache=PiKVCache(**CASES["h2o"]), use_cache=False,
                    max_new_tokens=3, do_sample=False, pad_token_id=PAD)
