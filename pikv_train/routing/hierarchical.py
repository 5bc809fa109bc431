"""Group-limited top-k router (DeepSeek-V3 node-limited routing).

Rule (SPEC §2): scores ``s`` = softmax(r) or sigmoid(r) (``cfg.score_fn``); the E experts are split into
``n_groups`` equal contiguous groups (expert e is in group ``e // (E / n_groups)``); a group's score is
the sum of its top-2 expert scores (top-1 when a group has one expert); the top ``topk_groups`` groups
are kept and the top-k is taken over the kept groups' experts only. Weights are the chosen scores
normalised to sum to 1 (``normalize_weights=False``: raw scores). Losses: Switch loss + z-loss, with
P_i over the softmax probabilities (sigmoid: the scores normalised per token to sum to 1, as
DeepSeek-V3's balance loss).

Causal (per-token), no collective communication.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pikv_train.routing.base import Router, RouterConfig, RouterOutput, balance_losses, topk_lowest_index


def scores_and_probs(logits: Tensor, score_fn: str) -> tuple[Tensor, Tensor]:
    """(scores used for selection/weights, per-token distribution used by the balance loss)."""
    if score_fn == "softmax":
        p = logits.softmax(-1)
        return p, p
    if score_fn == "sigmoid":
        s = torch.sigmoid(logits)
        return s, s / s.sum(-1, keepdim=True).clamp_min(1e-20)
    raise ValueError(f"score_fn must be 'softmax' or 'sigmoid', got {score_fn!r}")


def check_groups(n_experts: int, n_groups: int, topk_groups: int, top_k: int) -> None:
    """Validate a group-limited routing setting (clear one-line errors)."""
    if n_groups < 1 or n_experts % n_groups:
        raise ValueError(f"n_groups={n_groups} must be >= 1 and divide n_experts={n_experts}")
    if not 1 <= topk_groups <= n_groups:
        raise ValueError(f"topk_groups={topk_groups} must be between 1 and n_groups={n_groups}")
    if topk_groups * (n_experts // n_groups) < top_k:
        raise ValueError(
            f"topk_groups={topk_groups} groups of {n_experts // n_groups} experts cannot hold top_k={top_k}; "
            "raise topk_groups or lower top_k"
        )


def group_limit(scores: Tensor, n_groups: int, topk_groups: int) -> tuple[Tensor, Tensor]:
    """Mask experts outside each token's top ``topk_groups`` groups to -inf.

    Args:
        scores: (N, E) selection scores (E divisible by n_groups).
    Returns:
        (masked scores (N, E), kept-group mask (N, n_groups) bool).
    """
    n, e = scores.shape
    grouped = scores.reshape(n, n_groups, e // n_groups)
    top = min(2, e // n_groups)
    group_score = grouped.topk(top, dim=-1).values.sum(-1)  # (N, G); values only: tie order is irrelevant
    kept_idx = topk_lowest_index(group_score, topk_groups)  # equal group scores: the lower group index
    kept = torch.zeros_like(group_score, dtype=torch.bool).scatter_(-1, kept_idx, True)
    masked = grouped.masked_fill(~kept[..., None], float("-inf")).reshape(n, e)
    return masked, kept


class HierarchicalRouter(Router):
    """Top-k over the experts of each token's best ``topk_groups`` of ``n_groups`` expert groups."""

    def __init__(self, d_model: int, n_experts: int, cfg: RouterConfig | None = None):
        super().__init__(d_model, n_experts, cfg)
        check_groups(n_experts, self.cfg.n_groups, self.cfg.topk_groups, self.cfg.top_k)
        scores_and_probs(torch.zeros(1, 1), self.cfg.score_fn)  # validate score_fn early

    def select(self, logits: Tensor, x: Tensor) -> tuple[Tensor, ...]:
        scores, probs = scores_and_probs(logits, self.cfg.score_fn)
        masked, kept = group_limit(scores.detach(), self.cfg.n_groups, self.cfg.topk_groups)
        ids = topk_lowest_index(masked, self.k_max)
        chosen = scores.gather(-1, ids)
        weights = chosen / chosen.sum(-1, keepdim=True).clamp_min(1e-20) if self.cfg.normalize_weights else chosen
        return ids, torch.ones_like(ids, dtype=torch.bool), weights, probs, {"kept_groups": kept}

    def compute_losses(self, out: RouterOutput, x: Tensor) -> dict[str, Tensor]:
        return balance_losses(out, self.cfg.aux_loss_weight, self.cfg.z_loss_weight)

    def fused_spec(self) -> dict | None:
        c = self.cfg
        return {"score_fn": c.score_fn, "n_groups": c.n_groups, "topk_groups": c.topk_groups,
                "normalize": c.normalize_weights, "aux_weight": c.aux_loss_weight, "z_weight": c.z_loss_weight}
