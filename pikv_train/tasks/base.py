"""Shared pieces of the LightningModules: optimizer/schedule config, router metrics, validation NLL."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
import torch
from torch import Tensor
from torchmetrics import MeanMetric

from pikv_train.errors import ConfigError, NonFiniteError, bad_value, check_range, warn_once
from pikv_train.models.decoder import Decoder, DecoderOutput


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay to ``min_lr_ratio * lr`` at ``trainer.max_steps``."""

    lr: float = 3e-3
    """Peak learning rate."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices (norms and embeddings-only vectors are not decayed)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    warmup_steps: int = 50
    """Optimizer steps of linear warm-up."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr."""

    def __post_init__(self) -> None:
        k = "model.init_args.optim."
        if not self.lr >= 0:
            raise bad_value(k + "lr", self.lr, "the learning rate must be >= 0", f"give a positive {k}lr, e.g. 3e-3")
        if self.lr == 0:
            warn_once(f"{k}lr=0: the weights will not change (AdamW steps are scaled by lr); set a positive "
                      f"{k}lr unless a frozen run is intended")
        check_range(k + "beta1", self.beta1, lo=0, hi=1, hi_open=True, fix=f"set {k}beta1 in [0, 1), e.g. 0.9")
        check_range(k + "beta2", self.beta2, lo=0, hi=1, hi_open=True, fix=f"set {k}beta2 in [0, 1), e.g. 0.95")
        check_range(k + "weight_decay", self.weight_decay, lo=0, fix=f"set {k}weight_decay >= 0 (0 = off)")
        check_range(k + "warmup_steps", self.warmup_steps, lo=0, fix=f"set {k}warmup_steps >= 0 (0 = no warm-up)")
        check_range(k + "min_lr_ratio", self.min_lr_ratio, lo=0, hi=1,
                    fix=f"set {k}min_lr_ratio in [0, 1] (the final lr as a fraction of lr; above 1 the decay would rise)")


def as_config(cls, value):
    """Accept a config dataclass or its dict form (hyper-parameters restored from a checkpoint)."""
    if value is None or isinstance(value, cls):
        return value
    if hasattr(cls, "from_dict"):
        return cls.from_dict(dict(value))
    return cls(**dict(value))


HOOK_GROUP = "pikv_hook_params"
"""Key marking the optimizer groups of the attention hooks' parameters (the last three of ``build_optimizer``'s);
its value is the group's role: ``gates`` (DuoAttention), ``compressor_down`` and ``compressor_up`` (the low-rank
KV compressors' factors; LoRA+ trains the up-projections at a multiple of the learning rate)."""
HOOK_ROLES = ("gates", "compressor_down", "compressor_up")
LORA_GROUP = "pikv_lora"
"""Key marking the optimizer group of the LoRA adapters' B factors (LoRA+: ``lora_plus_ratio`` x the learning rate)."""


def upgrade_optimizer_state(checkpoint: dict, n_hook_params: int) -> None:
    """Checkpoints written when ``build_optimizer`` made two groups (hook parameters, if any, last in the
    second) or three (before the compressor groups): split the hook parameters off into the gates group,
    add the two (empty) compressor groups, and extend the LR schedulers' per-group lists."""
    for opt in checkpoint.get("optimizer_states", []):
        groups = opt.get("param_groups", [])
        if len(groups) == 2:
            ids = groups[1]["params"]
            cut = len(ids) - n_hook_params
            groups.append({**groups[1], "params": ids[cut:], "weight_decay": 0.0, HOOK_GROUP: "gates"})
            groups[1]["params"] = ids[:cut]
        if len(groups) == 3:
            groups[2][HOOK_GROUP] = "gates"
            groups += [{**groups[2], "params": [], HOOK_GROUP: role} for role in HOOK_ROLES[1:]]
    for sched in checkpoint.get("lr_schedulers", []):
        for key in ("base_lrs", "_last_lr", "lr_lambdas"):
            if isinstance(sched.get(key), list) and len(sched[key]) in (2, 3):
                sched[key] += [sched[key][-1]] * (5 - len(sched[key]))


def compressor_of(module: torch.nn.Module):
    """The KV compressor of ``module``'s cache policy, or None."""
    return getattr(getattr(module, "cache_policy", None), "compressor", None)


def hook_param_groups(module: torch.nn.Module) -> dict[str, list]:
    """Trainable parameters of the attention hooks by optimizer role (see :data:`HOOK_ROLES`)."""
    comp = compressor_of(module)
    down, up = comp.param_groups() if comp is not None and hasattr(comp, "param_groups") else ([], [])
    taken = {id(p) for p in down + up}
    gates = [p for h in (getattr(module, "cache_policy", None), getattr(module, "kv_sharding", None)) if h is not None
             for p in h.parameters() if p.requires_grad and id(p) not in taken]
    return {"gates": gates, "compressor_down": [p for p in down if p.requires_grad],
            "compressor_up": [p for p in up if p.requires_grad]}


def build_optimizer(module: torch.nn.Module, cfg: OptimConfig, total_steps: int):
    """AdamW over ``module``'s trainable parameters with the warm-up + cosine schedule."""
    from pikv_train.models.lora import lora_b_params

    hook = hook_param_groups(module)
    hook_ids = {id(p) for ps in hook.values() for p in ps}
    lora_b = lora_b_params(module)  # LoRA+: the adapters' B factors in their own group
    b_ids = {id(p) for p in lora_b}
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if (p.requires_grad and id(p) not in hook_ids | b_ids
                and not name.startswith(("cache_policy.", "kv_sharding."))):
            # Matrices decay; vectors do not (nor the hooks' gates and compressor factors, below).
            (decay if p.ndim >= 2 else no_decay).append(p)
    # Always five groups (six with LoRA adapters: B third), the hook parameters last (possibly none):
    # CachePolicySwitch swaps those groups' parameters mid-run, so a resumed run rebuilds exactly the saved layout.
    ratio = getattr(compressor_of(module), "lr_ratio", 1.0)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if lora_b:
        plus = module.cfg.lora.lora_plus_ratio if getattr(module.cfg, "lora", None) is not None else 1.0
        groups.append({"params": lora_b, "weight_decay": cfg.weight_decay, "lr": cfg.lr * plus, LORA_GROUP: "B"})
    groups += [{"params": hook[role], "weight_decay": 0.0, HOOK_GROUP: role,
                **({"lr": cfg.lr * ratio} if role == "compressor_up" else {})} for role in HOOK_ROLES]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    total = max(total_steps, 1)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def total_training_steps(trainer: L.Trainer) -> int:
    """max_steps when set, else Lightning's estimate (epochs x batches / accumulation)."""
    if trainer.max_steps and trainer.max_steps > 0:
        return trainer.max_steps
    return int(trainer.estimated_stepping_batches)


class TaskBase(L.LightningModule):
    """Router metrics, global-step token accounting and validation NLL shared by the tasks.

    Subclasses expose the trained decoder as the ``student_model`` property.
    """

    def __init__(self):
        super().__init__()
        self.val_nll = MeanMetric()
        self._router_counts: list[Tensor] = []
        self._window_count = 0.0  # loss units (tokens or sequences) seen since the last optimizer step
        self._bad_terms: dict[str, float] = {}
        self.skipped_steps = 0
        self.last_router_counts: Tensor | None = None
        """(L, E) loads of the last optimizer step, summed over accumulation and ranks (for callbacks)."""

    def on_fit_start(self) -> None:
        """Copy the settings warnings (``lr 0``, a budget covering the sequence, ...) into the W&B run's
        summary: they were issued while parsing, before the run existed, so its console log misses them."""
        from pikv_train.errors import issued_warnings

        warned = issued_warnings()
        if not warned or self.global_rank != 0:
            return
        for logger in self.loggers:
            try:
                summary = getattr(logger.experiment, "summary", None)
                if summary is not None:
                    summary["config/warnings"] = warned
            except Exception:  # noqa: BLE001 - a logger without a summary never fails the run
                pass

    # ----------------------------------------------------------------- checkpoint
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The cache policy active now (it may differ from the configured one after CachePolicySwitch).
        policy = self.student_model.cache_policy
        checkpoint["pikv_cache_policy"] = None if policy is None else asdict(policy.cfg)
        comp = getattr(policy, "compressor", None)
        sd = checkpoint.get("state_dict")
        if comp is not None and sd is not None:
            # A trained latent (lora) is folded into the K/V projection the checkpoint carries, so a teacher,
            # student_init or evaluation that reads only the model's weights sees the trained K/V.
            model = self.student_model
            comp.fold(model)
            prefix = next(n for n, m in self.named_modules() if m is model)
            for name, t in model.state_dict().items():
                key = f"{prefix}.{name}"
                if name.endswith("attn.kv_proj.weight") and key in sd:
                    sd[key] = t.detach().clone()
        # Last: it replaces what the lines above wrote (a merged LoRA kv_proj holds base + adapter, not the base).
        self._thin_lora_checkpoint(checkpoint)

    def _thin_lora_checkpoint(self, checkpoint: dict) -> None:
        """A LoRA run's checkpoint: the trainable parameters plus a reference to the base, or merged weights
        (``lora.save_merged``); ``checkpoint["pikv_lora"]`` says which (see :func:`~pikv_train.models.build.plain_state`)."""
        from pikv_train.models.build import lora_checkpoint_state
        from pikv_train.models.lora import has_lora

        model = self.student_model
        sd = checkpoint.get("state_dict")
        if sd is None or getattr(model.cfg, "lora", None) is None or not has_lora(model):
            return
        prefix = next(n for n, m in self.named_modules() if m is model) + "."
        checkpoint["pikv_lora"] = lora_checkpoint_state(model, sd, prefix)

    def _check_lora_resume(self, checkpoint: dict, fitting: bool) -> None:
        from pikv_train.models.lora import has_lora

        info = checkpoint.get("pikv_lora")
        model = self.student_model
        if not info:
            return
        if not info.get("merged"):
            saved = (checkpoint.get("pikv_model_config") or {}).get("lora")
            mine = None if model.cfg.lora is None else asdict(model.cfg.lora)
            if not has_lora(model) or (saved is not None and {k: v for k, v in saved.items() if k != "save_merged"}
                                       != {k: v for k, v in mine.items() if k != "save_merged"}):
                raise ConfigError(f"this checkpoint holds LoRA adapters ({saved}) and a reference to their base, but the "
                                  f"model is configured with lora={mine}; configure the same lora (and its base), or "
                                  "read the checkpoint with pikv_train.evaluate.load_decoder (adapters merged)")
        if info.get("merged") and fitting:  # evaluating merged weights works: fresh adapters add exactly 0
            raise ConfigError("this checkpoint holds merged LoRA weights (lora.save_merged true), not the adapters; "
                              "start a new run from it with student_init, or resume from one written with save_merged false")
        from pikv_train.models.build import same_base

        mine = getattr(model, "lora_base", None)
        if mine is not None and not info.get("merged") and not same_base(info.get("base"), mine):
            raise ConfigError(f"the checkpoint's LoRA base {info.get('base')} differs from this run's {mine}; resume "
                              "with the same student_init / hf_path")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Resuming a fit (or ``load_from_checkpoint``): re-attach the policy the run was using (it may
        come from CachePolicySwitch), before the weights load and before configure_optimizers, so its
        parameters (DuoAttention gates) load and the optimizer has them in its hook group.
        Validating/testing/predicting: the configured policy stands (evaluate any checkpoint under any
        policy): saved policy state it does not have is dropped, state the checkpoint lacks keeps its
        current value."""
        from lightning.pytorch.trainer.states import TrainerFn

        model = self.student_model
        self._check_lora_resume(checkpoint, self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING)
        current = None if model.cache_policy is None else asdict(model.cache_policy.cfg)
        saved = checkpoint.get("pikv_cache_policy", current)
        restore = self._trainer is None or self.trainer.state.fn == TrainerFn.FITTING
        if restore and saved != current:
            from pikv_train.cache.config import CacheConfig, build_policy

            rank_zero_info(f"resuming under the checkpoint's cache policy {None if saved is None else saved['policy']}")
            model.set_cache_policy(None if saved is None else build_policy(CacheConfig.from_dict(saved), model.cfg))
        if restore:
            hooks = [h for h in (model.cache_policy, model.kv_sharding) if h is not None]
            upgrade_optimizer_state(checkpoint, sum(p.requires_grad for h in hooks for p in h.parameters()))
        sd = checkpoint.get("state_dict")  # FSDP loads (and pops) the weights itself, before this hook
        if not restore and sd is not None:
            prefix = next(n for n, m in self.named_modules() if m is model) + ".cache_policy."
            own = dict(model.cache_policy.state_dict()) if model.cache_policy is not None else {}
            # A compressor whose factors derive from the weights (lora) starts from the checkpoint's weights.
            comp = getattr(model.cache_policy, "compressor", None)
            derived = {}
            if comp is not None and hasattr(comp, "state_from_weights") and not any(
                    prefix + "compressor." + n in sd for n, _ in comp.named_parameters()):
                derived = {f"{prefix}compressor.{n}": t for n, t in
                           comp.state_from_weights(sd, prefix[: -len("cache_policy.")]).items()}
            own = {prefix + n: t for n, t in own.items()}
            for key in [k for k in sd if k.startswith(prefix) and k not in own]:
                del sd[key]
            for key, t in own.items():  # a policy the checkpoint was not trained with keeps its own state
                sd.setdefault(key, derived.get(key, t))

    # ----------------------------------------------------------------- router
    def log_routing(self, out: DecoderOutput, prefix: str = "router") -> Tensor:
        """Log router losses and load statistics; returns the summed router loss."""
        if not out.routing:
            return out.hidden.new_zeros((), dtype=torch.float32)
        loss = out.router_loss
        counts = torch.stack([r.counts for r in out.routing])  # (L, E)
        self._router_counts.append(counts.detach())
        load = counts / counts.sum(-1, keepdim=True).clamp_min(1)
        max_mean = (load.max(-1).values * load.shape[-1]).mean()
        logs = {f"{prefix}/loss": loss.detach(), f"{prefix}/max_mean_load": max_mean}
        for key in ("aux", "z"):
            vals = [r.losses[key] for r in out.routing if key in r.losses]
            if vals:
                logs[f"{prefix}/{key}_loss"] = torch.stack(vals).sum().detach()
        for key in ("dropped", "mean_k"):
            vals = [r.stats[key] for r in out.routing if key in r.stats]
            if vals:
                logs[f"{prefix}/{key}"] = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in vals]).mean()
        # Hook statistics (router/kv_read_fraction, cache/*) are logged by log_hook_stats.
        self.log_dict(logs, on_step=True, on_epoch=False)
        return loss

    def log_hook_stats(self, out: DecoderOutput) -> Tensor:
        """Log the attention hooks' statistics (``cache/*``, ``router/kv_*``) and return their penalties.

        Keys ending in ``_penalty`` (e.g. DuoAttention's L1 on its gates) are differentiable loss terms;
        keys starting with ``_`` are private bookkeeping.
        """
        penalty = out.hidden.new_zeros((), dtype=torch.float32)
        logs = {}
        for k, v in out.stats.items():
            if k.startswith("_"):
                continue
            if k.endswith("_penalty") and isinstance(v, Tensor):
                penalty = penalty + v.float()
            v = torch.as_tensor(v.detach() if isinstance(v, Tensor) else v, dtype=torch.float32)
            if v.numel() == 1:
                logs[k] = v.reshape(())
        if logs:
            self.log_dict(logs, on_step=True, on_epoch=False)
        return penalty

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Router statistics that persist (EPLB bias, load averages) change only here, after the optimizer
        # step, from the loads of the whole accumulation window summed over ranks.
        if not self._router_counts:
            return
        counts = torch.stack(self._router_counts).sum(0)  # (L, E)
        self._router_counts.clear()
        if self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        self.last_router_counts = counts.detach()
        routers = [b.ffn.router for b in self.student_model.blocks if hasattr(b.ffn, "router")]
        for router, c in zip(routers, counts):
            router.on_after_optimizer_step(c)

    def to_backward(self, total: Tensor, count: Tensor, per_batch: Tensor | None = None) -> Tensor:
        """The tensor to back-propagate for one micro-batch, exact over accumulation and DDP.

        ``total`` is the loss summed over ``count`` units (tokens, or sequences for sequence-means) of this
        micro-batch. The returned tensor is scaled so that, after Lightning's division by the number of
        accumulated micro-batches and DDP's average over ranks, the summed gradient is sum-over-window;
        :meth:`on_before_optimizer_step` then divides it by the window's global count. The result equals the
        gradient of one big batch however the tokens are split over micro-batches and ranks, even when they
        hold different numbers of loss tokens. ``per_batch`` terms (already means, e.g. router losses) are
        weighted by ``count``.
        """
        count = count.detach().float()
        self._window_count = self._window_count + count
        scale = float(self.trainer.accumulate_grad_batches * self.trainer.world_size) if self._trainer else 1.0
        out = total * scale
        if per_batch is not None:
            out = out + per_batch * count * scale
        return out

    def on_before_optimizer_step(self, optimizer) -> None:
        n = torch.as_tensor(self._window_count, dtype=torch.float32, device=self.device)
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        # One flag for "some loss term or gradient is NaN/inf", agreed by every rank, so that all ranks stop
        # or skip together (a rank that skipped alone would hang DDP).
        bad = torch.tensor(float(bool(self._bad_terms)), device=self.device)
        if grads:
            bad = bad + (~torch.isfinite(torch.stack([g.detach().float().abs().sum() for g in grads]))).any().float()
        if self._trainer is not None and self.trainer.world_size > 1:
            n = self.trainer.strategy.reduce(n.clone(), reduce_op="sum")
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        self._window_count = 0.0
        if bad > 0:
            self._on_nonfinite(optimizer)
            return
        n = n.clamp_min(1.0)
        for g in grads:
            g.div_(n)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # Projected parameters of the attention hooks (DuoAttention clamps its gates to [0, 1] in place
        # after every optimizer step, as the paper does); idempotent between steps.
        model = self.student_model
        for hook in (model.cache_policy, model.kv_sharding):
            if hook is not None and hasattr(hook, "after_optimizer_step"):
                hook.after_optimizer_step()

    # -------------------------------------------------------------- non-finite guard
    nonfinite: str = "stop"

    def check_finite(self, terms: dict[str, Tensor]) -> None:
        """Remember loss terms that are NaN/inf in this micro-batch (acted on before the optimizer step)."""
        for k, v in terms.items():
            if not torch.isfinite(torch.as_tensor(v)).all():
                self._bad_terms[k] = float(torch.as_tensor(v).float().mean())

    def _on_nonfinite(self, optimizer) -> None:
        step = self.trainer.global_step if self._trainer is not None else -1
        terms = ", ".join(f"{k}={v}" for k, v in self._bad_terms.items()) or "gradients only"
        self._bad_terms = {}
        if self.nonfinite == "skip":
            for g in optimizer.param_groups:
                for p in g["params"]:
                    p.grad = None  # AdamW leaves parameters without gradients untouched (no momentum step)
            self.skipped_steps += 1
            self.log("train/skipped_steps", float(self.skipped_steps), on_step=True)
            return
        ckpt = None
        for cb in getattr(self.trainer, "checkpoint_callbacks", []):
            ckpt = getattr(cb, "last_model_path", None) or getattr(cb, "best_model_path", None) or ckpt
        raise NonFiniteError(
            f"non-finite loss or gradient at step {step} ({terms}); training stopped, last good checkpoint: "
            f"{ckpt or 'none yet'}; lower optim.lr, or set nonfinite: skip to skip such steps"
        )

    # ------------------------------------------------------------- validation
    def log_val_nll(self, nll_sum: Tensor, n_tokens: Tensor) -> None:
        """Accumulate fp32 token NLL; val/loss and val/ppl come from the token-weighted mean."""
        if n_tokens > 0:
            self.val_nll.update(nll_sum / n_tokens, weight=n_tokens)

    # ---------------------------------------------------------------- predict
    predict_new_tokens: int = 32
    """Tokens generated per prompt by ``predict`` (greedy)."""

    def predict_step(self, batch, batch_idx):
        """Greedy continuations: for prompt data the batch's prompts, for packed data each sequence's first
        half, decoded with the student's deployed cache (``new_cache()``: its cache policy and KV sharding,
        as trained). Returns one {"prompt", "completion"} dict of decoded text per row."""
        from pikv_train.models.generation import generate

        tok = getattr(getattr(self.trainer, "datamodule", None), "tokenizer", None)
        if "prompts" in batch:
            prompts = list(batch["prompts"])
        else:
            half = max(1, batch["input_ids"].shape[1] // 2)
            prompts = list(batch["input_ids"][:, :half])
        gen = generate(self.student_model, prompts, self.predict_new_tokens, temperature=0.0,
                       eos_id=getattr(tok, "eos_id", None), pad_id=getattr(tok, "pad_id", 0))
        rows = []
        for p, toks, m in zip(prompts, gen.tokens, gen.generated):
            ids = toks[m].tolist()
            decode = tok.decode if tok is not None else (lambda x: " ".join(map(str, x)))
            rows.append({"prompt": decode(p.tolist()), "completion": decode(ids)})
        return rows

    def emit_nll(self, prefix: str) -> None:
        if self.val_nll.update_count == 0:
            return
        mean = self.val_nll.compute()  # token-weighted mean, synchronised across ranks by torchmetrics
        self.last_eval_loss = float(mean)
        self.log(f"{prefix}/loss", mean)
        self.log(f"{prefix}/ppl", torch.exp(mean))
        self.val_nll.reset()

    def on_validation_epoch_end(self) -> None:
        self.emit_nll("val")

    def on_test_epoch_end(self) -> None:
        self.emit_nll("test")
