"""One run per folder: out_dir/.pikv.lock is taken after validation, released on exit, refused while a live
run holds it (an flock held for the run's lifetime), taken over (with a warning) when no process holds it;
``--ckpt_path last_or_new``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from helpers import lm_recipe, run_cli

from conftest import ROOT, cli_env
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


# A second run in another process: takes the lock of argv[1], says whether it got it, and holds it until its
# stdin closes (then releases it, as the CLI does on exit).
_OTHER_RUN = """
import sys
from pikv_train.errors import ConfigError
from pikv_train.run_lock import RunLock
lock = RunLock(sys.argv[1])
try:
    lock.acquire()
    print("took", flush=True)
except ConfigError as e:
    print("refused", e, flush=True)
sys.stdin.read()
lock.release()
"""


def _other_run(folder) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", _OTHER_RUN, str(folder)], cwd=ROOT, env=cli_env(), text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    return proc, proc.stdout.readline().strip()


def _end(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.stdin.close()
        proc.wait(timeout=30)


@pytest.fixture
def holder(tmp_path):
    """Another live run holding the lock of tmp_path/run."""
    proc, said = _other_run(tmp_path / "run")
    assert said == "took", said
    yield proc
    _end(proc)


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


def test_second_run_is_refused_with_the_path_and_pid(tmp_path, holder):
    with pytest.raises(ConfigError, match=f"held by pid {holder.pid}"):
        RunLock(tmp_path / "run").acquire()
    recipe = lm_recipe(tmp_path, "run", steps=1)
    proc = run_cli("fit", "--config", str(recipe), *FAST)
    line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and line.startswith("error: out_dir") and str(tmp_path / "run" / LOCK_NAME) in line, line
    assert f"pid {holder.pid}" in line and "Traceback" not in proc.stderr
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_NAME]  # nothing written
    assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["pid"] == holder.pid  # still the holder's


def test_a_killed_run_leaves_a_lock_that_is_taken_over(tmp_path):
    proc, said = _other_run(tmp_path / "run")
    assert said == "took"
    os.kill(proc.pid, signal.SIGKILL)  # no clean-up: the file stays, the kernel drops the flock
    proc.wait()
    assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["pid"] == proc.pid
    lock = RunLock(tmp_path / "run")
    with pytest.warns(UserWarning, match=f"taking over the stale run lock .*pid {proc.pid}"):
        lock.acquire()
    assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


@pytest.mark.parametrize("whose", ["own", "live"])
def test_a_lock_file_nobody_holds_is_stale_whatever_pid_it_names(tmp_path, sleeper, whose):
    """A container restarted with the same pid (our own), or a pid reused by an unrelated live process: no
    process holds the lock, so the run it names is gone."""
    pid = os.getpid() if whose == "own" else sleeper.pid
    _hold(tmp_path / "run", pid)
    lock = RunLock(tmp_path / "run")
    with pytest.warns(UserWarning, match=f"taking over the stale run lock .*pid {pid}"):
        lock.acquire()
    lock.release()
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_a_run_starting_during_a_stale_takeover_is_refused_never_let_in_too(tmp_path, monkeypatch):
    """Run A takes over a stale lock while run B starts: B must not also get in (once B had judged the lock
    stale it deleted whatever lock was there, A's fresh one included, and both ran)."""
    _hold(tmp_path / "run", _dead_pid())
    read = RunLock._holder
    other: list = []

    def read_then_another_run_starts(self):
        seen = read(self)
        if not other:  # between A reading the stale lock and A taking it over
            other.append(_other_run(tmp_path / "run"))
        return seen

    monkeypatch.setattr(RunLock, "_holder", read_then_another_run_starts)
    lock = RunLock(tmp_path / "run")
    try:
        with pytest.warns(UserWarning):
            lock.acquire()
    except ConfigError:
        pass
    proc, said = other[0]
    try:
        assert lock.owned != (said == "took"), f"A owns: {lock.owned}; B says: {said}"
        holder = proc.pid if said == "took" else os.getpid()
        assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["pid"] == holder
    finally:
        _end(proc)
        lock.release()


@pytest.mark.parametrize("var", ["LOCAL_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "JSM_NAMESPACE_RANK"])
def test_other_ranks_of_any_launcher_do_not_take_the_lock(tmp_path, monkeypatch, var):
    monkeypatch.setenv(var, "3")
    assert take_run_lock(tmp_path / "run") is None and not (tmp_path / "run").exists()


def test_spawned_ranks_do_not_take_or_refuse_the_lock(tmp_path, holder, monkeypatch):
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
