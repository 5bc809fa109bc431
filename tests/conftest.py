"""Test-wide setup: hermetic W&B (offline, files under tmp), quiet jsonargparse, small thread pools."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Triton kernels run in the interpreter on CPU; the variable must be set before anything imports triton.
if not os.environ.get("PIKV_GPU_TESTS"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/wandb_reader.py and helpers

os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ["JSONARGPARSE_DEPRECATION_WARNINGS"] = "off"
os.environ.pop("WANDB_API_KEY", None)


@pytest.fixture(autouse=True)
def _hermetic(tmp_path_factory, monkeypatch):
    wb = tmp_path_factory.mktemp("wandb_home")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(wb))
    torch.manual_seed(0)
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def cli_env(**extra) -> dict:
    """Environment for CLI subprocesses: offline W&B, no config echo unless asked."""
    env = dict(os.environ)
    # An in-process W&B run (tests/test_wandb_logging.py) exports WANDB_SERVICE; a child that inherits it
    # would log through the parent's service and exit before its run file is flushed.
    env.pop("WANDB_SERVICE", None)
    env.update({"WANDB_MODE": "offline", "PYTHONPATH": str(ROOT), "PIKV_QUIET_CONFIG": "1"})
    env.update(extra)
    return env


@pytest.fixture
def one_thread():
    """Token-by-token decoding is many tiny ops: one intra-op thread avoids oversubscribing shared CPUs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
