"""Importance-aware router (the PiKV idea): a learned per-token importance decides how many experts it uses.

Rule (SPEC §2): ``s_t = sigmoid(w·x_t + b)`` from the router's own importance head (nn.Linear(d, 1), fp32);
``k_t = top_k`` if ``s_t >= importance_threshold`` else ``k_min``. The experts are the top ``k_t`` of
``p = softmax(r)``; weights are renormalised over the chosen ``k_t`` (``normalize_weights=False``: raw p).
Losses: Switch loss over the actual assignments (f_i over ``sum_t k_t``) + z-loss.

The importance head is trained to predict the attention mass token t *receives*
(:meth:`PiKVRouter.attention_mass_target`), through :meth:`PiKVRouter.importance_loss`, which the caller
adds once the attention layer has produced the target. The target is detached, and the selection uses
only ``s_t`` computed from ``x_t``, so routing stays causal at inference even though the target is built
from later queries' attention. The hard choice of k sends no gradient to the importance head; only the
importance loss trains it.

``RouterOutput.extras``: ``importance`` (N,) fp32 with grad, ``k`` (N,) int64 experts per token (the KV
shard count for §3). ``stats``: ``importance`` (mean s), ``frac_k_max`` (share of tokens routed to top_k).
No collective communication.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pikv_train.routing.base import Router, RouterConfig, RouterOutput, balance_losses, check_k_min, topk_lowest


class PiKVRouter(Router):
    """Top-k softmax router whose per-token k (k_min or top_k) is set by a learned importance score."""

    def __init__(self, d_model: int, n_experts: int, cfg: RouterConfig | None = None):
        super().__init__(d_model, n_experts, cfg)
        check_k_min(self.cfg)
        if not 0.0 <= self.cfg.importance_threshold <= 1.0:
            raise ValueError(f"PiKVRouter importance_threshold={self.cfg.importance_threshold} must be in [0, 1]")
        self.importance_head = nn.Linear(d_model, 1)
        nn.init.normal_(self.importance_head.weight, std=d_model**-0.5 * 0.1)
        nn.init.zeros_(self.importance_head.bias)

    def token_importance(self, x: Tensor) -> Tensor:
        """s_t = sigmoid(w·x_t + b) in fp32, shape (N,)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            h = self.importance_head
            return torch.sigmoid(F.linear(x.float(), h.weight.float(), h.bias.float())).squeeze(-1)

    def select(self, logits: Tensor, x: Tensor) -> tuple[Tensor, ...]:
        importance = self.token_importance(x)
        k = torch.where(importance.detach() >= self.cfg.importance_threshold,
                        torch.full_like(importance, self.k_max, dtype=torch.long),
                        torch.full_like(importance, self.cfg.k_min, dtype=torch.long))
        probs = logits.softmax(-1)
        top_p, ids = topk_lowest(probs, self.k_max)
        valid = torch.arange(self.k_max, device=logits.device) < k[:, None]
        chosen = top_p * valid
        weights = chosen / chosen.sum(-1, keepdim=True).clamp_min(1e-20) if self.cfg.normalize_weights else chosen
        return ids, valid, weights, probs, {"importance": importance, "k": k}

    def forward(self, x: Tensor, **kw) -> RouterOutput:
        out = super().forward(x, **kw)
        imp = out.extras["importance"].detach()
        out.stats["importance"] = imp.mean() if imp.numel() else imp.new_zeros(())
        out.stats["frac_k_max"] = (out.extras["k"] == self.k_max).float().mean() if imp.numel() else imp.new_zeros(())
        return out

    def compute_losses(self, out: RouterOutput, x: Tensor) -> dict[str, Tensor]:
        return balance_losses(out, self.cfg.aux_loss_weight, self.cfg.z_loss_weight)

    def importance_loss(self, importance: Tensor, target_mass: Tensor) -> Tensor:
        """``importance_loss_weight * mean((s_t - target_t)^2)`` with the target detached.

        ``importance`` is ``out.extras["importance"]`` (N,); ``target_mass`` (N,) in [0, 1], e.g.
        :meth:`attention_mass_target` flattened to the router's token order.
        """
        if importance.shape != target_mass.shape:
            raise ValueError(f"importance {tuple(importance.shape)} and target_mass {tuple(target_mass.shape)} differ")
        if importance.numel() == 0:
            return importance.new_zeros(())
        return self.cfg.importance_loss_weight * F.mse_loss(importance.float(), target_mass.detach().float())

    @staticmethod
    @torch.no_grad()
    def attention_mass_target(attn_probs: Tensor, relative: bool = False) -> Tensor:
        """Attention mass each key receives, in [0, 1], detached: (B, H, T, T) -> (B, T).

        Default: for key j, the mean over heads and over the queries that can see it (i >= j, i.e. the
        column sum divided by T - j) of ``attn[i, j]``. Assumes causal attention with query and key
        positions aligned (square T x T); masked entries must already be 0.

        ``relative=True``: each query's weight is first scaled by its number of visible keys (i + 1),
        so uniform attention scores 1, and the mean ``m`` is squashed to ``m / (1 + m)``: 0.5 means
        "as much attention as a uniform query would give", which matches the default threshold 0.5
        (the plain mean is small for most keys of a long sequence).
        """
        if attn_probs.dim() != 4 or attn_probs.shape[-1] != attn_probs.shape[-2]:
            raise ValueError(f"attn_probs must be (B, H, T, T), got {tuple(attn_probs.shape)}")
        a = attn_probs.float().mean(1)  # (B, T_q, T_k)
        t = a.shape[-1]
        pos = torch.arange(t, device=a.device, dtype=a.dtype)
        if relative:
            a = a * (pos + 1)[:, None]
        n_queries = t - pos  # queries i >= j
        m = a.sum(-2) / n_queries
        return m / (1 + m) if relative else m.clamp(0.0, 1.0)
