"""Guarded training: a NaN loss stops the run naming the step and term (last good checkpoint intact), or
skips the optimizer step when configured."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from pikv_train.data import TextDataModule
from pikv_train.errors import NonFiniteError
from pikv_train.evaluate import load_decoder
from pikv_train.models import ModelConfig
from pikv_train.tasks import LanguageModelTask


def _poisoned(nonfinite: str, bad_call: int):
    task = LanguageModelTask(model=ModelConfig.preset("nano"), nonfinite=nonfinite)
    plain, calls = task._nll, {"n": 0}

    def nll(batch):
        nll_sum, n, out = plain(batch)
        if task.training:
            calls["n"] += 1
            if calls["n"] == bad_call:
                nll_sum = nll_sum * float("nan")
        return nll_sum, n, out

    task._nll = nll
    return task


def _fit(task, tmp_path, steps):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=1)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[ckpt], default_root_dir=tmp_path)
    trainer.fit(task, datamodule=TextDataModule(max_documents=8, seq_len=32, batch_size=2))
    return trainer


def test_nan_stops_naming_step_and_term_and_keeps_last_good_checkpoint(tmp_path):
    task = _poisoned("stop", bad_call=4)
    with pytest.raises(NonFiniteError, match=r"at step 3 \(train/ce=nan\).*last good checkpoint: .*last.ckpt"):
        _fit(task, tmp_path, steps=6)
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 3
    model = load_decoder(tmp_path / "ckpt" / "last.ckpt")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_step_is_skipped_when_configured(tmp_path):
    task = _poisoned("skip", bad_call=2)
    before = {}

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 1:
                before.update({n: p.detach().clone() for n, p in pl_module.model.named_parameters()})

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 1:  # the poisoned step changed no parameter
                for n, p in pl_module.model.named_parameters():
                    assert torch.equal(p, before[n]), n

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[ckpt, Spy()], default_root_dir=tmp_path)
    trainer.fit(task, datamodule=TextDataModule(max_documents=8, seq_len=32, batch_size=2))
    assert task.skipped_steps == 1 and trainer.global_step == 4
    assert all(torch.isfinite(p).all() for p in task.model.parameters())
