"""Mixture-of-Experts feed-forward with sparse, sort-based dispatch.

Tokens are grouped by expert with ``argsort`` + ``bincount`` (never a dense (T x E x capacity) one-hot
tensor). Every expert is called on every step, with an empty slice when it received no tokens, so each
expert parameter takes part in autograd and DDP needs no ``find_unused_parameters``.

Expert capacity (``router.capacity_factor``) is counted per sequence against the model's ``max_seq_len``
and is causal (``pikv_train.routing.capacity``). In token-by-token decoding the layer continues each
sequence's queues from earlier steps: the state lives in the inference cache's ``extra`` dict under
``("moe_capacity", layer_idx)``, never on the module.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pikv_train.models.config import MoEConfig
from pikv_train.models.layers import SwiGLU
from pikv_train.routing import RouterOutput, build_router


class MoEFeedForward(nn.Module):
    """Router -> dispatch -> SwiGLU experts -> weighted combine (+ optional shared expert)."""

    def __init__(self, d_model: int, cfg: MoEConfig, max_seq_len: int | None = None):
        super().__init__()
        self.cfg = cfg
        # max_seq_len: the fixed reference length of the expert capacity (RouterConfig.capacity_factor).
        self.router = build_router(cfg.router, d_model, cfg.n_experts, max_seq_len=max_seq_len)
        self.experts = nn.ModuleList(SwiGLU(d_model, cfg.d_expert) for _ in range(cfg.n_experts))
        self.shared = SwiGLU(d_model, cfg.d_expert) if cfg.shared_expert else None

    def forward(
        self,
        x: Tensor,
        importance_target: Tensor | None = None,
        *,
        positions: Tensor | None = None,
        state: dict | None = None,
        layer_idx: int = 0,
        incremental: bool = False,
    ) -> tuple[Tensor, RouterOutput]:
        """x (B, T, d) -> (y (B, T, d), routing decisions for the B*T tokens).

        Args:
            importance_target: (B, T) detached attention mass per token, for routers with an importance
                head (PiKVRouter); its regression loss joins the router's losses.
            positions: (B, T) absolute positions, -1 for left padding (holds no expert capacity).
            state: the inference cache's ``extra`` dict (decoding), where the capacity state is kept.
            layer_idx: this layer's index (the key of its state).
            incremental: x continues earlier calls of the same sequences (decoding with a cache).
        """
        b, t, d = x.shape
        xf = x.reshape(b * t, d)  # (N, d)
        cap_state = None
        if incremental and self.router.cfg.capacity_factor is not None:
            if state is None:
                raise ValueError(
                    "expert capacity (capacity_factor) in cached decoding keeps per-sequence counts in the "
                    "cache's `extra` dict, and this cache has none; use pikv_train.cache.KVCache (or a "
                    "subclass) or set capacity_factor: null"
                )
            key = ("moe_capacity", layer_idx)
            if key not in state:
                state[key] = self.router.new_capacity_state()
            cap_state = state[key]
        pos = None if positions is None else positions.expand(b, t)
        r = self.router(xf, n_seq=b, positions=pos, capacity_state=cap_state)
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
