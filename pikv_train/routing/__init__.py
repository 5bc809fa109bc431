"""Routers: which experts each token uses, with their balancing losses and statistics.

All routers are per-token (causal) and never communicate across ranks: the training loop all-reduces
``RouterOutput.counts`` and hands the global loads to ``router.on_after_optimizer_step(counts)``.
"""

from pikv_train.routing.adaptive import AdaptiveRouter
from pikv_train.routing.base import (
    BaseRouter,
    Router,
    RouterConfig,
    RouterOutput,
    TopKBalancedRouter,
    apply_capacity,
    balance_losses,
    switch_loss,
    topk_lowest,
    topk_lowest_index,
    z_loss,
)
from pikv_train.routing.capacity import capacity_slots, new_capacity_state
from pikv_train.routing.eplb import EPLBRouter
from pikv_train.routing.eplb_planner import EPLBPlan, plan_eplb
from pikv_train.routing.hierarchical import HierarchicalRouter, group_limit
from pikv_train.routing.pikv import PiKVRouter

ROUTERS: dict[str, type[Router]] = {
    "base": BaseRouter,
    "topk_balanced": TopKBalancedRouter,
    "adaptive": AdaptiveRouter,
    "pikv": PiKVRouter,
    "eplb": EPLBRouter,
    "hierarchical": HierarchicalRouter,
}


def build_router(cfg: RouterConfig, d_model: int, n_experts: int, max_seq_len: int | None = None) -> Router:
    """Instantiate the router named by ``cfg.name``.

    ``max_seq_len``: the model's longest sequence, the fixed reference length L of the expert capacity
    (``RouterConfig.capacity_factor``).
    """
    if cfg.name not in ROUTERS:
        raise ValueError(f"unknown router {cfg.name!r}; choose one of {sorted(ROUTERS)}")
    router = ROUTERS[cfg.name](d_model, n_experts, cfg)
    router.max_seq_len = max_seq_len
    return router


__all__ = [
    "AdaptiveRouter", "BaseRouter", "EPLBPlan", "EPLBRouter", "HierarchicalRouter", "PiKVRouter", "Router",
    "RouterConfig", "RouterOutput", "TopKBalancedRouter", "ROUTERS", "apply_capacity", "balance_losses",
    "build_router", "capacity_slots", "group_limit", "new_capacity_state", "plan_eplb", "switch_loss",
    "topk_lowest", "topk_lowest_index", "z_loss",
]
