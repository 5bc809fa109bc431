"""Throughput logging (speed/*, memory/*) and the end-of-run performance block."""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:  # CPU: the process's peak resident set (VmHWM), from /proc on Linux
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class PerformanceMonitor(L.Callback):
    """Logs speed/tokens_per_sec (global, all ranks) each step and prints a summary when fit ends.

    Args:
        log_every_n_steps: how often to log throughput (default: the trainer's log_every_n_steps).
    """

    def __init__(self, log_every_n_steps: int | None = None):
        self.log_every_n_steps = log_every_n_steps
        self.tokens = 0
        self.window_tokens = 0
        self.start = self.window_start = None

    def on_train_start(self, trainer, pl_module) -> None:
        if self.log_every_n_steps is None:
            self.log_every_n_steps = max(1, trainer.log_every_n_steps)
        self.start = self.window_start = time.perf_counter()
        self.tokens = self.window_tokens = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = int(batch["input_ids"].numel()) * trainer.world_size
        self.tokens += n
        self.window_tokens += n
        step = trainer.global_step
        if step and step % self.log_every_n_steps == 0 and self.window_tokens:
            now = time.perf_counter()
            pl_module.log_dict(
                {
                    "speed/tokens_per_sec": self.window_tokens / max(now - self.window_start, 1e-9),
                    "speed/tokens": float(self.tokens),
                    "memory/peak_mb": _peak_memory_mb(pl_module.device),
                    "optim/lr": float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else 0.0,
                },
                on_step=True,
            )
            self.window_start, self.window_tokens = now, 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if (trainer.global_step + 1) % self.log_every_n_steps == 0:
            norms = [p.grad.detach().float().norm() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            if norms:
                pl_module.log("optim/grad_norm", torch.stack(norms).norm(), on_step=True)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.start is None:
            return
        wall = time.perf_counter() - self.start
        rank_zero_info(
            "\n".join(
                [
                    "---- performance ----",
                    f"tokens        {self.tokens:,}",
                    f"wall time     {wall:.1f} s",
                    f"tokens/s      {self.tokens / max(wall, 1e-9):,.0f}",
                    f"peak memory   {_peak_memory_mb(pl_module.device):,.0f} MB ({pl_module.device.type})",
                    *[
                        f"{k:<13} {float(trainer.callback_metrics[k]):.6f}"
                        for k in ("val/loss", "val/ppl")
                        if k in trainer.callback_metrics
                    ],
                    "---------------------",
                ]
            )
        )
