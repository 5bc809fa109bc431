"""Pure-PyTorch reference of exactly what the fused Triton router computes (kernels/router_triton.py).

For tokens x (N, d) and gate weight W (E, d):

1. ``r = x W^T`` in fp32 (the kernel accumulates in fp32; fp32 inputs use an exact fp32 GEMM);
   ``lse_t = logsumexp(r_t)``; ``p = softmax(r)``.
2. scores ``s`` = p (``softmax``) or ``sigmoid(r)`` (``sigmoid``); balance distribution ``P`` = p, or
   ``s / sum(s)`` for sigmoid.
3. selection score ``s + bias`` (bias optional, selection only); with ``n_groups > 1`` the group limit:
   group score = sum of the group's top-2 selection scores (top-1 for groups of one expert), keep the best
   ``topk_groups`` groups (ties to the lower group index), mask the others to -inf.
4. iterative top-k: k times take the largest selection score, ties to the **lower** expert index, mask it.
5. weights = the chosen *unbiased* scores, divided by their sum if ``normalize``, times ``route_scale``.
6. statistics: ``counts`` (E,) assignments per expert, ``prob_sum`` (E,) = sum_t P_t.
7. losses: ``aux = aux_weight * E * sum_i (counts_i / sum(counts)) * (prob_sum_i / N)`` (Switch; f has no
   gradient) and ``z = z_weight * mean_t lse_t^2``.

Gradients flow from ``weights``, ``aux`` and ``z`` into x and W (ids, counts, logits, lse are constants).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class FusedRouterOutput:
    """ids (N, k) int64 (selection order); weights (N, k) fp32; logits (N, E) fp32 (no grad); lse (N,) (no
    grad); counts (E,) fp32; prob_sum (E,) fp32; aux, z: scalar weighted losses (with grad)."""

    ids: Tensor
    weights: Tensor
    logits: Tensor
    lse: Tensor
    counts: Tensor
    prob_sum: Tensor
    aux: Tensor
    z: Tensor


def check_args(x: Tensor, weight: Tensor, top_k: int, score_fn: str, n_groups: int, topk_groups: int) -> None:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"need x (N, d) and weight (E, d), got {tuple(x.shape)} and {tuple(weight.shape)}")
    e = weight.shape[0]
    if score_fn not in ("softmax", "sigmoid"):
        raise ValueError(f"score_fn must be 'softmax' or 'sigmoid', got {score_fn!r}")
    if n_groups < 1 or e % n_groups or not 1 <= topk_groups <= n_groups:
        raise ValueError(f"bad groups: n_groups={n_groups}, topk_groups={topk_groups}, E={e}")
    if not 1 <= top_k <= topk_groups * (e // n_groups):
        raise ValueError(f"top_k={top_k} does not fit in {topk_groups} groups of {e // n_groups} experts")


def argmax_lowest(v: Tensor) -> Tensor:
    """Row argmax with ties to the lower index (torch.argmax returns the first maximal index)."""
    return torch.argmax(v, dim=-1)


def iterative_topk(v: Tensor, k: int) -> Tensor:
    """(N, E) -> (N, k) ids of the k largest values, ties to the lower index, in selection order."""
    v = v.clone()
    ids = []
    for _ in range(k):
        i = argmax_lowest(v)
        ids.append(i)
        v.scatter_(-1, i[:, None], float("-inf"))
    return torch.stack(ids, -1) if ids else v.new_zeros(v.shape[0], 0, dtype=torch.long)


def group_limit_reference(sel: Tensor, n_groups: int, topk_groups: int) -> Tensor:
    """Mask experts outside each row's best ``topk_groups`` groups (group score = sum of top-2) to -inf."""
    n, e = sel.shape
    g = sel.view(n, n_groups, e // n_groups)
    gs = g.topk(min(2, e // n_groups), dim=-1).values.sum(-1)  # values only: tie order is irrelevant
    kept = torch.zeros_like(gs, dtype=torch.bool).scatter_(-1, iterative_topk(gs, topk_groups), True)
    return g.masked_fill(~kept[..., None], float("-inf")).view(n, e)


def router_reference(
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
    """The fused router's math in eager PyTorch (see module docstring). Differentiable in x and weight."""
    check_args(x, weight, top_k, score_fn, n_groups, topk_groups)
    n, e = x.shape[0], weight.shape[0]
    with torch.autocast(device_type=x.device.type, enabled=False):
        logits = x.float() @ weight.float().t()  # (N, E)
    lse = torch.logsumexp(logits, -1)
    p = torch.softmax(logits, -1)
    if score_fn == "softmax":
        s, bal = p, p
    else:
        s = torch.sigmoid(logits)
        bal = s / s.sum(-1, keepdim=True).clamp_min(1e-20)
    sel = s.detach() if bias is None else s.detach() + bias.detach().float()
    if n_groups > 1:
        sel = group_limit_reference(sel, n_groups, topk_groups)
    ids = iterative_topk(sel, top_k)
    chosen = s.gather(-1, ids)
    if normalize:
        chosen = chosen / chosen.sum(-1, keepdim=True).clamp_min(1e-20)
    weights = chosen * route_scale
    counts = torch.zeros(e, device=x.device, dtype=torch.float32).index_add_(
        0, ids.reshape(-1), torch.ones(ids.numel(), device=x.device))
    prob_sum = bal.sum(0)
    f = counts / counts.sum().clamp_min(1.0)
    aux = aux_weight * e * (f * prob_sum / max(n, 1)).sum()
    z = z_weight * (lse**2).mean() if n else lse.sum() * 0.0
    return FusedRouterOutput(ids=ids, weights=weights, logits=logits.detach(), lse=lse.detach(), counts=counts,
                             prob_sum=prob_sum.detach(), aux=aux, z=z)
