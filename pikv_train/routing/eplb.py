"""Auxiliary-loss-free balanced router (DeepSeek-V3) with the EPLB planner's load statistics.

Rule (SPEC §2): scores ``s`` = sigmoid(r) or softmax(r) (``cfg.score_fn``); experts = top-k of ``s + b``,
where ``b`` (E,) is a persistent fp32 *buffer* (no gradient) that only affects selection; with
``n_groups > 1`` the group limit of :mod:`hierarchical` is applied to ``s + b`` first (as DeepSeek-V3).
Weights = the *unbiased* s of the chosen experts, normalised to sum to 1 (``normalize_weights=False``:
raw s), times ``route_scale``.

Balancing: after each optimizer step the caller passes the step's per-expert loads (routed
assignments, already all-reduced across data-parallel ranks) to :meth:`on_after_optimizer_step`, which
applies ``b_i <- b_i - gamma * sign(load_i - mean load)`` (gamma = ``bias_update_rate``; overloaded
experts become less attractive) and updates an EMA of the loads (``load_ema`` decay) for :meth:`plan`.
The router itself never communicates; since every rank applies the same update to the same counts the
buffers stay identical (DDP's buffer broadcast from rank 0 is then a no-op). The forward pass reads but
never mutates the buffers, so routing depends only on the token and on past steps' loads (causal).

Losses: none by default (loss-free). ``cfg.eplb_aux_loss_weight > 0`` adds a complementary Switch
loss (DeepSeek-V3 uses a tiny, ~1e-4, sequence-wise one); the generic ``aux_loss_weight`` (default 1e-2
for the other routers) is deliberately ignored so that selecting "eplb" really is loss-free. The z-loss
follows ``cfg.z_loss_weight`` (set it to 0 for the pure DeepSeek-V3 recipe). P_i uses the softmax
probabilities, or for sigmoid the scores normalised per token.

``stats``: ``bias_abs_max``. ``extras``: ``scores`` (N, E) unbiased scores.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pikv_train.routing.base import Router, RouterConfig, RouterOutput, balance_losses, topk_lowest_index
from pikv_train.routing.eplb_planner import EPLBPlan, plan_eplb
from pikv_train.routing.hierarchical import check_groups, group_limit, scores_and_probs


class EPLBRouter(Router):
    """DeepSeek-V3 routing: select by score + load-balancing bias, weight by the unbiased score."""

    bias: Tensor
    load_ema: Tensor
    n_load_updates: Tensor

    def __init__(self, d_model: int, n_experts: int, cfg: RouterConfig | None = None):
        super().__init__(d_model, n_experts, cfg)
        scores_and_probs(torch.zeros(1, 1), self.cfg.score_fn)  # validate score_fn early
        check_groups(n_experts, self.cfg.n_groups, self.cfg.topk_groups, self.cfg.top_k)
        if self.cfg.bias_update_rate < 0:
            raise ValueError(f"bias_update_rate={self.cfg.bias_update_rate} must be >= 0")
        if not 0.0 <= self.cfg.load_ema < 1.0:
            raise ValueError(f"load_ema={self.cfg.load_ema} must be in [0, 1)")
        plan_eplb(torch.ones(n_experts), self.cfg.n_devices, self.cfg.n_redundant)  # validate planner settings
        self.register_buffer("bias", torch.zeros(n_experts, dtype=torch.float32))
        self.register_buffer("load_ema", torch.zeros(n_experts, dtype=torch.float32))
        self.register_buffer("n_load_updates", torch.zeros((), dtype=torch.long))

    def select(self, logits: Tensor, x: Tensor) -> tuple[Tensor, ...]:
        scores, probs = scores_and_probs(logits, self.cfg.score_fn)
        biased = scores.detach() + self.bias.to(scores.dtype)
        if self.cfg.n_groups > 1:
            biased, _ = group_limit(biased, self.cfg.n_groups, self.cfg.topk_groups)
        ids = topk_lowest_index(biased, self.k_max)
        chosen = scores.gather(-1, ids)
        if self.cfg.normalize_weights:
            chosen = chosen / chosen.sum(-1, keepdim=True).clamp_min(1e-20)
        weights = chosen * self.cfg.route_scale
        return ids, torch.ones_like(ids, dtype=torch.bool), weights, probs, {"scores": scores}

    def forward(self, x: Tensor, **kw) -> RouterOutput:
        out = super().forward(x, **kw)
        out.stats["bias_abs_max"] = self.bias.detach().abs().max().clone()
        return out

    def compute_losses(self, out: RouterOutput, x: Tensor) -> dict[str, Tensor]:
        return balance_losses(out, self.cfg.eplb_aux_loss_weight, self.cfg.z_loss_weight)

    def fused_spec(self) -> dict | None:
        c = self.cfg
        return {"score_fn": c.score_fn, "bias": self.bias, "n_groups": c.n_groups, "topk_groups": c.topk_groups,
                "normalize": c.normalize_weights, "route_scale": c.route_scale,
                "aux_weight": c.eplb_aux_loss_weight, "z_weight": c.z_loss_weight}

    @torch.no_grad()
    def on_after_optimizer_step(self, counts: Tensor) -> None:
        """Move the bias against the step's (globally all-reduced) loads and update the load EMA."""
        counts = counts.detach().to(self.bias.device, torch.float32).reshape(-1)
        if counts.numel() != self.n_experts:
            raise ValueError(f"counts must have n_experts={self.n_experts} entries, got {counts.numel()}")
        if self.cfg.bias_update_rate:
            self.bias.sub_(self.cfg.bias_update_rate * torch.sign(counts - counts.mean()))
        if int(self.n_load_updates) == 0:
            self.load_ema.copy_(counts)
        else:
            self.load_ema.mul_(self.cfg.load_ema).add_(counts, alpha=1.0 - self.cfg.load_ema)
        self.n_load_updates.add_(1)

    def plan(self, loads: Tensor | None = None) -> EPLBPlan:
        """EPLB placement of this layer's experts on ``cfg.n_devices`` devices with ``cfg.n_redundant``
        replicas, from the load EMA (or the given loads)."""
        if loads is None:
            if int(self.n_load_updates) == 0:
                raise RuntimeError(
                    "EPLBRouter.plan(): no loads recorded yet; call on_after_optimizer_step(counts) first"
                )
            loads = self.load_ema
        return plan_eplb(loads, self.cfg.n_devices, self.cfg.n_redundant)
