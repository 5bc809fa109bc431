"""Switch the cache scheduling policy during training (e.g. dense warm-up, then a budgeted cache)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from pikv_train.cache.config import CacheConfig, build_policy


class CachePolicySwitch(L.Callback):
    """From optimizer step ``at_step`` on, the student trains and validates under ``cache``.

    Args:
        at_step: global step at which the switch happens (before that batch's forward).
        cache: the policy to switch to (same keys as the task's ``cache:``).

    Learnable policy parameters (DuoAttention gates) are added to the first optimizer as a new
    parameter group. A run resumed after the switch point switches again on its first batch.
    """

    def __init__(self, at_step: int, cache: CacheConfig = CacheConfig()):
        self.at_step = at_step
        self.cache = cache if isinstance(cache, CacheConfig) else CacheConfig.from_dict(dict(cache))
        self._done = False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self._done or trainer.global_step < self.at_step:
            return
        model = pl_module.student_model
        policy = build_policy(self.cache, model.cfg)
        if policy is not None:
            policy.to(next(model.parameters()).device)
            params = [p for p in policy.parameters() if p.requires_grad]
            if params and trainer.optimizers:
                trainer.optimizers[0].add_param_group({"params": params, "weight_decay": 0.0})
        model.set_cache_policy(policy)
        self._done = True
        rank_zero_info(f"cache policy -> {self.cache.policy} (budget {self.cache.budget}) at step {trainer.global_step}")
