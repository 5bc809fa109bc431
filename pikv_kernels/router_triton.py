"""Triton-fused router: forward and backward kernels plus the autograd wrapper.

Computes exactly :func:`pikv_kernels.router_reference.router_reference` (read its docstring for the math).

* ``_router_fwd``: one program per block of ``BLOCK_T`` tokens. Gate GEMM ``x W^T`` with ``tl.dot`` over
  d (fp32 accumulate; exact ``ieee`` fp32 for fp32 inputs), row max / logsumexp / softmax (or sigmoid),
  bias, group limit, iterative top-k (ties to the lower index), renormalisation and scale; stores ids,
  weights, logits (fp32, for the backward) and lse, and per-block partial sums of P and of expert counts
  (reduced afterwards with ``torch.sum``: deterministic, no atomics).
* ``_router_bwd_dx``: one program per token block. Rebuilds p from logits and lse, forms dlogits from the
  combine-weight gradient (through renormalisation and softmax / sigmoid), the Switch term
  ``g_aux * aux_weight * E * f_i / N`` on P and the z-loss term ``g_z * z_weight * 2 lse_t / N * p_t``;
  stores dlogits and immediately computes its dX tile ``dlogits @ W``.
* ``_router_bwd_dw``: grid (d blocks, SPLIT); each program sums ``x^T dlogits`` over a fixed contiguous
  token range; the SPLIT partials are reduced by ``torch.sum`` (deterministic).

On CPU the kernels run only under ``TRITON_INTERPRET=1`` (set before triton is imported), in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from pikv_kernels.router_reference import FusedRouterOutput, check_args


@triton.jit
def _router_fwd(
    X, W, BIAS, LOGITS, LSE, IDS, WTS, PSUM, CNT,
    N, D, E, stride_xn, stride_xd, stride_we, stride_wd, route_scale,
    K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, NORMALIZE: tl.constexpr,
    N_GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_G: tl.constexpr,
    FP32: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < N
    cmask = cols < E
    # ---- gate GEMM: (BLOCK_T, d) @ (d, BLOCK_E), fp32 accumulate
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        x = tl.load(X + rows[:, None] * stride_xn + dd[None, :] * stride_xd,
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        w = tl.load(W + cols[None, :] * stride_we + dd[:, None] * stride_wd,
                    mask=cmask[None, :] & dmask[:, None], other=0.0)
        if FP32:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    neg_inf = float("-inf")
    logits = tl.where(cmask[None, :], acc, neg_inf)
    # ---- softmax / logsumexp (per row, in registers)
    m = tl.max(logits, 1)
    ex = tl.exp(logits - m[:, None])
    ssum = tl.sum(ex, 1)
    lse = m + tl.log(ssum)
    p = ex / ssum[:, None]
    if SIGMOID:
        s = tl.where(cmask[None, :], 1.0 / (1.0 + tl.exp(-acc)), 0.0)
        bal = s / tl.maximum(tl.sum(s, 1), 1e-20)[:, None]
    else:
        s = p
        bal = p
    sel = s
    if HAS_BIAS:
        b = tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)
        sel = sel + b[None, :]
    sel = tl.where(cmask[None, :], sel, neg_inf)
    # ---- group limit: keep the TOPK_GROUPS groups with the largest top-2 sums
    if N_GROUPS > 1:
        gcols = tl.arange(0, BLOCK_G)
        gid = cols // GROUP_SIZE
        gscore = tl.full((BLOCK_T, BLOCK_G), neg_inf, tl.float32)
        for g in tl.static_range(N_GROUPS):
            v = tl.where((gid == g)[None, :] & cmask[None, :], sel, neg_inf)
            m1 = tl.max(v, 1)
            if GROUP_SIZE > 1:
                i1 = tl.min(tl.where(v == m1[:, None], cols[None, :], BLOCK_E), 1)
                m2 = tl.max(tl.where(cols[None, :] == i1[:, None], neg_inf, v), 1)
                gs = m1 + m2
            else:
                gs = m1
            gscore = tl.where(gcols[None, :] == g, gs[:, None], gscore)
        kept = tl.zeros((BLOCK_T, BLOCK_G), dtype=tl.int32)
        for j in tl.static_range(TOPK_GROUPS):
            gm = tl.max(gscore, 1)
            gi = tl.min(tl.where(gscore == gm[:, None], gcols[None, :], BLOCK_G), 1)
            ghit = gcols[None, :] == gi[:, None]
            kept = tl.where(ghit, 1, kept)
            gscore = tl.where(ghit, neg_inf, gscore)
        keep_e = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int32)
        for g in tl.static_range(N_GROUPS):
            kg = tl.sum(tl.where(gcols[None, :] == g, kept, 0), 1)
            keep_e = tl.where((gid == g)[None, :], kg[:, None] + keep_e * 0, keep_e)
        sel = tl.where(keep_e > 0, sel, neg_inf)
    # ---- iterative top-k, ties to the lower expert index
    kcols = tl.arange(0, BLOCK_K)
    ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    wts = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    chosen = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for j in tl.static_range(K):
        mx = tl.max(sel, 1)
        idx = tl.min(tl.where(sel == mx[:, None], cols[None, :], BLOCK_E), 1)
        hit = cols[None, :] == idx[:, None]
        val = tl.sum(tl.where(hit, s, 0.0), 1)
        ids = tl.where(kcols[None, :] == j, idx[:, None], ids)
        wts = tl.where(kcols[None, :] == j, val[:, None], wts)
        chosen = tl.where(hit, 1.0, chosen)
        sel = tl.where(hit, neg_inf, sel)
    if NORMALIZE:
        wts = wts / tl.maximum(tl.sum(wts, 1), 1e-20)[:, None]
    wts = wts * route_scale
    # ---- stores
    kmask = rmask[:, None] & (kcols[None, :] < K)
    tl.store(IDS + rows[:, None] * K + kcols[None, :], ids.to(tl.int64), mask=kmask)
    tl.store(WTS + rows[:, None] * K + kcols[None, :], wts, mask=kmask)
    tl.store(LOGITS + rows[:, None] * E + cols[None, :], acc, mask=rmask[:, None] & cmask[None, :])
    tl.store(LSE + rows, lse, mask=rmask)
    tl.store(PSUM + pid * E + cols, tl.sum(tl.where(rmask[:, None], bal, 0.0), 0), mask=cmask)
    tl.store(CNT + pid * E + cols, tl.sum(tl.where(rmask[:, None], chosen, 0.0), 0), mask=cmask)


@triton.jit
def _router_bwd_dx(
    LOGITS, LSE, IDS, WTS, DWTS, COEF, ZC, DLOGITS, W, DX,
    N, D, E, stride_we, stride_wd, stride_dxn, stride_dxd, route_scale,
    K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    SIGMOID: tl.constexpr, NORMALIZE: tl.constexpr, FP32: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    kcols = tl.arange(0, BLOCK_K)
    rmask = rows < N
    cmask = cols < E
    m2 = rmask[:, None] & cmask[None, :]
    kmask = rmask[:, None] & (kcols[None, :] < K)
    logits = tl.load(LOGITS + rows[:, None] * E + cols[None, :], mask=m2, other=0.0)
    lse = tl.load(LSE + rows, mask=rmask, other=0.0)
    p = tl.where(cmask[None, :], tl.exp(logits - lse[:, None]), 0.0)
    if SIGMOID:
        s = tl.where(cmask[None, :], 1.0 / (1.0 + tl.exp(-logits)), 0.0)
    else:
        s = p
    ids = tl.load(IDS + rows[:, None] * K + kcols[None, :], mask=kmask, other=-1).to(tl.int32)
    w = tl.load(WTS + rows[:, None] * K + kcols[None, :], mask=kmask, other=0.0)
    dw = tl.load(DWTS + rows[:, None] * K + kcols[None, :], mask=kmask, other=0.0)
    # ---- d(score) from the combine weights w_j = c * s_j / S (or c * s_j)
    ds = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    if NORMALIZE:
        ssel = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for j in tl.static_range(K):
            id_j = tl.sum(tl.where(kcols[None, :] == j, ids, 0), 1)
            ssel += tl.sum(tl.where(cols[None, :] == id_j[:, None], s, 0.0), 1)
        ssel = tl.maximum(ssel, 1e-20)
        a = tl.sum(dw * w, 1)
        for j in tl.static_range(K):
            id_j = tl.sum(tl.where(kcols[None, :] == j, ids, 0), 1)
            dw_j = tl.sum(tl.where(kcols[None, :] == j, dw, 0.0), 1)
            g = (route_scale * dw_j - a) / ssel
            ds += tl.where(cols[None, :] == id_j[:, None], g[:, None], 0.0)
    else:
        for j in tl.static_range(K):
            id_j = tl.sum(tl.where(kcols[None, :] == j, ids, 0), 1)
            dw_j = tl.sum(tl.where(kcols[None, :] == j, dw, 0.0), 1)
            ds += tl.where(cols[None, :] == id_j[:, None], (route_scale * dw_j)[:, None], 0.0)
    # ---- Switch term on the balance distribution, then through the score function; z-loss on softmax
    coef = tl.load(COEF + cols, mask=cmask, other=0.0)
    zc = tl.load(ZC)
    if SIGMOID:
        tot = tl.maximum(tl.sum(s, 1), 1e-20)
        q = s / tot[:, None]
        ds += (coef[None, :] - tl.sum(coef[None, :] * q, 1)[:, None]) / tot[:, None]
        dl = ds * s * (1.0 - s)
    else:
        dp = ds + coef[None, :]
        dl = p * (dp - tl.sum(p * dp, 1)[:, None])
    dl += zc * lse[:, None] * p
    dl = tl.where(m2, dl, 0.0)
    tl.store(DLOGITS + rows[:, None] * E + cols[None, :], dl, mask=m2)
    # ---- dX tile = dlogits @ W
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        wt = tl.load(W + cols[:, None] * stride_we + dd[None, :] * stride_wd,
                     mask=cmask[:, None] & dmask[None, :], other=0.0)
        if FP32:
            dx = tl.dot(dl, wt.to(tl.float32), input_precision="ieee")
        else:
            dx = tl.dot(dl.to(tl.bfloat16), wt.to(tl.bfloat16))
        tl.store(DX + rows[:, None] * stride_dxn + dd[None, :] * stride_dxd, dx.to(DX.dtype.element_ty),
                 mask=rmask[:, None] & dmask[None, :])


@triton.jit
def _router_bwd_dw(
    X, DLOGITS, DWP, N, D, E, stride_xn, stride_xd, tokens_per_split,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, FP32: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cols = tl.arange(0, BLOCK_E)
    dmask = dd < D
    cmask = cols < E
    acc = tl.zeros((BLOCK_D, BLOCK_E), dtype=tl.float32)
    start = pid_s * tokens_per_split
    for t0 in range(start, start + tokens_per_split, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        rmask = rows < N
        xt = tl.load(X + rows[None, :] * stride_xn + dd[:, None] * stride_xd,
                     mask=dmask[:, None] & rmask[None, :], other=0.0)  # (BLOCK_D, BLOCK_T)
        dl = tl.load(DLOGITS + rows[:, None] * E + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        if FP32:
            acc += tl.dot(xt.to(tl.float32), dl, input_precision="ieee")
        else:
            acc += tl.dot(xt.to(tl.bfloat16), dl.to(tl.bfloat16))
    # partial (SPLIT, E, D)
    tl.store(DWP + pid_s * E * D + cols[None, :] * D + dd[:, None], acc, mask=dmask[:, None] & cmask[None, :])


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def _blocks(x: Tensor) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_D): small under the interpreter (CPU), GEMM-sized on GPU."""
    return (16, 32) if x.device.type == "cpu" else (64, 64)


def _warps(x: Tensor) -> int:
    # Several (BLOCK_T, BLOCK_E) fp32 tiles live at once in the epilogue: 8 warps keep them in registers.
    return 4 if x.device.type == "cpu" else 8


class _FusedRouterFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, top_k, score_fn, n_groups, topk_groups, normalize, route_scale,
                aux_weight, z_weight):
        n, d = x.shape
        e = weight.shape[0]
        block_t, block_d = _blocks(x)
        block_e = _pow2(e)
        n_blocks = triton.cdiv(n, block_t)
        dev = x.device
        logits = torch.empty(n, e, device=dev, dtype=torch.float32)
        lse = torch.empty(n, device=dev, dtype=torch.float32)
        ids = torch.empty(n, top_k, device=dev, dtype=torch.int64)
        wts = torch.empty(n, top_k, device=dev, dtype=torch.float32)
        psum = torch.empty(n_blocks, e, device=dev, dtype=torch.float32)
        cnt = torch.empty(n_blocks, e, device=dev, dtype=torch.float32)
        fp32 = x.dtype == torch.float32
        _router_fwd[(n_blocks,)](
            x, weight, bias if bias is not None else lse, logits, lse, ids, wts, psum, cnt,
            n, d, e, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), float(route_scale),
            K=top_k, BLOCK_K=_pow2(top_k, 2), BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_E=block_e,
            SIGMOID=score_fn == "sigmoid", HAS_BIAS=bias is not None, NORMALIZE=normalize,
            N_GROUPS=n_groups, TOPK_GROUPS=topk_groups, GROUP_SIZE=e // n_groups, BLOCK_G=_pow2(n_groups, 1),
            FP32=fp32, num_warps=_warps(x),
        )
        counts = cnt.sum(0)
        prob_sum = psum.sum(0)
        f = counts / counts.sum().clamp_min(1.0)
        aux = aux_weight * e * (f * prob_sum / n).sum()
        z = z_weight * (lse * lse).mean()
        ctx.save_for_backward(x, weight, logits, lse, ids, wts, counts)
        ctx.cfg = (top_k, score_fn, normalize, route_scale, aux_weight, z_weight)
        ctx.mark_non_differentiable(ids, logits, lse, counts, prob_sum)
        return wts, aux, z, ids, logits, lse, counts, prob_sum

    @staticmethod
    def backward(ctx, dwts, daux, dz, *_):
        x, weight, logits, lse, ids, wts, counts = ctx.saved_tensors
        top_k, score_fn, normalize, route_scale, aux_weight, z_weight = ctx.cfg
        n, d = x.shape
        e = weight.shape[0]
        block_t, block_d = _blocks(x)
        block_e = _pow2(e)
        dev = x.device
        dwts = torch.zeros_like(wts) if dwts is None else dwts.float().contiguous()
        daux = torch.zeros((), device=dev) if daux is None else daux.float()
        dz = torch.zeros((), device=dev) if dz is None else dz.float()
        coef = (daux * aux_weight * e / n) * counts / counts.sum().clamp_min(1.0)  # (E,)
        zc = (dz * z_weight * 2.0 / n).reshape(1)
        dlogits = torch.empty(n, e, device=dev, dtype=torch.float32)
        dx = torch.empty_like(x)
        fp32 = x.dtype == torch.float32
        _router_bwd_dx[(triton.cdiv(n, block_t),)](
            logits, lse, ids, wts, dwts, coef.contiguous(), zc, dlogits, weight, dx,
            n, d, e, weight.stride(0), weight.stride(1), dx.stride(0), dx.stride(1), float(route_scale),
            K=top_k, BLOCK_K=_pow2(top_k, 2), BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_E=block_e,
            SIGMOID=score_fn == "sigmoid", NORMALIZE=normalize, FP32=fp32, num_warps=_warps(x),
        )
        n_tb = triton.cdiv(n, block_t)
        split = max(1, min(8 if x.device.type != "cpu" else 2, n_tb))
        tokens_per_split = triton.cdiv(n_tb, split) * block_t
        dwp = torch.empty(split, e, d, device=dev, dtype=torch.float32)
        _router_bwd_dw[(triton.cdiv(d, block_d), split)](
            x, dlogits, dwp, n, d, e, x.stride(0), x.stride(1), tokens_per_split,
            BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_E=block_e, FP32=fp32, num_warps=_warps(x),
        )
        dweight = dwp.sum(0).to(weight.dtype)
        return dx, dweight, None, None, None, None, None, None, None, None, None


def router_triton(
    x: Tensor,
    weight: Tensor,
    top_k: int,
    *,
    score_fn: str = "softmax",
    bias: Tensor | None = None,
    n_groups: int = 1,
    topk_groups: int = 1,
    normalize: bool = True,
    route_scale: float = 1.0,
    aux_weight: float = 0.0,
    z_weight: float = 0.0,
) -> FusedRouterOutput:
    """The fused router (same signature and outputs as ``router_reference``)."""
    check_args(x, weight, top_k, score_fn, n_groups, topk_groups)
    if x.shape[0] == 0:
        from pikv_kernels.router_reference import router_reference

        return router_reference(x, weight, top_k, score_fn=score_fn, bias=bias, n_groups=n_groups,
                                topk_groups=topk_groups, normalize=normalize, route_scale=route_scale,
                                aux_weight=aux_weight, z_weight=z_weight)
    x = x.contiguous()
    weight_c = weight.contiguous()
    b = None if bias is None else bias.detach().float().contiguous()
    wts, aux, z, ids, logits, lse, counts, prob_sum = _FusedRouterFn.apply(
        x, weight_c, b, top_k, score_fn, n_groups, topk_groups, normalize, route_scale, aux_weight, z_weight)
    return FusedRouterOutput(ids=ids, weights=wts, logits=logits, lse=lse, counts=counts, prob_sum=prob_sum,
                             aux=aux, z=z)
