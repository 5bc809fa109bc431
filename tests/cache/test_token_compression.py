"""Token compressors (SPEC §6): FastV, PyramidKV, ChunkKV. What each cache holds (per-layer budgets, whole chunks,
layers after K), golden values of the scoring pieces, config errors. Decoding == training is in test_contract."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import decode_tokenwise

from pikv_train.cache import CacheConfig, build_policy
from pikv_train.cache.compression import ChunkKVCompressor, FastVCompressor, PyramidKVCompressor
from pikv_train.cache.compression.token_select import pool_scores
from pikv_train.errors import ConfigError
from pikv_train.models import Decoder, ModelConfig
from pikv_train.models.config import MoEConfig
from pikv_train.routing import RouterConfig

T = 48
W = 6
pytestmark = pytest.mark.usefixtures("one_thread")


def _decoded(comp: dict, budget=24):
    """A 4-layer MoE student under ``comp`` after decoding T tokens (prefill 7): (model, cache)."""
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=4, n_head=4, n_kv_head=2, d_model=32, max_seq_len=T,
                      moe=MoEConfig(n_experts=4, d_expert=32, router=RouterConfig(name="topk_balanced", top_k=2)))
    model = Decoder(cfg)
    with torch.no_grad():  # peaky attention: the choices differ between layers and heads
        for blk in model.blocks:
            blk.attn.q_proj.weight.mul_(20.0)
            blk.attn.kv_proj.weight[: cfg.n_kv_head * cfg.head_dim].mul_(20.0)
    model.set_cache_policy(build_policy(CacheConfig(budget=budget, chunk_size=4, compressor={**comp, "obs_window": W}),
                                        cfg))
    model.eval()
    cache = model.new_cache()
    with torch.no_grad():
        decode_tokenwise(model, cache, torch.randint(0, 258, (2, T), generator=torch.Generator().manual_seed(1)), 7)
    return model, cache


def _positions(cache, layer: int) -> list[list[list[int]]]:
    return [[st["pos"].tolist() for st in row] for row in cache.store[layer]]


def test_pyramid_kv_layer_budgets_shrink_with_depth_as_published():
    # budget 24, window 6: 18 selected on average; beta 4: min 4, max 32, steps (32 - 4) // 3 = 9.
    model, cache = _decoded(dict(name="pyramid_kv", pyramid_beta=4))
    pol = model.cache_policy
    assert isinstance(pol, PyramidKVCompressor)
    assert pol.layer_budgets(24) == [38, 29, 20, 11]
    for layer, n in enumerate([38, 29, 20, 11]):
        assert (cache.head_lengths(layer) == n).all()  # every stream holds exactly its layer's budget
        for row in _positions(cache, layer):
            assert all(p[-W:] == list(range(T - W, T)) for p in row)  # the window is always held
    assert len({tuple(p) for row in _positions(cache, 3) for p in row}) > 1  # kv-heads choose separately


def test_chunk_kv_keeps_whole_chunks_shared_by_heads_and_reused_by_layer_groups():
    model, cache = _decoded(dict(name="chunk_kv", chunk_length=3, reuse_layers=2))
    assert isinstance(model.cache_policy, ChunkKVCompressor)
    held = [_positions(cache, layer) for layer in range(4)]
    for layer in range(4):
        for row in held[layer]:
            assert all(p == row[0] for p in row)  # one choice for all kv-heads
            old = [j for j in row[0] if j < T - W]
            assert len(old) == (24 - W) // 3 * 3  # (budget - window) // L whole chunks
            assert all(set(range(j // 3 * 3, j // 3 * 3 + 3)) <= set(row[0]) for j in old)  # chunks kept whole
    assert held[0] == held[1] and held[2] == held[3]  # layer-wise index reuse in groups of 2
    assert held[1] != held[2]  # and each group chooses for itself


def test_fastv_keeps_everything_up_to_layer_k_and_drops_r_after_it():
    model, cache = _decoded(dict(name="fastv", fastv_layer=1, fastv_ratio=0.5))
    assert isinstance(model.cache_policy, FastVCompressor)
    assert (cache.head_lengths(0) == T).all() and (cache.head_lengths(1) == T).all()
    n_keep = round(0.5 * (T - W))  # the tokens that left the window, halved
    assert (cache.head_lengths(2) == W + n_keep).all() and (cache.head_lengths(3) == W + n_keep).all()
    assert _positions(cache, 2) == _positions(cache, 3)  # layer K's choice, for every later layer
    assert all(p == row[0] for row in _positions(cache, 2) for p in row)  # and every kv-head


def test_pool_scores_golden_values():
    x = torch.tensor([[0.0, 3.0, 0.0, 0.0, 6.0]], dtype=torch.float64)
    torch.testing.assert_close(pool_scores(x, 3, "avgpool"), torch.tensor([[1.0, 1.0, 1.0, 2.0, 2.0]],
                                                                          dtype=torch.float64))  # zero padding counts
    torch.testing.assert_close(pool_scores(x, 3, "maxpool"), torch.tensor([[3.0, 3.0, 3.0, 6.0, 6.0]],
                                                                          dtype=torch.float64))
    assert pool_scores(x, 1, "avgpool") is x


def test_chunk_select_golden_values():
    pol = ChunkKVCompressor(CacheConfig(compressor=dict(name="chunk_kv", chunk_length=2)), ModelConfig.preset("nano"))
    score = torch.tensor([[[1.0, 1.0, 5.0, 0.0, 2.0, 2.0, 9.0, 9.0]], [[0.0] * 8]], dtype=torch.float64)[:1]
    score = torch.cat([score, score], 1)  # (1, 2 kv-heads, 8): chunk means over heads 2, 5, 4, 18
    cand = torch.tensor([True] * 6 + [False] * 2).expand(1, 2, 8)  # the last chunk is still in the window
    keep = pol.select(score, cand, 4)  # 4 tokens: 2 chunks
    assert keep[0, 0].tolist() == [False, False, True, True, True, True, False, False]
    assert torch.equal(keep[0, 0], keep[0, 1])


@pytest.mark.parametrize("kw,match", [
    (dict(policy="h2o", compressor="pyramid_kv"), "compressor.name=pyramid_kv chooses which tokens stay"),
    (dict(compressor=dict(name="chunk_kv", pool_kernel=4)), "pool_kernel=4"),
    (dict(compressor=dict(name="fastv", fastv_ratio=1.0)), "fastv_ratio=1.0"),
    (dict(compressor=dict(name="chunk_kv", reuse_layers=0)), "reuse_layers=0"),
])
def test_bad_token_compressor_settings_are_one_line_errors(kw, match):
    with pytest.raises(ConfigError, match=match) as e:
        CacheConfig(**kw).validate()
    assert "\n" not in str(e.value)


def test_fastv_after_the_last_layer_warns_that_it_does_nothing():
    with pytest.warns(UserWarning, match="fastv_layer=3"):
        build_policy(CacheConfig(compressor=dict(name="fastv", fastv_layer=3)), ModelConfig(n_layer=4, n_head=4,
                                                                                              d_model=32))


def test_token_compressors_train_with_gradients_through_the_kept_keys():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("nano", max_seq_len=T)
    model = Decoder(cfg)
    model.set_cache_policy(build_policy(CacheConfig(budget=0.5, compressor=dict(name="chunk_kv", obs_window=W,
                                                                                 chunk_length=3)), cfg))
    x = torch.randint(0, 258, (2, T))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model(x)
    model.logits(out.hidden).logsumexp(-1).mean().backward()
    assert model.blocks[0].attn.kv_proj.weight.grad.abs().sum() > 0
    assert float(out.stats["cache/kept_fraction"]) < 0.9  # the training forward reads the compressed cache


@pytest.mark.parametrize("name", ["pyramid_kv", "chunk_kv", "fastv"])
def test_bytes_stored_counts_exactly_what_each_stream_holds(name):
    """Per (layer, sequence, kv-head): raw keys and values and the position of each held token, the current
    selection (positions) and, in a layer that selects, the window's queries and their positions."""
    comp = {"pyramid_kv": dict(name=name, pyramid_beta=4), "chunk_kv": dict(name=name, chunk_length=3),
            "fastv": dict(name=name, fastv_layer=1)}[name]
    model, cache = _decoded(comp)
    cfg, pol = model.cfg, model.cache_policy
    g = cfg.n_head // cfg.n_kv_head
    expect = 0
    for layer in range(cfg.n_layer):
        for row in cache.store[layer]:
            for st in row:
                expect += len(st["pos"]) * (2 * cfg.head_dim * 4 + 8) + len(st["sel"]) * 8
                if st["qwin"] is not None:
                    assert st["qwin"][0].shape == (g, W, cfg.head_dim)  # the last W queries, no more
                    expect += g * W * cfg.head_dim * 4 + W * 8
        decides = any(pol.source(m) == layer for m in range(cfg.n_layer))
        assert (cache.store[layer][0][0]["qwin"] is not None) == decides
    assert cache.bytes_stored() == expect
    assert not cache._sel_at  # the within-step selections are gone once the last layer reading them ran
