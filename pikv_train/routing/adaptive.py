"""Top-p (adaptive-k) router: each token uses the fewest experts whose probabilities reach ``p_threshold``.

Rule (SPEC §2): ``p = softmax(r)``; sort p descending; ``k_t`` = the smallest k with
``sum_{j<k} p_(j) >= p_threshold``, clamped to ``[k_min, top_k]``. Weights are the chosen probabilities
renormalised over the chosen set (``normalize_weights=False``: raw p). Losses: Switch loss with f_i over
the actual number of assignments (``sum_t k_t``) + z-loss. ``stats["mean_k"]`` is the mean k (before
capacity drops).

Causal: k_t and the experts depend only on token t's logits. No collective communication.

Note: a token with k_t = 1 and renormalised weights gets weight exactly 1, so the task loss sends no
gradient to the gate for it (only the balancing losses do), as in any renormalised top-1 router.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pikv_train.routing.base import Router, RouterConfig, RouterOutput, balance_losses, check_k_min, topk_lowest

CUMSUM_TOL = 1e-6
"""Cumulative probability within this of p_threshold counts as reached (fp32 cumsum rounding)."""


def top_p_k(sorted_probs: Tensor, p_threshold: float, k_min: int, k_max: int) -> Tensor:
    """Per-row k of top-p routing from probabilities sorted descending (N, >=k_max) -> (N,) int64."""
    # Exclusive cumulative sum: mass already covered before slot j. Slot j is needed while it is < p.
    excl = torch.cumsum(sorted_probs, -1) - sorted_probs
    excl[..., 0] = 0.0
    k = (excl < p_threshold - CUMSUM_TOL).sum(-1)
    return k.clamp(k_min, k_max)


class AdaptiveRouter(Router):
    """Softmax router with a per-token k chosen by top-p (nucleus) over the expert probabilities."""

    def __init__(self, d_model: int, n_experts: int, cfg: RouterConfig | None = None):
        super().__init__(d_model, n_experts, cfg)
        check_k_min(self.cfg)
        if not 0.0 < self.cfg.p_threshold <= 1.0:
            raise ValueError(f"AdaptiveRouter p_threshold={self.cfg.p_threshold} must be in (0, 1]")

    def select(self, logits: Tensor, x: Tensor) -> tuple[Tensor, ...]:
        probs = logits.softmax(-1)
        top_p, ids = topk_lowest(probs, self.k_max)  # sorted descending, ties to the lower index
        k = top_p_k(top_p.detach(), self.cfg.p_threshold, self.cfg.k_min, self.k_max)
        valid = torch.arange(self.k_max, device=logits.device) < k[:, None]
        chosen = top_p * valid
        weights = chosen / chosen.sum(-1, keepdim=True).clamp_min(1e-20) if self.cfg.normalize_weights else chosen
        return ids, valid, weights, probs, {"k": k}

    def compute_losses(self, out: RouterOutput, x: Tensor) -> dict[str, Tensor]:
        return balance_losses(out, self.cfg.aux_loss_weight, self.cfg.z_loss_weight)
