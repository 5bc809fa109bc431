"""Cache policies as training masks: invariants C1-C5 on random inputs, per-token H2O against an independent
implementation of the published algorithm, budgets (whole budget used, fixed reference length, skipped when
it covers the reference length)."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import training_visibility

from pikv_train.cache import CacheConfig, build_policy
from pikv_train.models import ModelConfig
from pikv_train.models.hooks import AttentionContext

B, H, HKV, T, HD, BUDGET = 2, 4, 2, 48, 8, 16
SMALL = dict(n_sink=2, chunk_size=4, page_size=4, quest_dense_layers=0, snap_window=4, snap_kernel=3, reference_len=T)
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
    m = training_visibility(pol, q, k, ctx)
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


def _reference_h2o(q, k, budget):
    """Per-token H2O written from the paper, independently of the package: row t keeps the recent half
    of the budget and the heavy hitters (largest attention accumulated over the rows that read them), the
    attention of each row renormalised over the keys it still holds (float64), eviction permanent."""
    b, h, t, hd = q.shape
    hkv = k.shape[1]
    r = max(1, round(budget / 2))
    heavy = budget - r
    out = torch.zeros(b, hkv, t, t, dtype=torch.bool)
    for bi in range(b):
        for hi in range(hkv):
            held, score = [], {}
            keep = set()
            for ti in range(t):
                if ti > 0:  # decide which keys leaving the window stay (top `heavy` by accumulated attention)
                    cand = [j for j in held if j in keep or ti - r <= j < ti + 1 - r]
                    cand.sort(key=lambda j: (score[j], j), reverse=True)
                    keep = set(cand[:heavy])
                held = [j for j in held if ti - j < r or j in keep] + [ti]
                score[ti] = 0.0
                qq = q[bi, hi * (h // hkv):(hi + 1) * (h // hkv), ti].double() / hd**0.5  # (g, hd)
                p = (qq @ k[bi, hi, held].double().t()).softmax(-1).mean(0)
                for j, pj in zip(held, p.tolist()):
                    score[j] += pj
                out[bi, hi, ti, held] = True
    return out


def test_per_token_h2o_equals_the_published_algorithm():
    """chunk_size 1 is per-token H2O: each row's attention over the keys it still holds decides."""
    q, k = _qk(3)
    q = q * 3  # peaky attention: heavy hitters matter
    ctx = AttentionContext(layer_idx=1, positions=torch.arange(T).expand(B, T))
    m = _policy("h2o", chunk_size=1).mask(q, k, ctx, BUDGET)
    assert torch.equal(m, _reference_h2o(q, k, BUDGET))
    assert (m.sum(-1)[..., BUDGET:] < torch.arange(BUDGET + 1, T + 1)).all()  # something was evicted


def test_chunked_h2o_differs_from_per_token_but_mostly_agrees():
    q, k = _qk(4)
    ctx = AttentionContext(layer_idx=1, positions=torch.arange(T).expand(B, T))
    per_token = _policy("h2o", chunk_size=1).mask(q, k, ctx, BUDGET)
    chunked = _policy("h2o", chunk_size=4).mask(q, k, ctx, BUDGET)
    agree = (per_token & chunked).sum() / (per_token | chunked).sum()
    assert 0.5 < float(agree) < 1.0


@pytest.mark.parametrize("name", ["h2o", "lru", "lru_plus"])
@pytest.mark.parametrize("chunk", [1, 4, 5])
def test_chunk_sequential_uses_the_whole_budget(name, chunk):
    """Heavy slots go only to keys leaving the window: with budget = the reference length nothing is dropped
    for any chunk size (5 does not divide T = 48), and past the budget the last row of every chunk reads
    exactly ``budget`` keys (earlier rows of the chunk still see some kept keys through the window, at most
    C - 1 slots short)."""
    q, k = _qk(5)
    pol = _policy(name, chunk_size=chunk)
    ctx = AttentionContext(layer_idx=1, positions=torch.arange(T).expand(B, T))
    assert torch.equal(pol.mask(q, k, ctx, T), torch.ones(T, T, dtype=torch.bool).tril().expand(B, HKV, T, T))
    counts = pol.mask(q, k, ctx, BUDGET).sum(-1)  # (B, H_kv, T)
    c = pol.sizes(BUDGET)[3]
    last_rows = torch.arange(T)[(torch.arange(T) % c == c - 1) & (torch.arange(T) >= BUDGET - 1)]
    assert (counts[..., last_rows] == BUDGET).all()
    assert (counts[..., BUDGET - 1:] > BUDGET - c).all()


def test_budget_covering_the_reference_length_skips_the_policy_with_one_warning():
    q, k = _qk(6)
    pol = _policy("lru", budget=1.0)  # reference length T: nothing can be evicted
    ctx = AttentionContext(layer_idx=1, positions=torch.arange(T).expand(B, T))
    with pytest.warns(UserWarning, match="covers the reference length"):
        assert pol.training_mask(q, k, ctx) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pol.training_mask(q, k, ctx) is None  # warned once
    assert "policy_block_plan" not in ctx.scratch  # skipped: no block-sparse plan either
    assert float(ctx.stats["cache/kept_fraction"]) == 1.0


def test_fractional_budget_resolves_against_the_fixed_reference_length():
    """Not the batch's length: a 20-token forward under budget 0.25 of L = 48 reads 12 keys per row, and the
    inference cache has the same budget."""
    pol = _policy("streaming_llm", budget=0.25)
    assert pol.budget_tokens() == 12 and pol.new_cache(2).budget == 12
    q, k = _qk(7)
    ctx = AttentionContext(layer_idx=1, positions=torch.arange(20).expand(B, 20))
    m = training_visibility(pol, q[:, :, :20], k[:, :, :20], ctx)
    assert int(m.sum(-1).max()) == 12


def test_ada_kv_spends_the_whole_layer_budget():
    """Selected slots go only to keys leaving the window: at the last row of every chunk (once the
    sequence is long enough) the heads of a layer read exactly H_kv * budget keys in total."""
    q, k = _qk(6)
    c = 2  # below the window (4), so some window keys stay visible through the chunk
    m, _ = _mask(_policy("ada_kv", chunk_size=c), q, k)
    rows = torch.arange(2 * BUDGET - 1, T, c)
    rows = rows[rows % c == c - 1]
    assert len(rows) > 0 and (m.sum(-1).sum(1)[:, rows] == HKV * BUDGET).all()


