"""Router load metrics: per-layer expert-load histograms (W&B) and EPLB device-load ratios.

Per-step scalars (``router/loss``, ``router/max_mean_load``, ``router/dropped``, ``router/mean_k``,
``router/kv_read_fraction``) are logged by the task (:meth:`TaskBase.log_routing`). Every
``log_every_n_steps`` optimizer steps this callback adds, from the step's all-reduced per-layer loads
(``TaskBase.last_router_counts``, (L, E)):

* ``router/load_hist/layer_{l}``: a ``wandb.Histogram`` whose bins are the experts and whose heights are
  the layer's share of assignments (rank zero only, only when the logger is a W&B run);
* ``router/max_mean_load/layer_{l}`` and ``router/max_mean_load_worst``: max / mean expert load;
* ``router/eplb_device_load_before`` / ``router/eplb_device_load_after``: mean over layers of the max /
  mean device load of the naive contiguous placement and of the EPLB plan (replicate + pack), from each
  EPLBRouter's load EMA (other routers: the step's loads), on ``router.n_devices`` devices. Logged when
  ``n_devices > 1`` in the router config or ``n_devices`` is given here.

Never fails training: any error is reported once as a warning and the callback goes quiet.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from pikv_train.routing import EPLBRouter, plan_eplb


class RouterStatsMonitor(L.Callback):
    """Expert-load histograms and EPLB before/after device-load ratios.

    Args:
        log_every_n_steps: how often (default: the trainer's ``log_every_n_steps``).
        n_devices: devices for the EPLB analysis (default: the router config's ``n_devices``).
        n_redundant: redundant expert replicas for the analysis (default: the router config's).
        histograms: log W&B histograms (scalars are logged either way).
    """

    def __init__(self, log_every_n_steps: int | None = None, n_devices: int | None = None,
                 n_redundant: int | None = None, histograms: bool = True):
        self.log_every_n_steps = log_every_n_steps
        self.n_devices = n_devices
        self.n_redundant = n_redundant
        self.histograms = histograms
        self._failed = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._failed:
            return
        every = self.log_every_n_steps or max(1, trainer.log_every_n_steps)
        counts = getattr(pl_module, "last_router_counts", None)
        if counts is None or trainer.global_step % every:
            return
        try:
            self._log(trainer, pl_module, counts.detach().float().cpu())
        except Exception as exc:  # metrics must never stop training
            self._failed = True
            rank_zero_warn(f"RouterStatsMonitor disabled after an error: {exc!r}")

    def _routers(self, pl_module) -> list:
        model = pl_module.student_model
        return [b.ffn.router for b in model.blocks if hasattr(b.ffn, "router")]

    def _log(self, trainer, pl_module, counts) -> None:
        load = counts / counts.sum(-1, keepdim=True).clamp_min(1)  # (L, E) shares
        ratios = load.max(-1).values * load.shape[-1]
        scalars = {f"router/max_mean_load/layer_{i}": float(r) for i, r in enumerate(ratios)}
        scalars["router/max_mean_load_worst"] = float(ratios.max())
        before, after = [], []
        for router, c in zip(self._routers(pl_module), counts):
            n_dev = self.n_devices or router.cfg.n_devices
            n_red = router.cfg.n_redundant if self.n_redundant is None else self.n_redundant
            if n_dev <= 1:
                continue
            loads = router.load_ema if isinstance(router, EPLBRouter) and int(router.n_load_updates) else c
            plan = plan_eplb(loads, n_dev, n_red)
            before.append(plan.ratio_before)
            after.append(plan.ratio_after)
        if before:
            scalars["router/eplb_device_load_before"] = sum(before) / len(before)
            scalars["router/eplb_device_load_after"] = sum(after) / len(after)
        pl_module.log_dict(scalars, on_step=True, on_epoch=False)
        if self.histograms and trainer.is_global_zero:
            self._histograms(trainer, load)

    def _histograms(self, trainer, load) -> None:
        exp = getattr(trainer.logger, "experiment", None) if trainer.logger is not None else None
        if exp is None or not type(exp).__module__.startswith("wandb") or not hasattr(exp, "log"):
            return
        import wandb

        edges = torch.arange(load.shape[-1] + 1).float().numpy()
        row = {f"router/load_hist/layer_{i}": wandb.Histogram(np_histogram=(l.numpy(), edges))
               for i, l in enumerate(load)}
        row["trainer/global_step"] = trainer.global_step
        exp.log(row)
