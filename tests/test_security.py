"""Security: checkpoints are read with weights_only (no code execution), dependency pins exclude the
malicious lightning releases, and importing the package opens no network connection."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from pikv_train.errors import ConfigError
from pikv_train.tasks.teacher import read_checkpoint


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_CHECKPOINT",))


def test_malicious_checkpoint_is_refused_without_running_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _Evil()}, path)
    with pytest.raises(ConfigError, match="cannot read checkpoint"):
        read_checkpoint(path)
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()


def test_lightning_pin_excludes_malicious_releases():
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    lightning = [d for d in deps if d.replace(" ", "").startswith("lightning")]
    assert lightning == ["lightning==2.6.6"]


def test_import_opens_no_network_connection():
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise SystemExit('network access at import: %r' % (a,))\n"
        "socket.socket.connect = refuse\nsocket.create_connection = refuse\n"
        "import pikv_train, pikv_train.cli, pikv_train.tasks, pikv_train.distill, pikv_train.cache, pikv_train.routing\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-1000:]
