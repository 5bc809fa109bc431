"""DistillationTask: the teacher is a frozen guest; errors for missing or mismatched teachers."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from pikv_train.data import TextDataModule
from pikv_train.errors import ConfigError, MissingFileError
from pikv_train.models import ModelConfig
from pikv_train.tasks import DistillationTask, LanguageModelTask, TeacherConfig


def _trainer(tmp_path, steps=2, **kw):
    return L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=1, num_sanity_val_steps=0, default_root_dir=tmp_path, **kw,
    )


def _dm():
    return TextDataModule(max_documents=8, seq_len=32, batch_size=4)


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher")
    task = LanguageModelTask(model=ModelConfig.preset("nano"))
    trainer = _trainer(tmp)
    trainer.fit(task, datamodule=_dm())
    path = tmp / "teacher.ckpt"
    trainer.save_checkpoint(path)
    return str(path)


class _Spy(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        assert not pl_module.teacher.training, "teacher must stay in eval mode during training"


def test_teacher_is_frozen_unoptimised_and_not_checkpointed(teacher_ckpt, tmp_path):
    task = DistillationTask(student=ModelConfig.preset("nano-moe"), teacher=TeacherConfig(checkpoint=teacher_ckpt))
    trainer = _trainer(tmp_path, steps=3, callbacks=[_Spy()], val_check_interval=2)
    trainer.fit(task, datamodule=_dm())
    teacher = task.teacher
    before = torch.load(teacher_ckpt, weights_only=False)["state_dict"]
    for name, p in teacher.named_parameters():
        assert not p.requires_grad and p.grad is None
        torch.testing.assert_close(p, before[f"model.{name}"], rtol=0, atol=0)  # unchanged by training
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in task.student.parameters()}
    path = tmp_path / "student.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["state_dict"] and not any(k.startswith("teacher.") for k in ckpt["state_dict"])
    assert "teacher" not in str(ckpt.get("hyper_parameters", {}).get("student", ""))
    # The student checkpoint loads back without any teacher keys.
    again = DistillationTask(student=ModelConfig.preset("nano-moe"), teacher=TeacherConfig(checkpoint=teacher_ckpt))
    again.load_state_dict(ckpt["state_dict"], strict=False)
    for (n, a), b in zip(again.student.state_dict().items(), task.student.state_dict().values()):
        assert torch.equal(a, b), n


def test_validation_logs_agreement_and_kl(teacher_ckpt, tmp_path):
    task = DistillationTask(student=ModelConfig.preset("nano-moe"), teacher=TeacherConfig(checkpoint=teacher_ckpt))
    trainer = _trainer(tmp_path)
    res = trainer.validate(task, datamodule=_dm(), verbose=False)[0]
    assert {"val/loss", "val/ppl", "val/kd", "val/agreement"} <= set(res)
    assert 0.0 <= res["val/agreement"] <= 1.0 and res["val/kd"] > 0
    assert res["val/ppl"] == pytest.approx(torch.exp(torch.tensor(res["val/loss"])).item(), rel=1e-5)


def test_missing_teacher_checkpoint(tmp_path):
    task = DistillationTask(student=ModelConfig.preset("nano-moe"), teacher=TeacherConfig(checkpoint=str(tmp_path / "no.ckpt")))
    with pytest.raises(MissingFileError, match="checkpoint not found: .*no.ckpt.*recipes/teacher.yaml"):
        _trainer(tmp_path).fit(task, datamodule=_dm())


def test_teacher_student_vocab_mismatch(teacher_ckpt, tmp_path):
    student = ModelConfig.preset("nano-moe", vocab_size=300)
    task = DistillationTask(student=student, teacher=TeacherConfig(checkpoint=teacher_ckpt))
    with pytest.raises(ConfigError, match="teacher vocab_size=258 differs from student vocab_size=300"):
        task.configure_model()


def test_model_tokenizer_vocab_mismatch(tmp_path):
    task = LanguageModelTask(model=ModelConfig.preset("nano", vocab_size=100))
    with pytest.raises(ConfigError, match="model vocab_size=100 is smaller than the tokenizer's vocab_size=258"):
        _trainer(tmp_path).fit(task, datamodule=_dm())


def test_foreign_or_corrupt_teacher_checkpoint(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    task = DistillationTask(student=ModelConfig.preset("nano-moe"), teacher=TeacherConfig(checkpoint=str(bad)))
    with pytest.raises(ConfigError, match="cannot read checkpoint"):
        task.configure_model()
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    task = DistillationTask(student=ModelConfig.preset("nano-moe"), teacher=TeacherConfig(checkpoint=str(foreign)))
    with pytest.raises(ConfigError, match="not a pikv_train LanguageModelTask checkpoint"):
        task.configure_model()


def test_default_student_is_the_recipe_student():
    import yaml

    from pikv_train.models.config import ModelConfig as MC

    recipe = MC.from_dict(yaml.safe_load(open("configs/model/student_moe.yaml")))
    task = DistillationTask()
    assert task.student.cfg == recipe
    assert round(task.student.num_parameters() / 1e6, 2) == 0.58  # the size README and recipe state
