"""Switch the cache scheduling policy during training (e.g. dense warm-up, then a budgeted cache)."""

from __future__ import annotations

from dataclasses import asdict

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from pikv_train.cache.config import CacheConfig, build_policy
from pikv_train.errors import ConfigError
from pikv_train.tasks.base import HOOK_GROUP, compressor_of, hook_param_groups


class CachePolicySwitch(L.Callback):
    """From optimizer step ``at_step`` on, the student trains and validates under ``cache``.

    Args:
        at_step: global step at which the switch happens (before that batch's forward).
        cache: the policy to switch to (same keys as the task's ``cache:``).

    Learnable policy parameters (DuoAttention gates, a low-rank compressor's factors) replace those of the
    optimizer's hook groups (the last three of ``build_optimizer``: no weight decay, on the same learning-rate
    schedule, a LoRA+ compressor's up-projections at its ratio), and the optimizer state of the replaced ones
    is dropped. A compressor that freezes model weights (``lora``: the K/V projections it replaces) takes them
    out of their groups too. E.g. ``cache: {compressor: {name: lora, rank: 8}}`` at step 200: distil dense,
    then train the latent initialised from the SVD of the weights reached at step 200. Resuming from a checkpoint written after the switch
    restores the switched policy with its trained parameters and optimizer state (the task re-attaches
    the policy saved in the checkpoint before the weights load; this callback remembers that it has
    switched). Several switches (at different steps) may be used in one run.
    """

    def __init__(self, at_step: int, cache: CacheConfig = CacheConfig()):
        if not isinstance(at_step, int) or at_step < 0:
            raise ConfigError(f"CachePolicySwitch.at_step={at_step!r} is invalid: must be a whole step >= 0; fix at_step")
        self.at_step = at_step
        try:  # checked now, not when the switch fires mid-run
            self.cache = (cache if isinstance(cache, CacheConfig) else CacheConfig.from_dict(dict(cache))).validate()
        except ConfigError as e:
            raise ConfigError(str(e).replace("model.init_args.cache.", "CachePolicySwitch.cache.")) from None
        self._done = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(at_step=self.at_step, policy=self.cache.policy, budget=self.cache.budget)

    def state_dict(self) -> dict:
        return {"done": self._done}

    def load_state_dict(self, state_dict: dict) -> None:
        self._done = bool(state_dict.get("done", False))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from pikv_train.models.lora import check_with_cache

        cfg = pl_module.student_model.cfg  # the switch must fit the model's adapters, as the task's cache must
        check_with_cache(getattr(cfg, "lora", None), self.cache.compressor.name, getattr(cfg, "qkv_bias", False))
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
            configs = getattr(trainer, "lr_scheduler_configs", None)
            sched = configs[0].scheduler if configs else None
            self._swap_hook_params(trainer.optimizers[0], model, sched)
        rank_zero_info(f"cache policy -> {self.cache.policy} (budget {self.cache.budget}, compressor "
                       f"{self.cache.compressor.name}) at step {trainer.global_step}")

    @staticmethod
    def _swap_hook_params(opt, model, sched=None) -> None:
        groups = {g.get(HOOK_GROUP): g for g in opt.param_groups if g.get(HOOK_GROUP)}
        if set(groups) != {"gates", "compressor_down", "compressor_up"}:
            raise ConfigError(
                "CachePolicySwitch needs the optimizer of pikv_train.tasks.base.build_optimizer (its last "
                "groups hold the attention hooks' parameters); use it in configure_optimizers"
            )
        for g in opt.param_groups:  # weights the new compressor freezes (lora's K/V projections) leave
            if not g.get(HOOK_GROUP):
                for p in [p for p in g["params"] if not p.requires_grad]:
                    opt.state.pop(p, None)
                g["params"] = [p for p in g["params"] if p.requires_grad]
        new = hook_param_groups(model)
        hook_ids = {id(p) for ps in new.values() for p in ps}
        held = {id(p) for g in opt.param_groups for p in g["params"]}
        for name, p in model.named_parameters():  # weights a compressor gave back (lora folded into kv_proj)
            if p.requires_grad and id(p) not in held and id(p) not in hook_ids and not name.startswith(
                    ("cache_policy.", "kv_sharding.")):
                opt.param_groups[0 if p.ndim >= 2 else 1]["params"].append(p)
        for role, g in groups.items():
            for p in g["params"]:
                opt.state.pop(p, None)
            g["params"] = new[role]
        if sched is not None and hasattr(sched, "base_lrs"):
            i = next(i for i, g in enumerate(opt.param_groups) if g is groups["compressor_up"])
            sched.base_lrs[i] = sched.base_lrs[0] * getattr(compressor_of(model), "lr_ratio", 1.0)
            groups["compressor_up"]["lr"] = sched.base_lrs[i] * sched.lr_lambdas[i](sched.last_epoch)
