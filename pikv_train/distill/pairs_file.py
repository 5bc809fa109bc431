"""DistiLLM-2's offline (teacher response, student response) pairs as a dataset file in the run folder.

JSON lines: a header line with the settings the pairs were generated with, then one line per prompt
``{"prompt": [ids], "teacher": [ids], "student": [ids]}``. A resumed run reads the file instead of
generating again, and refuses a file made with other settings.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from pikv_train.errors import ConfigError

KIND = "pikv_train distillm2 pairs"
FILE_NAME = "distillm2_pairs.jsonl"

Pairs = dict[tuple[int, ...], tuple[Tensor, Tensor]]
"""prompt ids -> (teacher response ids, student response ids)."""


def write_pairs(path: Path, settings: dict, pairs: Pairs) -> None:
    """Write atomically (a temporary file renamed), so an interrupted run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w") as f:
        f.write(json.dumps({"kind": KIND, "settings": settings, "n": len(pairs)}) + "\n")
        for prompt, (teacher, student) in pairs.items():
            f.write(json.dumps({"prompt": list(prompt), "teacher": teacher.tolist(), "student": student.tolist()}) + "\n")
    tmp.replace(path)


def read_pairs(path: Path, settings: dict) -> Pairs:
    """Read a pairs file written with the same ``settings``; a clear error otherwise."""
    lines = path.read_text().splitlines()
    try:
        header = json.loads(lines[0])
    except (IndexError, json.JSONDecodeError):
        header = {}
    if header.get("kind") != KIND or header.get("n") != len(lines) - 1:
        raise ConfigError(f"{str(path)!r} is not a complete DistiLLM-2 pairs file; delete it to generate the pairs again")
    if header.get("settings") != settings:
        raise ConfigError(
            f"{str(path)!r} holds pairs generated with {header.get('settings')}, but this run asks for {settings}; "
            "delete the file (or use another out_dir) to generate them again"
        )
    pairs: Pairs = {}
    for line in lines[1:]:
        row = json.loads(line)
        pairs[tuple(row["prompt"])] = (torch.tensor(row["teacher"], dtype=torch.long),
                                       torch.tensor(row["student"], dtype=torch.long))
    return pairs
