"""Training-step time under each cache policy vs dense attention, side by side in one run (CPU, T=1024).

    python benchmarks/cache_policy_overhead.py                         # T=1024, budget 0.25 (idle machine)
    python benchmarks/cache_policy_overhead.py --seq-len 256 --steps 2   # quick look

The model is the CPU-demo MoE student (configs/model/student_moe.yaml, max_seq_len raised to T), batch
1, fp32; one step = forward + backward of the CE loss, no optimizer. Policies are timed round-robin (one
step of each per round, after a warm-up round), each figure the median over ``--steps`` rounds; the
overhead is mask building (and, for H2O/LRU/LRU+, the no-grad dense scoring pass; for soft
DuoAttention, the second attention pass; for FlexGen's 4-bit KV the quantize-dequantize and an attention
over 2T keys; for its sparse mode a materialised softmax and ranking). Writes
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
# FlexGen's lossy knobs: 4-bit group-64 KV (fake-quant + a 2T-key attention) and sparse values.
VARIANTS = {"flexgen_kv4": ("flexgen", {"kv_bits": 4}), "flexgen_sparse": ("flexgen", {"attn_sparsity": 0.25})}


def one_step(model: Decoder, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    h = model(x).hidden.flatten(0, 1)
    chunked_cross_entropy(h, model.head_weight, x.roll(-1, 1).flatten()).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--steps", type=int, default=11, help="timed rounds")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/cache_policy_overhead.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg_d = yaml.safe_load((ROOT / "configs/model/student_moe.yaml").read_text())
    cfg = ModelConfig.from_dict({**cfg_d, "max_seq_len": max(cfg_d["max_seq_len"], args.seq_len)})
    model = Decoder(cfg).train()
    x = torch.randint(0, cfg.vocab_size, (1, args.seq_len))
    policies = {}
    for name in POLICIES + list(VARIANTS):
        policy, extra = VARIANTS.get(name, (name, {}))
        pol = build_policy(CacheConfig(policy=policy, budget=args.budget if name != "full" else 1.0, **extra), cfg)
        if name == "duo_attention":
            with torch.no_grad():
                pol.gates.fill_(0.5)  # soft gates: both attention passes, the training cost
        policies[name] = pol
    times = {name: [] for name in policies}
    # Round-robin: every round times one step of each policy, so drift in machine load hits all of them
    # alike, starting one policy later each round so no policy always follows the same one (allocator
    # state after a heavy step); round 0 is warm-up. The figure is the median over rounds.
    names = list(policies)
    for rnd in range(args.steps + 1):
        for name in names[rnd % len(names):] + names[: rnd % len(names)]:
            pol = policies[name]
            model.set_cache_policy(pol)
            model.train()
            sec = one_step(model, x)
            if rnd:
                times[name].append(sec)
    rows = []
    for name, ts in times.items():
        sec = statistics.median(ts)
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
