"""Each of the six routers trains in a tiny in-process Lightning fit and logs its defining statistic; the
RouterStatsMonitor logs load histograms to a W&B run and EPLB before/after device loads."""

from __future__ import annotations

import math
import time
from dataclasses import replace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers.logger import Logger

from pikv_train.cache.sharding import ShardingConfig
from pikv_train.callbacks import RouterStatsMonitor
from pikv_train.data import TextDataModule
from pikv_train.models import ModelConfig
from pikv_train.routing import EPLBRouter, RouterConfig
from pikv_train.tasks import LanguageModelTask
from pikv_train.tasks.base import OptimConfig


class MemLogger(Logger):
    """Keeps every logged scalar in memory."""

    def __init__(self):
        super().__init__()
        self.rows: list[dict] = []

    @property
    def name(self):
        return "mem"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append(dict(metrics))

    def series(self, key):
        return [r[key] for r in self.rows if key in r]


ROUTER_CFG = {
    "base": dict(),
    "topk_balanced": dict(aux_loss_weight=1e-2, z_loss_weight=1e-3),
    "adaptive": dict(top_k=3, p_threshold=0.5),
    "pikv": dict(top_k=3, k_min=1, importance_threshold=0.5),
    "eplb": dict(bias_update_rate=1e-2, n_devices=2),
    "hierarchical": dict(n_groups=2, topk_groups=1),
}
DEFINING = {
    "base": "router/max_mean_load",
    "topk_balanced": "router/aux_loss",
    "adaptive": "router/mean_k",
    "pikv": "router/mean_k",
    "eplb": "router/eplb_device_load_after",
    "hierarchical": "router/aux_loss",
}


def _fit(name, tmp_path, steps=8, sharding=None, logger=None):
    torch.manual_seed(0)
    base = ModelConfig.preset("nano-moe")
    moe = replace(base.moe, router=RouterConfig(name=name, **ROUTER_CFG[name]))
    task = LanguageModelTask(
        model=replace(base, moe=moe), optim=OptimConfig(lr=1e-2, warmup_steps=1),
        kv_sharding=sharding or ShardingConfig(),
    )
    logger = logger or MemLogger()
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=logger, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=1,
        default_root_dir=tmp_path, callbacks=[RouterStatsMonitor(log_every_n_steps=2)],
    )
    trainer.fit(task, datamodule=TextDataModule(max_documents=8, seq_len=32, batch_size=4))
    return task, logger


@pytest.mark.parametrize("name", sorted(ROUTER_CFG))
def test_each_router_trains_and_logs_its_stat(name, tmp_path):
    task, log = _fit(name, tmp_path)
    loss = log.series("train/loss")
    assert len(loss) == 8 and all(math.isfinite(v) for v in loss)
    assert sum(loss[-2:]) < sum(loss[:2]), f"{name}: loss did not decrease: {loss}"
    stat = log.series(DEFINING[name])
    assert stat and all(math.isfinite(v) for v in stat)
    assert log.series("router/max_mean_load/layer_0")
    if name in ("adaptive", "pikv"):
        assert all(1.0 <= v <= 3.0 for v in stat)
    if name == "eplb":
        router = task.model.blocks[0].ffn.router
        assert isinstance(router, EPLBRouter) and router.bias.abs().max() > 0  # moved against load
        assert all(a <= b + 1e-9 for a, b in zip(stat, log.series("router/eplb_device_load_before")))
    if name == "hierarchical":
        r = task.model.blocks[0].ffn.router
        out = r(torch.randn(16, task.model.cfg.d_model))
        assert ((out.ids // 2).min(-1).values == (out.ids // 2).max(-1).values).all()  # one kept group of 2


def test_kv_sharding_trains_and_logs_read_fraction(tmp_path):
    _, log = _fit("topk_balanced", tmp_path, steps=2,
                  sharding=ShardingConfig(enabled=True, n_sink=2, window=4, read_mode="by_score", read_shards=1))
    frac = log.series("router/kv_read_fraction")
    assert frac and all(0 < v < 1 for v in frac)
    assert log.series("router/kv_bytes_per_token")


def test_histograms_reach_a_wandb_run(tmp_path):
    wandb = pytest.importorskip("wandb")
    from pikv_train.loggers import WandbLogger

    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    _fit("topk_balanced", tmp_path, steps=2, logger=logger)
    wandb.finish()
    from wandb_reader import read_history

    key = "router/load_hist/layer_0"  # the history stores the histogram's fields as nested keys
    for _ in range(50):  # the offline writer may still be flushing right after finish()
        rows = [r for f in tmp_path.rglob("run-*.wandb") for r in read_history(f)]
        hist = [r for r in rows if f"{key}/_type" in r]
        if hist:
            break
        time.sleep(0.1)
    assert hist and hist[0][f"{key}/_type"] == "histogram" and len(hist[0][f"{key}/values"]) == 4
    assert abs(sum(hist[0][f"{key}/values"]) - 1.0) < 1e-5  # shares of the layer's assignments
