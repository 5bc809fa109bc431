"""Scale-out options that run on CPU, each through its config key: bf16 mixed precision, activation
checkpointing, a bf16 teacher, gradient accumulation; the GPU building blocks (DDP, FSDP) parse."""

from __future__ import annotations

import math
import re

import pytest
from helpers import lm_recipe, run_cli, write


def _final_val_loss(proc) -> float:
    m = re.search(r"val/loss\s+([0-9.naif]+)", proc.stdout + proc.stderr)
    assert m, (proc.stdout + proc.stderr)[-2000:]
    return float(m.group(1))


def test_bf16_mixed_with_activation_checkpointing_and_accumulation(tmp_path):
    recipe = lm_recipe(tmp_path, "bf16", steps=3)
    proc = run_cli("fit", "--config", str(recipe), "--trainer.precision", "bf16-mixed",
                   "--model.init_args.activation_checkpointing", "true", "--trainer.accumulate_grad_batches", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "bf16-mixed" in proc.stdout + proc.stderr or "bfloat16" in proc.stdout + proc.stderr
    loss = _final_val_loss(proc)
    assert math.isfinite(loss) and loss < math.log(258) + 0.5


def test_bf16_teacher(tmp_path):
    teacher = lm_recipe(tmp_path, "t", steps=1, model="configs/model/nano_dense.yaml")
    assert run_cli("fit", "--config", str(teacher)).returncode == 0
    recipe = write(
        tmp_path / "d.yaml",
        f"""
        defaults: [configs/trainer/cpu.yaml]
        out_dir: {tmp_path / 'd'}
        model:
          class_path: pikv_train.tasks.DistillationTask
          init_args:
            student: configs/model/nano_moe.yaml
            teacher: {{checkpoint: {tmp_path / 't' / 'checkpoints' / 'last.ckpt'}, dtype: bfloat16}}
        data: {{seq_len: 32, batch_size: 2, max_documents: 6}}
        trainer: {{max_steps: 2, limit_val_batches: 1, val_check_interval: 2, enable_progress_bar: false}}
        """,
    )
    proc = run_cli("fit", "--config", str(recipe))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert math.isfinite(_final_val_loss(proc))


@pytest.mark.parametrize("block,expected", [("configs/trainer/gpu_ddp.yaml", "strategy: ddp"),
                                            ("configs/trainer/gpu_fsdp.yaml", "FSDPStrategy")])
def test_gpu_building_blocks_parse(block, expected):
    proc = run_cli("fit", "--config", "recipes/distill.yaml", "--config", block, "--print_config")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert expected in proc.stdout and "precision: bf16-mixed" in proc.stdout
