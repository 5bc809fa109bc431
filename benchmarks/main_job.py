"""The main job: teacher -> CE-only student and distilled student on the embedded corpus, then a table.

    python benchmarks/main_job.py            # trains the teacher first if runs/teacher has none
    python benchmarks/main_job.py --retrain-teacher

Each model is trained through the real CLI (``python -m pikv_train fit --config recipes/...``), then
all three are evaluated by the same code (``pikv_train.evaluate``) on the whole validation split.
Writes benchmarks/results/main_job.{md,json}; the README's table is copied from the .md file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEACHER_CKPT = ROOT / "runs/teacher/checkpoints/last.ckpt"


def fit(recipe: str, run_dir: str) -> float:
    """Train one recipe from scratch in a subprocess; returns wall seconds."""
    shutil.rmtree(ROOT / run_dir, ignore_errors=True)
    env = dict(os.environ, PIKV_QUIET_CONFIG="1")
    t0 = time.perf_counter()
    print(f"\n=== python -m pikv_train fit --config {recipe}", flush=True)
    subprocess.run([sys.executable, "-m", "pikv_train", "fit", "--config", recipe], cwd=ROOT, env=env, check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--retrain-teacher", action="store_true", help="train the teacher even if a checkpoint exists")
    args = ap.parse_args()
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))

    walls = {}
    if args.retrain_teacher or not TEACHER_CKPT.is_file():
        walls["teacher"] = fit("recipes/teacher.yaml", "runs/teacher")
    walls["student_ce"] = fit("recipes/student_ce.yaml", "runs/student_ce")
    walls["distill"] = fit("recipes/distill.yaml", "runs/distill")

    import torch
    import yaml

    from pikv_train.data import TextDataModule
    from pikv_train.evaluate import evaluate, load_decoder

    torch.manual_seed(0)
    data_cfg = yaml.safe_load((ROOT / "configs/data/embedded.yaml").read_text())["data"]
    dm = TextDataModule(**data_cfg)
    dm.setup("validate")
    teacher = load_decoder(TEACHER_CKPT)
    rows = []
    for name, label, ckpt in [
        ("teacher", "teacher (dense)", TEACHER_CKPT),
        ("student_ce", "CE-only student (MoE)", ROOT / "runs/student_ce/checkpoints/last.ckpt"),
        ("distill", "distilled student (MoE, FKL)", ROOT / "runs/distill/checkpoints/last.ckpt"),
    ]:
        model = load_decoder(ckpt)
        res = evaluate(model, dm.val_dataloader(), teacher=None if name == "teacher" else teacher)
        recipe = yaml.safe_load((ROOT / f"recipes/{name}.yaml").read_text())
        steps = recipe["trainer"]["max_steps"]
        rows.append(
            {
                "model": label,
                "params": model.num_parameters(),
                "active_params": model.num_parameters(active=True),
                "train_tokens": steps * data_cfg["batch_size"] * data_cfg["seq_len"],
                "wall_s": round(walls[name], 1) if name in walls else None,
                "val_ppl": round(res["ppl"], 4),
                "agreement": round(res.get("agreement", 1.0), 4),
                "val_tokens": res["tokens"],
            }
        )
    lines = [
        "| model | params (active) | train tokens | wall time | val ppl | top-1 agreement with teacher |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        wall = f"{r['wall_s']:.0f} s" if r["wall_s"] is not None else "(reused)"
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.2f} M ({r['active_params'] / 1e6:.2f} M) | {r['train_tokens']:,} | "
            f"{wall} | {r['val_ppl']:.3f} | {r['agreement']:.3f} |"
        )
    env = f"Python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPU cores; validation: {rows[0]['val_tokens']:,} byte tokens"
    table = "\n".join(lines) + f"\n\n{env}\n"
    print("\n" + table)
    out = ROOT / "benchmarks/results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "main_job.md").write_text(table)
    (out / "main_job.json").write_text(json.dumps({"rows": rows, "environment": env}, indent=2))
    ce, kd = rows[1]["val_ppl"], rows[2]["val_ppl"]
    verdict = "beats" if kd < ce else "does NOT beat"
    print(f"distilled student {verdict} the CE-only student ({kd:.3f} vs {ce:.3f} validation perplexity)")


if __name__ == "__main__":
    main()
