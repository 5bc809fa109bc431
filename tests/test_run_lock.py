"""One run per folder: out_dir/.pikv.lock is taken after validation, released on exit, refused while a live
run holds it, taken over (with a warning) when its run is gone; ``--ckpt_path last_or_new``."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
from helpers import lm_recipe, run_cli

from conftest import ROOT
from pikv_train.errors import ConfigError
from pikv_train.run_lock import LOCK_NAME, RunLock, release_run_lock, take_run_lock

FAST = ("--trainer.logger", "false")


def _hold(folder, pid: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "t0"}))


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    yield proc
    proc.kill()
    proc.wait()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_holds_pid_host_and_time_and_is_released(tmp_path):
    lock = take_run_lock(tmp_path / "run")
    held = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
    assert held["pid"] == __import__("os").getpid() and held["host"] == socket.gethostname() and held["started"]
    assert take_run_lock(tmp_path / "run") is lock  # the same process may ask again
    release_run_lock()
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_second_run_is_refused_with_the_path_and_pid(tmp_path, sleeper):
    _hold(tmp_path / "run", sleeper.pid)
    with pytest.raises(ConfigError, match=f"held by pid {sleeper.pid}"):
        RunLock(tmp_path / "run").acquire()
    recipe = lm_recipe(tmp_path, "run", steps=1)
    proc = run_cli("fit", "--config", str(recipe), *FAST)
    line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and line.startswith("error: out_dir") and str(tmp_path / "run" / LOCK_NAME) in line, line
    assert f"pid {sleeper.pid}" in line and "Traceback" not in proc.stderr
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_NAME]  # nothing written


def test_spawned_ranks_do_not_take_or_refuse_the_lock(tmp_path, sleeper, monkeypatch):
    _hold(tmp_path / "run", sleeper.pid)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert take_run_lock(tmp_path / "run") is None


def test_stale_lock_is_taken_over_with_a_warning_and_a_finished_run_leaves_none(tmp_path):
    _hold(tmp_path / "run", _dead_pid())
    recipe = lm_recipe(tmp_path, "run", steps=1)
    proc = run_cli("fit", "--config", str(recipe), "--trainer.val_check_interval", "1", *FAST)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "taking over the stale run lock" in proc.stderr
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_lock_is_released_on_keyboard_interrupt(tmp_path, monkeypatch):
    from pikv_train import cli

    def interrupted(self, **kwargs):
        assert (tmp_path / "run" / LOCK_NAME).is_file()  # taken before the run starts
        raise KeyboardInterrupt

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(cli.PiKVCLI, "fit", interrupted, raising=False)
    recipe = lm_recipe(tmp_path, "run", steps=1)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["fit", "--config", str(recipe), *FAST])
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_last_needs_a_checkpoint_and_last_or_new_starts_fresh_then_resumes(tmp_path):
    recipe = lm_recipe(tmp_path, "run", steps=1)
    common = ("--trainer.logger", "false", "--trainer.val_check_interval", "1")
    proc = run_cli("fit", "--config", str(recipe), "--ckpt_path", "last", *common)
    assert proc.returncode == 2 and "--ckpt_path last: no checkpoint to resume" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
    proc = run_cli("fit", "--config", str(recipe), "--ckpt_path", "last_or_new", *common)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no checkpoint yet, starting a new run" in proc.stderr + proc.stdout
    proc = run_cli("fit", "--config", str(recipe), "--ckpt_path", "last_or_new", "--trainer.max_steps", "2", *common)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Restoring states from the checkpoint" in proc.stderr + proc.stdout
    import torch

    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2


def test_predict_with_random_weights_when_asked(tmp_path):
    recipe = lm_recipe(tmp_path, "run", steps=1)
    proc = run_cli("predict", "--config", str(recipe), "--random_weights", "true", "--trainer.logger", "false",
                   "--trainer.limit_predict_batches", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "run" / "predictions.jsonl").is_file()
