"""Writes ``predict`` outputs (prompt / completion text) to a JSON-lines file."""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.callbacks import BasePredictionWriter


class PredictionWriter(BasePredictionWriter):
    """Appends one JSON object per predicted row to ``path`` (one file per rank when distributed).

    Args:
        path: output file, e.g. ``${out_dir}/predictions.jsonl``.
    """

    def __init__(self, path: str = "predictions.jsonl"):
        super().__init__(write_interval="batch")
        self.path = Path(path)
        self._opened = False

    def _file(self, trainer) -> Path:
        p = self.path if trainer.world_size == 1 else self.path.with_suffix(f".rank{trainer.global_rank}.jsonl")
        if not self._opened:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("")  # a new predict run replaces the previous file
            self._opened = True
        return p

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        with self._file(trainer).open("a") as f:
            for row in prediction:
                f.write(json.dumps(row) + "\n")
