"""Loss normalisation: accumulating micro-batches with different numbers of loss tokens gives exactly the
gradient of one big batch (the global token mean), for the CE task and the distillation task.

Dense models: an MoE router's balance loss is a statistic of the micro-batch it sees (f_i and P_i), so it
cannot be split exactly, by definition; the token losses can, and that is what is tested."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from pikv_train.data import TextDataModule
from pikv_train.models import ModelConfig
from pikv_train.tasks import DistillationTask, LanguageModelTask, TeacherConfig


def _data(tmp_path, batch_size):
    # Responses of very different lengths, so micro-batches hold different numbers of loss tokens.
    rows = [{"prompt": f"q{i}:", "response": "x" * (1 + (7 * i) % 23)} for i in range(8)]
    f = tmp_path / "pr.json"
    f.write_text(json.dumps(rows * 3))
    dm = TextDataModule(path=str(f), prompt_field="prompt", response_field="response", mode="prompts",
                        prompt_len=8, response_len=24, batch_size=batch_size, val_fraction=0.1)
    dm.setup()
    dm.train_dataloader = lambda: torch.utils.data.DataLoader(  # fixed order: same 8 examples either way
        torch.utils.data.Subset(dm.train_set, range(8)), batch_size=batch_size, shuffle=False, collate_fn=dm.collate)
    return dm


def _grads(task, dm, accumulate, tmp_path):
    torch.manual_seed(0)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        accumulate_grad_batches=accumulate, default_root_dir=tmp_path)
    trainer.fit(task, datamodule=dm)
    model = task.model if isinstance(task, LanguageModelTask) else task.student
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher_norm")
    task = LanguageModelTask(model=ModelConfig.preset("nano"))
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp)
    trainer.fit(task, datamodule=TextDataModule(max_documents=8, seq_len=32, batch_size=2))
    trainer.save_checkpoint(tmp / "t.ckpt")
    return str(tmp / "t.ckpt")


@pytest.mark.parametrize("kind", ["lm", "kd", "skd_style_sequence_mean"])
def test_four_micro_batches_equal_one_batch(kind, teacher_ckpt, tmp_path):
    def make():
        torch.manual_seed(1)
        if kind == "lm":
            return LanguageModelTask(model=ModelConfig.preset("nano"))
        task = DistillationTask(student=ModelConfig.preset("nano"), teacher=TeacherConfig(checkpoint=teacher_ckpt))
        if kind != "kd":
            plain = task.objective.loss
            task.objective.loss = lambda b, s, loss_fn: plain(b, s, lambda b2, d, **kw: loss_fn(b2, d, sequence_mean=True, **kw))
        return task

    one = _grads(make(), _data(tmp_path, 8), 1, tmp_path)
    four = _grads(make(), _data(tmp_path, 2), 4, tmp_path)
    assert one.keys() == four.keys()
    for n in one:
        torch.testing.assert_close(four[n], one[n], atol=2e-6, rtol=1e-4)
