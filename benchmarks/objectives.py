"""Compare distillation objectives on one teacher and one token budget; writes the README's table.

    python benchmarks/objectives.py [--steps 100]

Every student starts from the same CE-trained ("SFT") student (runs/student_ce, from
recipes/student_ce.yaml, as DistiLLM and DistiLLM-2 start from an SFT model) and trains for the same
number of steps on the same embedded-corpus prompts (configs/data/embedded_prompts.yaml: 16 prompts of
32 tokens per step, 32-token responses). Each run goes through the real CLI; all are evaluated by the
same code on the validation prompts' reference responses. DistiLLM-2 runs with its published offline pairs
and with online pairs; Speculative KD runs with our teacher and with the same teacher saved as a Hugging
Face Llama folder (benchmarks/hf_llama_teacher.py). Writes benchmarks/results/objectives.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEACHER = ROOT / "runs/teacher/checkpoints/last.ckpt"
SFT = ROOT / "runs/student_ce/checkpoints/last.ckpt"
HF_TEACHER = ROOT / "runs/hf_teacher"
DATA = "configs/data/embedded_prompts.yaml"

METHODS = {
    # name: (recipe, extra CLI flags)
    "CE only": ("recipes/student_ce.yaml", ["--model.init_args.init_from", str(SFT)]),
    "FKL": ("recipes/distill.yaml", ["--model.init_args.loss.divergence", "fkl"]),
    "RKL": ("recipes/distill.yaml", ["--model.init_args.loss.divergence", "rkl"]),
    "JSD (beta 0.5)": ("recipes/distill.yaml", ["--model.init_args.loss.divergence", "jsd"]),
    "DistiLLM (SRKL, adaptive SGO)": ("recipes/distillm.yaml", []),
    "DistiLLM-2 (offline pairs, published)": ("recipes/distillm2.yaml", []),
    "DistiLLM-2 (online pairs)": ("recipes/distillm2.yaml", ["--model.init_args.distillm2.pairs", "online"]),
    "Speculative KD": ("recipes/skd.yaml", []),
    # The published sampling settings (T 0.5 / 0.2, top-p 0.5) against plain sampling on this tiny student.
    "Speculative KD (T = 1, no nucleus)": ("recipes/skd.yaml", [
        "--model.init_args.skd.student_temperature", "1.0", "--model.init_args.skd.student_top_p", "1.0",
        "--model.init_args.skd.teacher_temperature", "1.0", "--model.init_args.skd.teacher_top_p", "1.0"]),
    # The same teacher saved as a Hugging Face Llama folder (benchmarks/hf_llama_teacher.py), decoding
    # with its own DynamicCache: the Hugging Face teacher path end to end, on the same data.
    "Speculative KD (Hugging Face Llama teacher)": ("recipes/skd.yaml", [
        "--model.init_args.teacher.checkpoint", "null", "--model.init_args.teacher.hf_path", str(HF_TEACHER),
        "--data.tokenizer", str(HF_TEACHER)]),
}


def run(cmd: list[str]) -> float:
    env = dict(os.environ, PIKV_QUIET_CONFIG="1")
    t0 = time.perf_counter()
    print("\n=== " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps per method")
    ap.add_argument("--only", nargs="*", help="run only these methods (names as in the table)")
    args = ap.parse_args()
    py = [sys.executable, "-m", "pikv_train", "fit"]
    if not TEACHER.is_file():
        run(py + ["--config", "recipes/teacher.yaml"])
    if not SFT.is_file():
        run(py + ["--config", "recipes/student_ce.yaml"])
    if not (HF_TEACHER / "config.json").is_file():
        run([sys.executable, "benchmarks/hf_llama_teacher.py", "--checkpoint", str(TEACHER), "--out", str(HF_TEACHER)])
    rows, out_root = [], ROOT / "runs/objectives"
    sys.path.insert(0, str(ROOT))
    import torch
    import yaml

    from pikv_train.data import TextDataModule
    from pikv_train.evaluate import evaluate, load_decoder

    dm = TextDataModule(**yaml.safe_load((ROOT / DATA).read_text())["data"])
    dm.setup("validate")
    teacher = load_decoder(TEACHER)
    for name, (recipe, extra) in METHODS.items():
        if args.only and name not in args.only:
            continue
        slug = "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")
        out = out_root / slug
        shutil.rmtree(out, ignore_errors=True)
        flags = ["--config", recipe, "--config", DATA, "--out_dir", str(out), "--trainer.max_steps", str(args.steps),
                 "--trainer.val_check_interval", str(max(1, args.steps // 4)), "--trainer.limit_val_batches", "10"]
        if "init_from" not in " ".join(extra):
            flags += ["--model.init_args.student_init", str(SFT)]
        wall = run(py + flags + extra)
        torch.manual_seed(0)
        res = evaluate(load_decoder(out / "checkpoints/last.ckpt"), dm.val_dataloader(), teacher=teacher)
        rows.append({"method": name, "val_ppl": round(res["ppl"], 4), "agreement": round(res["agreement"], 4),
                     "kl_to_teacher": round(res["kl_to_teacher"], 4), "wall_s": round(wall, 1), "val_tokens": res["tokens"]})
        print(rows[-1], flush=True)
    if args.only:  # keep the other methods' stored rows: the table always lists every method
        stored = json.loads((ROOT / "benchmarks/results/objectives.json").read_text())["rows"]
        fresh = {r["method"]: r for r in rows}
        merged = {r["method"]: r for r in stored if r["method"] in METHODS} | fresh
        rows = [merged[m] for m in METHODS if m in merged]
    base = evaluate(load_decoder(SFT), dm.val_dataloader(), teacher=teacher)
    lines = [
        f"Start: the CE student of recipes/student_ce.yaml (val ppl {base['ppl']:.3f}, agreement {base['agreement']:.3f}); "
        f"then {args.steps} steps x 16 prompts (32 + 32 tokens) per method.",
        "",
        "| method | val ppl | top-1 agreement | KL to teacher | wall time |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['val_ppl']:.3f} | {r['agreement']:.3f} | {r['kl_to_teacher']:.3f} | {r['wall_s']:.0f} s |")
    lines.append(f"\nvalidation: {rows[0]['val_tokens'] if rows else 0:,} response tokens of the embedded corpus's validation prompts")
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    res_dir = ROOT / "benchmarks/results"
    res_dir.mkdir(parents=True, exist_ok=True)
    (res_dir / "objectives.md").write_text(table)
    (res_dir / "objectives.json").write_text(json.dumps({"steps": args.steps, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
