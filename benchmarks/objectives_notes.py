"""What the objectives benchmark's runs logged: DistiLLM's phi and sources, SKD's acceptance, generation lengths.

    python benchmarks/objectives_notes.py

Reads the offline W&B run files that ``benchmarks/objectives.py`` left in ``runs/objectives/*/wandb`` (no
network, no wandb process) and prints one line per run with the means of the ``kd/`` metrics the README's
notes quote.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("kd/phi", "kd/source_fresh", "kd/source_replay", "kd/skd_acceptance", "kd/gen_len", "kd/teacher_gen_len")


def main() -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from wandb_reader import read_history  # the offline .wandb reader the tests use

    for run in sorted((ROOT / "runs/objectives").glob("*")):
        files = sorted(run.glob("wandb/*/run-*.wandb"), key=lambda p: p.stat().st_mtime)
        if not files:
            continue
        rows = read_history(files[-1])
        stats = []
        for key in KEYS:
            vals = [r[key] for r in rows if key in r]
            if vals:
                last = f", last {vals[-1]:.2f}" if key == "kd/phi" else ""
                stats.append(f"{key} mean {sum(vals) / len(vals):.3f}{last}")
        print(f"{run.name}: " + ("; ".join(stats) or "no kd/ sampling metrics"))


if __name__ == "__main__":
    main()
