"""W&B never stops or slows training: unreachable servers fall back to offline within seconds, and a W&B
that cannot start at all is replaced by a do-nothing run."""

from __future__ import annotations

import glob
import os
import time
from pathlib import Path

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


@pytest.mark.parametrize("env", [{"WANDB_MODE": "disabled"}, {"WANDB_DISABLED": "true"}], ids=["mode", "disabled"])
def test_wandb_env_disabled_means_no_wandb_at_all(tmp_path, monkeypatch, caplog, env):
    """WANDB_MODE=disabled / WANDB_DISABLED=true: no W&B logger, no wandb.init, no W&B files; training runs."""
    import wandb

    from conftest import ROOT
    from pikv_train.cli import main

    calls = []
    monkeypatch.setattr(wandb, "init", lambda *a, **k: calls.append(k) or pytest.fail("wandb.init called"))
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    cli = main(["fit", "--config", str(lm_recipe(tmp_path, "run", steps=2)), "--out_dir", str(out)])
    assert cli.trainer.global_step == 2 and cli.trainer.logger is None and not calls
    assert (out / "checkpoints" / "last.ckpt").is_file() and (out / "config.yaml").is_file()
    assert not glob.glob(str(out / "**" / "*wandb*"), recursive=True)
    assert not any(Path(os.environ["WANDB_DIR"]).iterdir())  # nothing in W&B's own folder either
    assert "W&B is off" in caplog.text


def test_wandb_logger_follows_wandb_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    logger = WandbLogger(save_dir=str(tmp_path / "d"), offline=False)
    assert type(logger.experiment).__name__ == "NoopRun" and not (tmp_path / "d").exists()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert WandbLogger(save_dir=str(tmp_path))._offline  # offline although credentials exist
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY")
    with pytest.warns(UserWarning, match="WANDB_MODE=online but no W&B credentials"):
        assert WandbLogger(save_dir=str(tmp_path))._offline
