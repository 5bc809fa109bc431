"""Cache policies as training masks: invariants C1-C5 on random inputs, and the chunk-sequential
parallel masks against the token-by-token simulator."""

from __future__ import annotations

import pytest
import torch

from pikv_train.cache import CacheConfig, build_policy
from pikv_train.cache.policies import dense_probs
from pikv_train.models import ModelConfig
from pikv_train.models.hooks import AttentionContext

B, H, HKV, T, HD, BUDGET = 2, 4, 2, 48, 8, 16
SMALL = dict(n_sink=2, chunk_size=4, page_size=4, quest_dense_layers=0, snap_window=4, snap_kernel=3)
EVICTING = ["streaming_llm", "h2o", "lru", "lru_plus", "ada_kv", "duo_attention"]
WITH_SINKS = ["streaming_llm", "lru", "lru_plus", "duo_attention"]
ALL = EVICTING + ["quest", "flexgen"]


def _policy(name, budget=BUDGET, **kw):
    cfg = CacheConfig(policy=name, budget=budget, **{**SMALL, **kw})
    pol = build_policy(cfg, ModelConfig.preset("nano", n_head=H, n_kv_head=HKV))
    if name == "duo_attention":
        with torch.no_grad():
            pol.gates.zero_()  # every head streaming: the budgeted case
        pol.eval()
    return pol


def _mask(pol, q, k):
    ctx = AttentionContext(layer_idx=1, positions=torch.arange(T).expand(B, T))
    m = pol.training_mask(q, k, ctx)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return (causal if m is None else m).expand(B, HKV, T, T), ctx.stats


def _qk(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, T, HD, generator=g), torch.randn(B, HKV, T, HD, generator=g)


@pytest.mark.parametrize("name", ALL)
def test_mask_is_causal_keeps_diagonal_and_budget(name):
    q, k = _qk()
    m, stats = _mask(_policy(name), q, k)
    assert not (m & ~torch.ones(T, T, dtype=torch.bool).tril()).any()  # causal
    assert m.diagonal(dim1=-2, dim2=-1).all()  # C4
    counts = m.sum(-1)  # (B, H_kv, T)
    if name == "ada_kv":  # C2 per layer: heads share H_kv * budget
        assert counts.sum(1).max() <= HKV * BUDGET
        assert counts.max() > BUDGET  # the allocation really differs between heads
    elif name != "flexgen":  # FlexGen places, it does not restrict
        assert counts.max() <= BUDGET
        assert (counts[..., BUDGET:] > BUDGET // 2).all()
    assert 0 < float(stats["cache/kept_fraction"]) <= 1


@pytest.mark.parametrize("name", ALL)
def test_perturbing_later_tokens_never_changes_earlier_rows(name):
    pol = _policy(name)
    q, k = _qk()
    m, _ = _mask(pol, q, k)
    for t0 in (5, 17, 30):
        q2, k2 = q.clone(), k.clone()
        q2[:, :, t0 + 1:] = torch.randn_like(q2[:, :, t0 + 1:])
        k2[:, :, t0 + 1:] = torch.randn_like(k2[:, :, t0 + 1:])
        m2, _ = _mask(pol, q2, k2)
        assert torch.equal(m[:, :, : t0 + 1], m2[:, :, : t0 + 1]), t0  # C1


@pytest.mark.parametrize("name", EVICTING)
def test_evicted_keys_never_reappear(name):
    q, k = _qk(1)
    m, _ = _mask(_policy(name), q, k)
    later, earlier = m[:, :, 1:].int(), m[:, :, :-1].int()
    # Along each key's column (from its own row on) visibility only goes 1 -> 0 (C3).
    rows_after_key = torch.ones(T, T, dtype=torch.bool).tril()[:-1]  # row t >= key j
    assert not ((later > earlier) & rows_after_key).any()


@pytest.mark.parametrize("name", WITH_SINKS)
def test_sinks_always_visible(name):
    q, k = _qk(2)
    m, _ = _mask(_policy(name), q, k)
    assert m[..., 2:, :2].all()  # C5: n_sink = 2


@pytest.mark.parametrize("name", ["h2o", "lru", "lru_plus"])
@pytest.mark.parametrize("chunk", [1, 4])
def test_chunk_sequential_mask_equals_token_by_token_simulator(name, chunk):
    pol = _policy(name, chunk_size=chunk)
    q, k = _qk(3)
    a = dense_probs(q, k)
    par = pol.mask_from_probs(a, BUDGET)
    sim = pol.simulate(a, BUDGET)
    assert torch.equal(par, sim)
    assert (par.sum(-1)[..., BUDGET:] < torch.arange(BUDGET + 1, T + 1)).all()  # something was evicted


def test_chunked_h2o_differs_from_per_token_but_mostly_agrees():
    q, k = _qk(4)
    a = dense_probs(q, k)
    per_token = _policy("h2o", chunk_size=1).mask_from_probs(a, BUDGET)
    chunked = _policy("h2o", chunk_size=4).mask_from_probs(a, BUDGET)
    agree = (per_token & chunked).sum() / (per_token | chunked).sum()
    assert 0.5 < float(agree) < 1.0


@pytest.mark.parametrize("name", ["h2o", "lru", "lru_plus"])
@pytest.mark.parametrize("chunk", [1, 4])
def test_chunk_sequential_uses_the_whole_budget(name, chunk):
    """Heavy slots go only to keys leaving the window: with budget = T nothing is dropped, and past the
    budget the last row of every chunk reads exactly ``budget`` keys (earlier rows of the chunk still
    see some kept keys through the window, at most C - 1 slots short)."""
    q, k = _qk(5)
    a = dense_probs(q, k)
    pol = _policy(name, chunk_size=chunk)
    assert torch.equal(pol.mask_from_probs(a, T), torch.ones(T, T, dtype=torch.bool).tril().expand(B, HKV, T, T))
    counts = pol.mask_from_probs(a, BUDGET).sum(-1)  # (B, H_kv, T)
    last_rows = torch.arange(T)[(torch.arange(T) % chunk == chunk - 1) & (torch.arange(T) >= BUDGET - 1)]
    assert (counts[..., last_rows] == BUDGET).all()
    assert (counts[..., BUDGET - 1:] > BUDGET - chunk).all()


def test_ada_kv_spends_the_whole_layer_budget():
    """Selected slots go only to keys leaving the window: at the last row of every chunk (once the
    sequence is long enough) the heads of a layer read exactly H_kv * budget keys in total."""
    q, k = _qk(6)
    c = 2  # below the window (4), so some window keys stay visible through the chunk
    m, _ = _mask(_policy("ada_kv", chunk_size=c), q, k)
    rows = torch.arange(2 * BUDGET - 1, T, c)
    rows = rows[rows % c == c - 1]
    assert len(rows) > 0 and (m.sum(-1).sum(1)[:, rows] == HKV * BUDGET).all()


@pytest.mark.parametrize("name", ["h2o", "lru"])
def test_blockwise_scoring_pass_equals_the_dense_one(name):
    """The training mask scores keys from row blocks (no (T, T) scores per head); the statistics and the
    mask equal those from the whole dense attention matrix."""
    pol = _policy(name)
    q, k = _qk(7)
    c = pol.sizes(BUDGET)[3]
    whole = pol.chunk_stats(dense_probs(q, k), c)
    blocks = pol.stats_from_qk(q, k, c, block=3 * c)  # T = 48 rows in blocks of 12
    torch.testing.assert_close(whole[0], blocks[0], rtol=1e-6, atol=1e-9)  # float64 attention mass per chunk
    for x, y in zip(whole[1:], blocks[1:]):  # integer use counts and last-use rows (None for H2O)
        assert (x is None and y is None) or torch.equal(x, y)
    masks = [pol._mask(*pol.keep_per_chunk(st, T, BUDGET), T, q.device) for st in (whole, blocks)]
    assert torch.equal(*masks)
    ctx = AttentionContext(layer_idx=1, positions=torch.arange(T).expand(B, T))
    assert torch.equal(pol.mask(q, k, ctx, BUDGET), masks[0])
