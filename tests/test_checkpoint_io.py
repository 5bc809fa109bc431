"""Atomic checkpoint writes: an interrupted save leaves the previous checkpoint loadable."""

from __future__ import annotations

import pytest
import torch

from pikv_train.checkpoint_io import AtomicCheckpointIO


def test_interrupted_write_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 5}, target)

    real_save = torch.save

    def dying_save(obj, f, *a, **k):  # writes part of the file, then the process "dies"
        f.write(b"PK\x03\x04 partial bytes")
        raise KeyboardInterrupt("killed during write")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 6}, target)
    monkeypatch.setattr(torch, "save", real_save)
    ckpt = torch.load(target, weights_only=True)
    assert ckpt["global_step"] == 5 and torch.equal(ckpt["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_trainer_config_uses_atomic_writes():
    from conftest import ROOT

    assert "pikv_train.checkpoint_io.AtomicCheckpointIO" in (ROOT / "configs/trainer/cpu.yaml").read_text()
