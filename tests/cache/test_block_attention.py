"""Block-sparse attention under a cache policy (pikv_train/cache/policies/blocks.py, issue 17): each block of
rows reads only its gathered keys, and the outputs, gradients and statistics equal the dense masked path on a
model with peaky attention. (Decoding with the deployed cache equals this path too: tests/cache/test_contract.py
runs it wherever no other hook restricts the rows.)"""

from __future__ import annotations

import warnings

import pytest
import torch

import pikv_train.cache.policies.blocks as blocks
from pikv_train.cache import CacheConfig, build_policy
from pikv_train.models import Decoder, ModelConfig
from pikv_train.models.hooks import AttentionContext

POLICIES = ["streaming_llm", "h2o", "lru", "lru_plus", "ada_kv", "quest"]
SPARSE = POLICIES + ["duo_attention"]  # DuoAttention with soft gates: its streaming pass runs block-sparse
REF, T = 40, 50  # sequences past the reference length: chunk boundaries at multiples of 4, then L, L + 4, ...


def _cfg() -> ModelConfig:
    return ModelConfig(n_layer=3, n_head=4, n_kv_head=2, d_model=32, max_seq_len=64)


def _policy(name: str, cfg: ModelConfig, use_blocks: bool | None, budget: float = 0.25):
    pol = build_policy(CacheConfig(policy=name, budget=budget, chunk_size=4, n_sink=2, page_size=4,
                                   quest_dense_layers=1, snap_window=6, snap_kernel=3, reference_len=REF), cfg)
    pol.use_blocks = use_blocks
    if name == "duo_attention":
        with torch.no_grad():
            pol.gates.copy_(torch.tensor([[0.9, 0.2], [0.5, 0.0], [0.3, 0.7]]))  # soft: both passes mix
    return pol


def _peaky(model: Decoder) -> Decoder:
    with torch.no_grad():  # most rows put > 0.5 of their mass on one key: decisions are sharp
        for blk in model.blocks:
            blk.attn.q_proj.weight.mul_(20.0)
            blk.attn.kv_proj.weight[: model.cfg.n_kv_head * model.cfg.head_dim].mul_(20.0)
    return model


@pytest.fixture(scope="module")
def model() -> Decoder:
    torch.manual_seed(0)
    return _peaky(Decoder(_cfg()))


@pytest.mark.parametrize("name", SPARSE)
def test_block_sparse_attention_equals_the_dense_masked_path_forward_and_backward(model, name, monkeypatch):
    x = torch.randint(0, 258, (2, T), generator=torch.Generator().manual_seed(1))
    calls = []
    monkeypatch.setattr(blocks, "block_attend", lambda *a: calls.append(1) or block_attend(*a))
    got = {}
    for use in (False, None):  # the dense (T, T) boolean mask, then the default block-sparse path
        model.set_cache_policy(_policy(name, model.cfg, use))
        model.zero_grad(set_to_none=True)
        out = model(x)
        (out.hidden * torch.linspace(-1, 1, out.hidden.shape[-1])).sum().backward()
        got[use] = (out.hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters()},
                    {k: float(torch.as_tensor(v).detach()) for k, v in out.stats.items()})
    assert len(calls) == (2 if name == "quest" else 3)  # every policy layer ran block-sparse (Quest: 1 dense layer)
    (h0, g0, s0), (h1, g1, s1) = got[False], got[None]
    scale = float(h0.abs().max())
    torch.testing.assert_close(h1, h0, rtol=1e-4, atol=1e-5 * scale)
    for n, g in g0.items():
        torch.testing.assert_close(g1[n], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()), msg=n)
    assert s1 == pytest.approx(s0, rel=1e-9)  # kept fraction, budget use, evictions, bytes: the same visibility
    model.set_cache_policy(None)
    with torch.no_grad():
        free = model(x).hidden
    assert float((free - h0).abs().max()) > 1e-3 * scale  # the policy acts at this budget


block_attend = blocks.block_attend


SHAPES = [  # (T, reference length L, chunk C, budget tokens, n_sink): L past and not a multiple of C, T < n_sink,
    # per-token decisions (C = 1), no heavy slots (budget 2: window only), a window of 1 key
    (T, REF, 4, 10, 2), (37, 23, 3, 8, 2), (3, 64, 4, 16, 4), (20, 64, 1, 6, 2), (30, 64, 4, 2, 0), (25, 64, 4, 4, 2)]


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("t,ref,chunk,budget,n_sink", SHAPES)
def test_the_block_plan_shows_each_row_exactly_the_keys_of_the_dense_mask(name, t, ref, chunk, budget, n_sink):
    if name == "quest" and budget < 4:
        pytest.skip("Quest refuses a budget under one page")
    cfg = _cfg()
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, t, 8, generator=g) * 4
    k = torch.randn(2, 2, t, 8, generator=g) * 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # chunk capped at the window
        pol = build_policy(CacheConfig(policy=name, budget=budget, chunk_size=chunk, n_sink=n_sink, page_size=4,
                                       quest_dense_layers=1, snap_window=6, snap_kernel=3, reference_len=ref), cfg)
        ctx = AttentionContext(layer_idx=2, positions=torch.arange(t).expand(2, t))
        dense = pol.mask(q, k, ctx, budget).expand(2, 2, t, t)
        plan = pol.block_plan(q, k, ctx, budget)
    assert torch.equal(plan.dense(2, 2, t), dense)
    assert torch.equal(plan.counts(2, 2, t), dense.sum(-1))
    # No key is read twice by a row (duplicate slots would count twice in the softmax).
    vis = plan.block_vis().expand(2, 2, -1, -1, -1)
    b, hkv, nb, c, s = vis.shape
    keys = plan.block_keys().expand(2, 2, nb, s)[:, :, :, None].expand(b, hkv, nb, c, s)
    hits = torch.zeros(b, hkv, nb, c, t + 1, dtype=torch.long)
    hits.scatter_add_(-1, torch.where(vis, keys.clamp_max(t), t), vis.long())
    assert int(hits[..., :t].max()) == 1


@pytest.mark.parametrize("name", ["streaming_llm", "h2o", "lru", "lru_plus"])
def test_each_block_reads_at_most_budget_plus_block_keys_not_the_whole_sequence(name):
    """O(T·(budget + C)): the key slots per block do not grow with T."""
    cfg = ModelConfig(n_layer=1, n_head=2, n_kv_head=1, d_model=16, max_seq_len=512)
    q, k = torch.randn(1, 2, 512, 8), torch.randn(1, 1, 512, 8)
    pol = build_policy(CacheConfig(policy=name, budget=32, chunk_size=8, n_sink=4), cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the chunk is capped at the window (no cap at these sizes)
        plan = pol.block_plan(q, k, AttentionContext(layer_idx=0, positions=torch.arange(512)[None]), 32)
    c = plan.rows.shape[1]
    assert plan.n_slots <= 32 + c - 1
    assert int(plan.block_vis().sum(-1).max()) <= 32  # and no row reads more than the budget


def test_quest_selects_the_same_pages_when_its_rows_are_ranked_in_blocks():
    """Quest ranks pages for 512 rows at a time (small temporaries at long T): the same selection as one pass."""
    from pikv_train.cache.policies.quest import page_bounds

    t, page = 1100, 4
    pol = build_policy(CacheConfig(policy="quest", budget=32, page_size=page, quest_dense_layers=0),
                       ModelConfig(n_layer=1, n_head=2, n_kv_head=1, d_model=16, max_seq_len=t))
    q, k = torch.randn(1, 2, t, 8), torch.randn(1, 1, t, 8)
    kp = torch.nn.functional.pad(k, (0, 0, 0, -t % page)).view(1, 1, -1, page, 8)
    one_pass = pol._select(page_bounds(q.view(1, 1, 2, t, 8), kp.amin(3), kp.amax(3)), 0, 32 // page - 1)
    assert torch.equal(pol.page_selection(q, k, 32), one_pass)
    assert int(one_pass.sum(-1).max()) == 32 // page


def test_blocks_attended_in_several_checkpointed_groups_give_the_same_outputs_and_gradients():
    """Long sequences run the blocks in groups (bounded temporaries), each checkpointed: equal to one group."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, h, 40, 8, generator=g, requires_grad=True) for h in (4, 2, 2))
    pol = _policy("h2o", _cfg(), None)
    plan = pol.block_plan(q.detach() * 4, k.detach() * 4, AttentionContext(2, torch.arange(40).expand(2, 40)),
                          pol.budget_tokens())
    w = torch.randn(2, 4, 40, 8, generator=g)
    got = []
    for max_elems in (1 << 30, 300):  # one group; a group per block
        y = blocks.block_attend(q, k, v, plan, max_elems=max_elems)
        got.append((y.detach(), *torch.autograd.grad((y * w).sum(), (q, k, v))))
    assert plan.rows.shape[0] > 2
    for a, b in zip(*got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 * float(a.abs().max()))


def test_cpu_flash_function_equals_checkpointed_sdpa_with_padding_rows_and_groups(monkeypatch):
    """On CPU the blocks run as one autograd function over the flash kernel (no second forward in the backward);
    it equals the checkpointed SDPA path other devices take, with padding rows (the last block is short: their
    outputs are dropped, and nothing flows back to row 0 through them) and several groups."""
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, h, T, 8, generator=g, requires_grad=True) for h in (4, 2, 2))
    pol = _policy("lru_plus", _cfg(), None)
    plan = pol.block_plan(q.detach() * 4, k.detach() * 4, AttentionContext(2, torch.arange(T).expand(2, T)),
                          pol.budget_tokens())
    assert (plan.rows < 0).any()  # padding rows exist
    w = torch.randn(2, 4, T, 8, generator=g)
    got = {}
    for flash in (True, False):
        monkeypatch.setattr(blocks, "_cpu_flash", lambda q, flash=flash: flash)
        for max_elems in (1 << 30, 500):
            y = blocks.block_attend(q, k, v, plan, max_elems=max_elems)
            names, todo = set(), [y.grad_fn]
            while todo:
                fn = todo.pop()
                if fn is not None:
                    names.add(type(fn).__name__)
                    todo += [f for f, _ in fn.next_functions]
            assert ("_BlockFlashBackward" in names) == flash
            got[flash, max_elems] = (y.detach(), *torch.autograd.grad((y * w).sum(), (q, k, v)))
    ref = got[False, 1 << 30]
    for key, val in got.items():
        for a, b in zip(ref, val):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 * float(a.abs().max()))
