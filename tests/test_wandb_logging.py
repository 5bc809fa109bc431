"""W&B never stops or slows training: unreachable servers fall back to offline within seconds, and a W&B
that cannot start at all is replaced by a do-nothing run."""

from __future__ import annotations

import glob
import time

import lightning as L
import pytest
from helpers import lm_recipe, run_cli

from conftest import cli_env
from pikv_train.data import TextDataModule
from pikv_train.loggers import WandbLogger, wandb_credentials_present
from pikv_train.models import ModelConfig
from pikv_train.tasks import LanguageModelTask


def test_unreachable_server_falls_back_to_offline_quickly(tmp_path):
    recipe = lm_recipe(tmp_path, "wb", steps=2)
    env = cli_env(WANDB_MODE="online", WANDB_API_KEY="k" * 40, WANDB_BASE_URL="http://127.0.0.1:9")
    t0 = time.perf_counter()
    proc = run_cli("fit", "--config", str(recipe), env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "is unreachable; logging offline" in proc.stderr
    assert glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert time.perf_counter() - t0 < 120  # no 30-second W&B time-outs on top of the run


def test_wandb_that_cannot_start_is_replaced_by_a_disabled_run(tmp_path, monkeypatch):
    import wandb

    real_init = wandb.init

    def broken_init(*a, **k):
        if k.get("mode") == "disabled":
            return real_init(*a, **k)
        raise RuntimeError("misconfigured W&B")

    monkeypatch.setattr(wandb, "init", broken_init)
    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    with pytest.warns(UserWarning, match="training continues without it"):
        trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=logger, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1)
        trainer.fit(LanguageModelTask(model=ModelConfig.preset("nano")),
                    datamodule=TextDataModule(max_documents=8, seq_len=32, batch_size=2))
    assert trainer.global_step == 2


def test_credentials_detection(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not wandb_credentials_present()
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    (tmp_path / "netrc").chmod(0o600)
    assert wandb_credentials_present()
    monkeypatch.setenv("WANDB_API_KEY", "abc")
    assert wandb_credentials_present()
