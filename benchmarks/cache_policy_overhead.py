"""Training-step time under each cache policy vs dense attention, side by side in one run (CPU, T=1024).

    nice -n 10 python benchmarks/cache_policy_overhead.py              # T=1024, budget 0.25
    python benchmarks/cache_policy_overhead.py --seq-len 256 --steps 2   # quick look

The model is the CPU-demo MoE student (configs/model/student_moe.yaml, max_seq_len raised to T), batch
1, fp32; one step = forward + backward of the CE loss, no optimizer. Each policy is timed after a
warm-up step, as the median of ``--steps`` steps; the overhead is mask building (and, for H2O/LRU/LRU+,
the no-grad dense scoring pass; for soft DuoAttention, the second attention pass). Writes
benchmarks/results/cache_policy_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import yaml

from pikv_train.cache import CacheConfig, build_policy
from pikv_train.distill import chunked_cross_entropy
from pikv_train.models import Decoder, ModelConfig

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ["full", "streaming_llm", "h2o", "quest", "flexgen", "lru", "lru_plus", "ada_kv", "duo_attention"]


def step_time(model: Decoder, x: torch.Tensor, steps: int) -> float:
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        h = model(x).hidden.flatten(0, 1)
        loss = chunked_cross_entropy(h, model.head_weight, x.roll(-1, 1).flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)
        if i:  # the first step is warm-up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/cache_policy_overhead.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg_d = yaml.safe_load((ROOT / "configs/model/student_moe.yaml").read_text())
    cfg = ModelConfig.from_dict({**cfg_d, "max_seq_len": max(cfg_d["max_seq_len"], args.seq_len)})
    model = Decoder(cfg).train()
    x = torch.randint(0, cfg.vocab_size, (1, args.seq_len))
    rows = []
    step_time(model, x, 2)  # process warm-up (allocator, kernels) before the first timed policy
    for name in POLICIES:
        pol = build_policy(CacheConfig(policy=name, budget=args.budget if name != "full" else 1.0), cfg)
        if name == "duo_attention":
            with torch.no_grad():
                pol.gates.fill_(0.5)  # soft gates: both attention passes, the training cost
        model.set_cache_policy(pol)
        model.train()
        sec = step_time(model, x, args.steps)
        rows.append({"policy": name, "step_s": round(sec, 4)})
        print(f"{name:>14}: {sec * 1000:8.1f} ms/step", flush=True)
    model.set_cache_policy(None)
    dense = rows[0]["step_s"]
    for r in rows:
        r["vs_dense"] = round(r["step_s"] / dense, 3)
    print(f"\n| policy (budget {args.budget}) | step time (T={args.seq_len}, CPU) | vs dense |\n|---|---|---|")
    for r in rows:
        print(f"| {r['policy']} | {r['step_s'] * 1000:.1f} ms | {r['vs_dense']:.2f}x |")
    out = {
        "seq_len": args.seq_len, "budget": args.budget, "batch": 1, "steps": args.steps, "rows": rows,
        "model": "configs/model/student_moe.yaml", "torch": torch.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
