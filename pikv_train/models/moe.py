"""Mixture-of-Experts feed-forward with sparse, sort-based dispatch.

Tokens are grouped by expert with ``argsort`` + ``bincount`` (never a dense (T x E x capacity) one-hot
tensor). Every expert is called on every step, with an empty slice when it received no tokens, so each
expert parameter takes part in autograd and DDP needs no ``find_unused_parameters``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pikv_train.models.config import MoEConfig
from pikv_train.models.layers import SwiGLU
from pikv_train.routing import RouterOutput, build_router


class MoEFeedForward(nn.Module):
    """Router -> dispatch -> SwiGLU experts -> weighted combine (+ optional shared expert)."""

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = build_router(cfg.router, d_model, cfg.n_experts)
        self.experts = nn.ModuleList(SwiGLU(d_model, cfg.d_expert) for _ in range(cfg.n_experts))
        self.shared = SwiGLU(d_model, cfg.d_expert) if cfg.shared_expert else None

    def forward(self, x: Tensor, importance_target: Tensor | None = None) -> tuple[Tensor, RouterOutput]:
        """x (B, T, d) -> (y (B, T, d), routing decisions for the B*T tokens).

        importance_target: (B, T) detached attention mass per token, for routers with an importance head
        (PiKVRouter); its regression loss joins the router's losses.
        """
        b, t, d = x.shape
        xf = x.reshape(b * t, d)  # (N, d)
        r = self.router(xf)
        if importance_target is not None and "importance" in r.extras:
            r.losses["importance"] = self.router.importance_loss(r.extras["importance"], importance_target.reshape(-1))
        k = r.ids.shape[1]
        token_idx = torch.arange(b * t, device=x.device).unsqueeze(1).expand(-1, k)[r.valid]  # (A,)
        expert_idx = r.ids[r.valid]  # (A,)
        weight = r.weights[r.valid]  # (A,)
        order = torch.argsort(expert_idx, stable=True)
        counts = torch.bincount(expert_idx, minlength=self.cfg.n_experts).tolist()
        tok_sorted = token_idx[order]
        chunks = xf[tok_sorted].split(counts)  # one (n_i, d) slice per expert, possibly empty
        y_sorted = torch.cat([expert(c) for expert, c in zip(self.experts, chunks)], dim=0)  # (A, d)
        y_sorted = y_sorted * weight[order].unsqueeze(1).to(y_sorted.dtype)
        y = torch.zeros_like(xf).index_add_(0, tok_sorted, y_sorted.to(xf.dtype))
        if self.shared is not None:
            y = y + self.shared(xf)
        return y.view(b, t, d), r
