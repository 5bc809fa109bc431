"""Training-step time and peak memory under each cache policy vs dense attention, side by side, T = 512 to 4,096.

    python benchmarks/cache_policy_overhead.py                                   # the README table (idle machine, ~25 min)
    python benchmarks/cache_policy_overhead.py --seq-len 1024 --budget 0.25      # one column
    python benchmarks/cache_policy_overhead.py --seq-len 512 --steps 1 --no-memory   # quick look
    python benchmarks/cache_policy_overhead.py --dense-masks ...                 # also each policy on its (T, T) mask

The model is the CPU-demo MoE student (configs/model/student_moe.yaml, max_seq_len raised to T), batch 1, fp32;
one step = forward + backward of the CE loss, no optimizer. At each T the policies at every budget and dense
attention are timed round-robin (one step of each per round, after a warm-up round, each round starting one
entry later), each figure the median over ``--steps`` rounds, so the ratios to dense come from one run.
Training under a policy runs block-sparse (pikv_train/cache/policies/blocks.py): StreamingLLM, Quest, H2O, LRU,
LRU+ and AdaKV; DuoAttention (soft gates: a dense and a streaming pass) and FlexGen (placement, or its lossy
variants ``flexgen_kv4`` / ``flexgen_sparse``) keep their dense paths. ``--dense-masks`` adds every policy on the
dense (T, T) boolean mask as well (``use_blocks = False``: the path the block-sparse one replaced).

Peak memory: each (policy, T, budget) runs one step in a fresh process, and the figure is the process's peak
resident memory during the step minus its resident memory before it (Linux: the
peak is reset through /proc/self/clear_refs before the step and read from VmHWM after it), so activations,
masks and score tensors kept for the backward all count.

Writes benchmarks/results/cache_policy_scaling.{json,md,png}: the table (step time and peak memory vs dense per
T and budget) and a plot of step time vs T.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import yaml

from pikv_train.cache import CacheConfig, build_policy
from pikv_train.distill import chunked_cross_entropy
from pikv_train.models import Decoder, ModelConfig

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ["streaming_llm", "quest", "h2o", "lru", "lru_plus", "ada_kv", "duo_attention", "flexgen"]
# FlexGen's lossy knobs: 4-bit group-64 KV (fake-quant + a 2T-key attention) and sparse values.
VARIANTS = {"flexgen_kv4": ("flexgen", {"kv_bits": 4}), "flexgen_sparse": ("flexgen", {"attn_sparsity": 0.25})}
TARGETS = {  # issue 17, at T = 2,048 and budget 0.125: step time vs dense
    "streaming_llm": 0.8, "quest": 0.8, "h2o": 1.2, "lru": 1.2, "lru_plus": 1.2, "ada_kv": 1.2}


def build(t: int):
    cfg_d = yaml.safe_load((ROOT / "configs/model/student_moe.yaml").read_text())
    cfg = ModelConfig.from_dict({**cfg_d, "max_seq_len": max(cfg_d["max_seq_len"], t)})
    torch.manual_seed(0)
    return Decoder(cfg).train(), torch.randint(0, cfg.vocab_size, (1, t)), cfg


def make_policy(name: str, budget: float, cfg, dense_mask: bool = False):
    """``name`` at ``budget`` (None for dense attention); ``dense_mask``: on the (T, T) boolean mask."""
    if name == "full":
        return None
    policy, extra = VARIANTS.get(name, (name, {}))
    pol = build_policy(CacheConfig(policy=policy, budget=budget, reference_len=cfg.max_seq_len, **extra), cfg)
    if name == "duo_attention":
        with torch.no_grad():
            pol.gates.fill_(0.5)  # soft gates: both attention passes, the training cost
    if dense_mask:
        pol.use_blocks = False
    return pol


def one_step(model: Decoder, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    h = model(x).hidden.flatten(0, 1)
    chunked_cross_entropy(h, model.head_weight, x.roll(-1, 1).flatten()).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_child(name: str, t: int, budget: float, dense_mask: bool) -> None:
    """Run in a fresh process: print the step's peak memory (bytes above the resident memory before it)."""
    model, x, cfg = build(t)
    model.set_cache_policy(make_policy(name, budget, cfg, dense_mask))
    model.train()
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current resident memory
        f.write("5")
    before = status_kib("VmRSS")
    one_step(model, x)
    print(json.dumps({"peak_bytes": max(0, status_kib("VmHWM") - before) * 1024}))


def peak_memory(name: str, t: int, budget: float, dense_mask: bool) -> int:
    out = subprocess.run([sys.executable, __file__, "--memory-child", name, str(t), str(budget), str(int(dense_mask))],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--budget", type=float, nargs="+", default=[0.25, 0.125])
    ap.add_argument("--policies", nargs="+", default=POLICIES, choices=POLICIES + list(VARIANTS))
    ap.add_argument("--steps", type=int, default=None, help="timed rounds (default: 5 up to T = 1,024, else 3)")
    ap.add_argument("--dense-masks", action="store_true", help="also time each policy on its dense (T, T) mask")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/cache_policy_scaling"))
    ap.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message=".*chunk_size.*")  # the chunk is capped at small windows
    if args.memory_child:
        name, t, budget, dense = args.memory_child
        memory_child(name, int(t), float(budget), dense == "1")
        return
    t_start = time.perf_counter()
    rows = []
    for t in args.seq_len:
        model, x, cfg = build(t)
        entries = [("full", 1.0, False)] + [(n, b, False) for b in args.budget for n in args.policies]
        if args.dense_masks:
            entries += [(n, b, True) for b in args.budget for n in args.policies]
        pols = {e: make_policy(e[0], e[1], cfg, e[2]) for e in entries}
        steps = args.steps or (5 if t <= 1024 else 3)
        times = {e: [] for e in entries}
        for rnd in range(steps + 1):
            for e in entries[rnd % len(entries):] + entries[: rnd % len(entries)]:
                model.set_cache_policy(pols[e])
                model.train()
                sec = one_step(model, x)
                if rnd:  # round 0 is warm-up
                    times[e].append(sec)
        model.set_cache_policy(None)
        dense = statistics.median(times["full", 1.0, False])
        mem_dense = None if args.no_memory else peak_memory("full", t, 1.0, False)
        for e in entries:
            sec = statistics.median(times[e])
            row = {"policy": e[0], "budget": e[1] if e[0] != "full" else None, "dense_mask": e[2], "seq_len": t,
                   "step_s": round(sec, 4), "vs_dense": round(sec / dense, 3)}
            if not args.no_memory:
                mem = mem_dense if e[0] == "full" else peak_memory(*e[:1], t, e[1], e[2])
                row.update(peak_mib=round(mem / 2**20, 1), mem_vs_dense=round(mem / mem_dense, 3))
            rows.append(row)
            print(f"T={t:5d} {e[0]:>14} b={e[1]:<5g}{' (dense mask)' if e[2] else '':13}: {sec * 1000:8.1f} ms "
                  f"({row['vs_dense']:.2f}x)" + (f", peak {row['peak_mib']:.0f} MiB ({row['mem_vs_dense']:.2f}x)"
                                                   if "peak_mib" in row else ""), flush=True)
    out = {"command": " ".join(["python benchmarks/cache_policy_overhead.py", *sys.argv[1:]]),
           "model": "configs/model/student_moe.yaml", "batch": 1, "seq_lens": args.seq_len, "budgets": args.budget,
           "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
           "rows": rows, "wall_s": round(time.perf_counter() - t_start, 1)}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    md = table(rows, args)
    path.with_suffix(".md").write_text(md)
    print(md)
    verdict(rows)
    plot(rows, args, path.with_suffix(".png"))


def table(rows: list[dict], args) -> str:
    """One row per (policy, budget), one column per T: 'time ratio / memory ratio' vs dense."""
    ts = args.seq_len
    mem = not args.no_memory
    head = "| policy | budget | " + " | ".join(f"T = {t:,}" for t in ts) + " |"
    lines = [("step time vs dense" + (" / peak memory vs dense" if mem else "") + " (dense: ms / MiB)"), "",
             head, "|---|---|" + "---|" * len(ts)]
    by = {(r["policy"], r["budget"], r["dense_mask"], r["seq_len"]): r for r in rows}
    keys = [("full", None, False)] + [(n, b, d) for d in (False, True) for b in args.budget for n in args.policies]
    for n, b, d in keys:
        if (n, b, d, ts[0]) not in by:
            continue
        cells = []
        for t in ts:
            r = by[n, b, d, t]
            if n == "full":
                cells.append(f"{r['step_s'] * 1000:.0f} ms" + (f" / {r['peak_mib']:.0f} MiB" if mem else ""))
            else:
                cells.append(f"{r['vs_dense']:.2f}×" + (f" / {r['mem_vs_dense']:.2f}×" if mem else ""))
        label = "dense (SDPA, causal)" if n == "full" else n + (" (dense mask)" if d else "")
        lines.append(f"| {label} | {'' if b is None else f'{b:g}'} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def verdict(rows: list[dict]) -> None:
    by = {(r["policy"], r["budget"], r["dense_mask"], r["seq_len"]): r for r in rows}
    for name, target in TARGETS.items():
        r = by.get((name, 0.125, False, 2048))
        if r is not None:
            print(f"target T=2048 b=0.125 {name}: {r['vs_dense']:.2f}x dense (target <= {target}): "
                  f"{'met' if r['vs_dense'] <= target else 'MISSED'}")
    for (name, b, d, t), r in by.items():
        if t == 4096 and b == 0.125 and not d and "mem_vs_dense" in r:
            print(f"target T=4096 b=0.125 {name}: peak memory {r['mem_vs_dense']:.2f}x dense (target <= 1): "
                  f"{'met' if r['mem_vs_dense'] <= 1 else 'MISSED'}")


def plot(rows: list[dict], args, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the plot is optional (pip install matplotlib)
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, len(args.budget), figsize=(5.5 * len(args.budget), 4), squeeze=False)
    dense = [r for r in rows if r["policy"] == "full"]
    for ax, b in zip(axes[0], args.budget):
        ax.plot([r["seq_len"] for r in dense], [r["step_s"] for r in dense], "k-o", lw=2.5, label="dense")
        for n in args.policies:
            pts = [r for r in rows if r["policy"] == n and r["budget"] == b and not r["dense_mask"]]
            ax.plot([r["seq_len"] for r in pts], [r["step_s"] for r in pts], "-o", ms=3, label=n)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("training step (s), forward + backward")
        ax.set_title(f"budget {b:g}")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Training-step time under each cache policy (MoE CPU-demo student, 2 CPU cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
