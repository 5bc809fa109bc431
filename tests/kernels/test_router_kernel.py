"""Fused Triton router == PyTorch reference under TRITON_INTERPRET=1 (fp32): ids identical, weights <= 1e-6,
gradients of x and W through the weights, the Switch loss and the z-loss <= 1e-5 (SPEC §2), both relative to
the magnitude compared (max |reference|): fp32 rounding of the GEMMs differs between processors."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first `import triton`

import pytest
import torch

triton = pytest.importorskip("triton")

from helpers import assert_close_rel  # noqa: E402

from pikv_kernels import fused_router, resolve_router_kernel  # noqa: E402
from pikv_kernels.router_reference import router_reference  # noqa: E402
from pikv_kernels.router_triton import router_triton  # noqa: E402
from pikv_train.routing import (  # noqa: E402
    AdaptiveRouter,
    BaseRouter,
    EPLBRouter,
    HierarchicalRouter,
    PiKVRouter,
    RouterConfig,
    TopKBalancedRouter,
)

CASES = [
    # (N, d, E, k, options): ragged N and d, E not a power of two, every option of the kernel.
    (37, 24, 6, 2, {}),
    (50, 40, 12, 3, dict(score_fn="sigmoid", bias=True, n_groups=4, topk_groups=2, route_scale=2.5)),
    (16, 16, 5, 5, dict(normalize=False)),
    (33, 20, 10, 4, dict(n_groups=5, topk_groups=2)),
    (1, 8, 3, 1, dict(score_fn="sigmoid")),
    (70, 48, 16, 4, dict(bias=True)),
]


def _run(fn, x, w, g, k, opts):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    out = fn(x, w, k, aux_weight=0.1, z_weight=0.01, **opts)
    ((out.weights * g).sum() + out.aux + out.z).backward()
    return out, x.grad, w.grad


@pytest.mark.parametrize("n,d,e,k,opts", CASES)
def test_triton_matches_reference(n, d, e, k, opts):
    gen = torch.Generator().manual_seed(n * 1000 + e)
    x = torch.randn(n, d, generator=gen)
    w = torch.randn(e, d, generator=gen) * 0.3
    opts = dict(opts)
    if opts.pop("bias", False):
        opts["bias"] = torch.randn(e, generator=gen) * 0.1
    g = torch.randn(n, k, generator=gen)
    ref, rx, rw = _run(router_reference, x, w, g, k, opts)
    tri, tx, tw = _run(router_triton, x, w, g, k, opts)
    assert torch.equal(tri.ids, ref.ids)
    assert_close_rel(tri.weights, ref.weights, 1e-6)
    torch.testing.assert_close(tri.counts, ref.counts, atol=0, rtol=0)
    assert_close_rel(tri.prob_sum, ref.prob_sum, 1e-5)  # a sum over N tokens
    assert_close_rel(tri.lse, ref.lse, 1e-6)  # |lse| ~ 5: atol=1e-6 failed on another processor (1.43e-6)
    assert_close_rel(tri.aux, ref.aux, 1e-6)
    assert_close_rel(tri.z, ref.z, 1e-6)
    assert_close_rel(tx, rx, 1e-5)
    assert_close_rel(tw, rw, 1e-5)


@pytest.mark.parametrize("term", ["aux", "z"])
def test_loss_gradients_alone(term):
    # Each loss term's gradient on its own (tiny values, so compare relative to their scale).
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(40, 16, generator=gen), torch.randn(7, 16, generator=gen)
    grads = []
    for fn in (router_reference, router_triton):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        getattr(fn(xx, ww, 2, aux_weight=1.0, z_weight=1.0), term).backward()
        grads.append((xx.grad, ww.grad))
    (rx, rw), (tx, tw) = grads
    assert rx.abs().max() > 1e-4
    # Each term's gradient alone is ~1e-2 and made of partially cancelling terms (f_i - sum_j p_j f_j): fp32
    # rounding reaches ~5e-6 of its max, so 3e-5 of it (the former absolute 1e-6 allowed ~8e-5).
    assert_close_rel(tx, rx, 3e-5)
    assert_close_rel(tw, rw, 3e-5)


def test_ties_go_to_the_lower_index_and_deterministic():
    # x = identity rows, W = logits^T: exact ties in the logits.
    logits = torch.tensor([[1.0, 2.0, 2.0, 0.5, 2.0], [0.0, 0.0, 0.0, 0.0, 0.0], [3.0, 1.0, 3.0, 3.0, 1.0]])
    x, w = torch.eye(3), logits.t().contiguous()
    for fn in (router_reference, router_triton):
        assert fn(x, w, 3).ids.tolist() == [[1, 2, 4], [0, 1, 2], [0, 2, 3]]
    a = router_triton(x, w, 3)
    b = router_triton(x, w, 3)
    assert torch.equal(a.weights, b.weights) and torch.equal(a.counts, b.counts)


FIXED_K = [
    (BaseRouter, {}),
    (TopKBalancedRouter, {}),
    (EPLBRouter, {}),
    (EPLBRouter, dict(score_fn="sigmoid", n_groups=8, topk_groups=4)),
    (HierarchicalRouter, dict(n_groups=8, topk_groups=4)),
    (HierarchicalRouter, dict(score_fn="sigmoid", n_groups=8, topk_groups=2)),
]


@pytest.mark.parametrize("cls,cfg", FIXED_K)
def test_all_zero_input_routes_to_the_lowest_experts_everywhere(cls, cfg):
    # Issue 10: eager torch.topk picked [44, 41, ...] at E = 64, k = 8 while the kernel picks [0..7].
    r = cls(16, 64, RouterConfig(top_k=8, **cfg))
    x = torch.zeros(5, 16)
    for kernel in ("eager", "reference", "triton"):
        r.cfg.kernel = kernel
        assert r(x).ids.tolist() == [list(range(8))] * 5, kernel
    spec = r.fused_spec()
    assert router_reference(x, r.gate.weight, 8, **spec).ids.tolist() == [list(range(8))] * 5
    assert router_triton(x, r.gate.weight, 8, **spec).ids.tolist() == [list(range(8))] * 5


@pytest.mark.parametrize("cls", [AdaptiveRouter, PiKVRouter])
def test_dynamic_k_routers_break_ties_to_the_lowest_index(cls):
    r = cls(16, 64, RouterConfig(top_k=8, k_min=8))
    assert r(torch.zeros(3, 16)).ids.tolist() == [list(range(8))] * 3


def test_eager_ties_match_the_kernel_on_partial_ties():
    # Rows with ties inside the top-k, at its boundary, and none; x = identity rows, W = logits^T.
    logits = torch.tensor([[1.0, 2.0, 2.0, 0.5, 2.0, 0.0], [0.0] * 6, [3.0, 1.0, 3.0, 3.0, 1.0, 1.0],
                           [0.1, 0.7, 0.3, 0.6, 0.2, 0.5]])
    r = BaseRouter(4, 6, RouterConfig(top_k=3))
    with torch.no_grad():
        r.gate.weight.copy_(logits.t())
    ids = {}
    for kernel in ("eager", "reference", "triton"):
        r.cfg.kernel = kernel
        ids[kernel] = r(torch.eye(4)).ids.tolist()
    assert ids["eager"] == ids["reference"] == ids["triton"] == [[1, 2, 4], [0, 1, 2], [0, 2, 3], [1, 3, 5]]


@pytest.mark.parametrize(
    "cls,cfg",
    [
        (BaseRouter, {}),
        (TopKBalancedRouter, dict(capacity_factor=1.0)),
        (HierarchicalRouter, dict(score_fn="sigmoid", n_groups=3, topk_groups=2)),
        (EPLBRouter, dict(score_fn="sigmoid", route_scale=2.5, eplb_aux_loss_weight=1e-2, n_groups=3, topk_groups=2)),
    ],
)
def test_router_kernel_config_matches_eager(cls, cfg):
    torch.manual_seed(0)
    r = cls(16, 6, RouterConfig(top_k=2, **cfg))
    if isinstance(r, EPLBRouter):
        r.bias.copy_(torch.randn(6) * 0.05)
    x = torch.randn(29, 16)
    g = torch.randn(29, 2)  # a generic upstream gradient of the combine weights
    outs = {}
    for kernel in ("eager", "reference", "triton"):
        r.cfg.kernel = kernel
        r.zero_grad()
        xx = x.clone().requires_grad_()
        out = r(xx)
        ((out.weights * g).sum() + out.loss).backward()
        outs[kernel] = (out, xx.grad, r.gate.weight.grad.clone())
    e_out, e_dx, e_dw = outs["eager"]
    for kernel in ("reference", "triton"):
        out, dx, dw = outs[kernel]
        # Same experts in the same order as the eager router (ties to the lower index everywhere).
        assert torch.equal(out.ids, e_out.ids)
        assert torch.equal(out.valid, e_out.valid)
        assert_close_rel(out.weights, e_out.weights, 1e-6)
        assert_close_rel(out.loss, e_out.loss, 1e-6)
        torch.testing.assert_close(out.counts, e_out.counts)
        assert_close_rel(dx, e_dx, 1e-5)
        assert_close_rel(dw, e_dw, 1e-5)
        assert set(out.stats) >= {"dropped", "mean_k", "load_max_over_mean"}


def test_dispatch(monkeypatch):
    monkeypatch.delenv("PIKV_ROUTER_KERNEL", raising=False)
    assert resolve_router_kernel("auto", "cpu") == "eager"
    assert resolve_router_kernel("reference", "cpu") == "reference"
    assert resolve_router_kernel("triton", "cpu") == "triton"  # allowed: TRITON_INTERPRET=1 here
    monkeypatch.setenv("PIKV_ROUTER_KERNEL", "reference")
    assert resolve_router_kernel("auto", "cpu") == "reference"
    assert resolve_router_kernel("eager", "cpu") == "eager"  # config wins over the environment
    monkeypatch.setenv("PIKV_ROUTER_KERNEL", "bogus")
    with pytest.raises(ValueError, match="PIKV_ROUTER_KERNEL"):
        resolve_router_kernel("auto", "cpu")
    with pytest.raises(ValueError, match="router kernel"):
        resolve_router_kernel("cuda", "cpu")
    monkeypatch.delenv("PIKV_ROUTER_KERNEL")
    out = fused_router(torch.randn(5, 8), torch.randn(4, 8), 2, kernel="triton")
    assert out.ids.shape == (5, 2)
    empty = router_triton(torch.zeros(0, 8), torch.randn(4, 8), 2)
    assert empty.ids.shape == (0, 2) and empty.counts.sum() == 0
