"""What a checkpoint's run left beside it, for the model card: the resolved config and the validation figures.

A run of ``python -m pikv_train fit`` writes into its ``out_dir``: ``checkpoints/*.ckpt``, the resolved config
``config.yaml`` (in ``out_dir`` with the W&B logger, in the logger's version folder with a CSV/TensorBoard logger),
and its metrics through the loggers: ``metrics.csv`` (CSVLogger) or an offline W&B run file
(``wandb/offline-run-*/run-*.wandb``). Nothing here invents a number: a figure is reported only when a file holds
it, with the file it came from.
"""

from __future__ import annotations

import csv
import json
import struct
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Figure:
    """One validation figure: ``name`` (e.g. ``val/loss``), its value, the step it was logged at, where from."""

    name: str
    value: float
    step: int | None
    source: str


def run_folder(ckpt_path) -> Path:
    """The run's ``out_dir``: the folder above ``checkpoints/``, else the checkpoint's own folder."""
    p = Path(ckpt_path).resolve().parent
    return p.parent if p.name == "checkpoints" else p


def _newest(paths) -> Path | None:
    paths = [p for p in paths if p.is_file()]
    return max(paths, key=lambda p: p.stat().st_mtime) if paths else None


def run_config(run_dir: Path) -> Path | None:
    """The ``config.yaml`` Lightning's CLI saved for the run (``out_dir/config.yaml``, else the newest one in a
    logger's folder below ``out_dir``; W&B's own ``config.yaml`` files are not it)."""
    top = run_dir / "config.yaml"
    if top.is_file():
        return top
    return _newest(p for p in run_dir.rglob("config.yaml") if "wandb" not in p.relative_to(run_dir).parts)


def validation_figures(ckpt: dict, run_dir: Path) -> list[Figure]:
    """The run's validation figures up to the checkpoint's step: the best monitored score of each ModelCheckpoint
    callback, then the last ``val/*`` values logged at or before the checkpoint's ``global_step`` in the run's
    ``metrics.csv`` or, without one, its offline W&B run files. Empty when nothing is recorded."""
    out = []
    for key, state in (ckpt.get("callbacks") or {}).items():
        if str(key).startswith("ModelCheckpoint") and isinstance(state, dict):
            score = state.get("best_model_score")
            if state.get("monitor") and score is not None:
                out.append(Figure(f"best {state['monitor']}", float(score), None, "ModelCheckpoint (checkpoint)"))
    step = ckpt.get("global_step")
    logged = _from_csv(run_dir, step) or _from_wandb(run_dir, step)
    return out + logged


def _last_values(rows, step_key: str, max_step: int | None, source: str) -> list[Figure]:
    """The last value of each ``val/*`` key over ``rows`` (dicts, in logging order) with step <= max_step."""
    last: dict[str, tuple[float, int | None]] = {}
    for row in rows:
        s = row.get(step_key)
        s = int(float(s)) if s not in (None, "") else None
        if max_step is not None and s is not None and s > max_step:
            continue
        for k, v in row.items():
            if k.startswith("val/") and v not in (None, ""):
                try:
                    last[k] = (float(v), s)
                except (TypeError, ValueError):
                    continue
    return [Figure(k, v, s, source) for k, (v, s) in sorted(last.items())]


def _from_csv(run_dir: Path, max_step: int | None) -> list[Figure]:
    f = _newest(run_dir.rglob("metrics.csv"))
    if f is None:
        return []
    with open(f, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return _last_values(rows, "step", max_step, str(f.relative_to(run_dir)))


def _from_wandb(run_dir: Path, max_step: int | None) -> list[Figure]:
    """History rows of the run's W&B run files (offline, or synced: W&B keeps the local file), oldest run first."""
    files = sorted((run_dir / "wandb").glob("*run-*/run-*.wandb")) if (run_dir / "wandb").is_dir() else []
    rows = []
    for f in files:
        try:
            rows += _wandb_history(f)
        except Exception:  # noqa: BLE001 - an unreadable or newer-format run file just records nothing here
            continue
    if not rows:
        return []
    source = str(files[-1].relative_to(run_dir)) if len(files) == 1 else f"{len(files)} W&B run files in wandb/"
    return _last_values(rows, "trainer/global_step", max_step, source)


_BLOCK = 32768  # W&B's run file is a LevelDB-style log of 32 KiB blocks


def _wandb_history(path: Path) -> list[dict]:
    """The history rows ({key: value}) of one W&B run file: a 7-byte file header, then records split across blocks,
    each piece behind a 7-byte header (crc 4 bytes, little-endian length 2 bytes, kind 1 byte: 1 whole, 2 first,
    3 middle, 4 last); a whole record is a ``wandb_internal_pb2.Record`` protobuf."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    rows, pos, parts = [], 7, b""
    while pos + 7 <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += room
            continue
        piece = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 2):
            parts = piece
        else:
            parts += piece
        if kind not in (1, 4):
            continue
        rec = pb.Record()
        rec.ParseFromString(parts)
        if rec.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return rows
