"""Switch the cache scheduling policy during training (e.g. dense warm-up, then a budgeted cache)."""

from __future__ import annotations

from dataclasses import asdict

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from pikv_train.cache.config import CacheConfig, build_policy
from pikv_train.errors import ConfigError
from pikv_train.tasks.base import HOOK_GROUP


class CachePolicySwitch(L.Callback):
    """From optimizer step ``at_step`` on, the student trains and validates under ``cache``.

    Args:
        at_step: global step at which the switch happens (before that batch's forward).
        cache: the policy to switch to (same keys as the task's ``cache:``).

    Learnable policy parameters (DuoAttention gates) replace those of the optimizer's hook group (the
    last group of ``build_optimizer``: no weight decay, on the same learning-rate schedule), and the
    optimizer state of the replaced ones is dropped. Resuming from a checkpoint written after the switch
    restores the switched policy with its trained parameters and optimizer state (the task re-attaches
    the policy saved in the checkpoint before the weights load; this callback remembers that it has
    switched). Several switches (at different steps) may be used in one run.
    """

    def __init__(self, at_step: int, cache: CacheConfig = CacheConfig()):
        self.at_step = at_step
        self.cache = cache if isinstance(cache, CacheConfig) else CacheConfig.from_dict(dict(cache))
        self._done = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(at_step=self.at_step, policy=self.cache.policy, budget=self.cache.budget)

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
        model.set_cache_policy(policy)
        if trainer.optimizers:
            self._swap_hook_params(trainer.optimizers[0], model)
        rank_zero_info(f"cache policy -> {self.cache.policy} (budget {self.cache.budget}) at step {trainer.global_step}")

    @staticmethod
    def _swap_hook_params(opt, model) -> None:
        group = opt.param_groups[-1]
        if not group.get(HOOK_GROUP):
            raise ConfigError(
                "CachePolicySwitch needs the optimizer of pikv_train.tasks.base.build_optimizer (its last "
                "group holds the attention hooks' parameters); use it in configure_optimizers"
            )
        for p in group["params"]:
            opt.state.pop(p, None)
        hooks = [h for h in (model.cache_policy, model.kv_sharding) if h is not None]
        group["params"] = [p for h in hooks for p in h.parameters() if p.requires_grad]
