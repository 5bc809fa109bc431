"""Cache-policy statistics reach the logs and DuoAttention's gate penalty reaches the loss."""

from __future__ import annotations

import torch

from pikv_train.cache.config import CacheConfig
from pikv_train.models import ModelConfig
from pikv_train.tasks import LanguageModelTask


def test_duo_attention_gate_penalty_and_cache_stats_in_training_step():
    task = LanguageModelTask(model=ModelConfig.preset("nano"), cache=CacheConfig(policy="duo_attention", budget=0.5))
    logged = {}
    task.log = lambda *a, **k: None
    task.log_dict = lambda d, **k: logged.update(d)
    ids = torch.randint(0, 256, (2, 32))
    batch = {"input_ids": ids, "targets": torch.roll(ids, -1, 1), "loss_mask": torch.ones(2, 32, dtype=torch.bool)}
    loss = task.training_step(batch, 0)
    loss.backward()
    gates = [p for n, p in task.model.named_parameters() if "cache_policy" in n]
    assert gates and all(p.grad is not None and p.grad.abs().sum() > 0 for p in gates)
    assert any(k.startswith("cache/") for k in logged), sorted(logged)
    assert "cache/l1_penalty" in logged and float(logged["cache/l1_penalty"]) > 0
