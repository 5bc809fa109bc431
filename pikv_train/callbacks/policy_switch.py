"""Switch the cache scheduling policy during training (e.g. dense warm-up, then a budgeted cache)."""

from __future__ import annotations

from dataclasses import asdict

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from pikv_train.cache.config import CacheConfig, build_policy
from pikv_train.errors import ConfigError


class CachePolicySwitch(L.Callback):
    """From optimizer step ``at_step`` on, the student trains and validates under ``cache``.

    Args:
        at_step: global step at which the switch happens (before that batch's forward).
        cache: the policy to switch to (same keys as the task's ``cache:``).

    Learnable policy parameters (DuoAttention gates) are added to the first optimizer as a new,
    last parameter group (no weight decay) that follows the learning-rate schedule of the first
    group. Resuming from a checkpoint written after the switch restores the switched policy with its
    trained parameters and optimizer state (the task re-attaches the policy saved in the checkpoint
    before the weights load; this callback remembers that it has switched).
    """

    def __init__(self, at_step: int, cache: CacheConfig = CacheConfig()):
        self.at_step = at_step
        self.cache = cache if isinstance(cache, CacheConfig) else CacheConfig.from_dict(dict(cache))
        self._done = False

    def state_dict(self) -> dict:
        return {"done": self._done}

    def load_state_dict(self, state_dict: dict) -> None:
        self._done = bool(state_dict.get("done", False))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size > 1 and not self._done:
            probe = build_policy(self.cache, pl_module.student_model.cfg)
            if probe is not None and any(p.requires_grad for p in probe.parameters()):
                raise ConfigError(
                    f"CachePolicySwitch to {self.cache.policy} adds trainable parameters mid-run, which DDP "
                    "cannot synchronise; set the policy in the task's cache: from step 0 instead"
                )

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self._done or trainer.global_step < self.at_step:
            return
        model = pl_module.student_model
        self._done = True
        current = model.cache_policy
        if current is not None and asdict(current.cfg) == asdict(self.cache.validate()):
            return  # already under this policy (restored from a checkpoint written after the switch)
        policy = build_policy(self.cache, model.cfg)
        if policy is not None:
            policy.to(next(model.parameters()).device)
            params = [p for p in policy.parameters() if p.requires_grad]
            if params and trainer.optimizers:
                self._add_group(trainer, trainer.optimizers[0], params)
        model.set_cache_policy(policy)
        rank_zero_info(f"cache policy -> {self.cache.policy} (budget {self.cache.budget}) at step {trainer.global_step}")

    @staticmethod
    def _add_group(trainer: L.Trainer, opt, params) -> None:
        lr0 = opt.param_groups[0].get("initial_lr", opt.param_groups[0]["lr"])
        opt.add_param_group({"params": params, "weight_decay": 0.0, "initial_lr": lr0})
        for cfg in trainer.lr_scheduler_configs:  # LambdaLR: the new group follows group 0's factor
            sched = cfg.scheduler
            if sched.optimizer is opt and hasattr(sched, "lr_lambdas"):
                sched.base_lrs.append(lr0)
                sched.lr_lambdas.append(sched.lr_lambdas[0])
                opt.param_groups[-1]["lr"] = opt.param_groups[0]["lr"]
