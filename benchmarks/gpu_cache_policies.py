"""GPU: attention forward+backward time at T = 8192 under each cache policy at budget 0.125 vs dense (causal)
attention, with FlexAttention block masks and with the block-sparse path (pikv_train/cache/policies/blocks.py).
Goal (issues 5 and 17): StreamingLLM and Quest at least 3x faster than dense.

    python benchmarks/gpu_cache_policies.py              # CUDA; prints a message and exits 0 on CPU
    python benchmarks/gpu_cache_policies.py --dry-run    # tiny shapes on CPU through the same code (eager)

Shapes: batch 1, 16 query heads, 4 kv-heads, head_dim 64, bf16 on CUDA. Dense is FlexAttention with the
causal block mask (and, for reference, SDPA is_causal); the policies use their own ``mask_mod`` (sinks +
window; Quest's per-query page selection; the chunk-sequential keep sets of H2O, LRU, LRU+ and AdaKV), each
policy's decision pass included in its time, and, as ``<policy>_blocks``, the block-sparse path (the policy's
block plan and one SDPA over every block's gathered keys).
Block masks skip empty 128 x 128 tiles. Writes benchmarks/results/gpu_cache_policies.json (or
..._dry_run.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pikv_train.cache import CacheConfig, build_policy
from pikv_train.cache.policies.blocks import block_attend
from pikv_train.cache.policies.flex import block_mask_for, flex_attend
from pikv_train.models.hooks import AttentionContext

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ("streaming_llm", "quest", "h2o", "lru", "lru_plus", "ada_kv")


def timed(fn, reps: int, cuda: bool) -> float:
    fn()  # warm-up / compile
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (checks the code path, no timing claim)")
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--budget", type=float, default=0.125)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("gpu_cache_policies: no CUDA device; nothing measured (use --dry-run to exercise the code on CPU)")
        return
    dev = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    t, h, hkv, hd = (args.seq_len, 16, 4, 64) if cuda else (128, 4, 2, 16)
    reps = args.reps if cuda else 1
    torch.manual_seed(0)
    q = torch.randn(1, h, t, hd, device=dev, dtype=dtype, requires_grad=cuda)
    k = torch.randn(1, hkv, t, hd, device=dev, dtype=dtype, requires_grad=cuda)
    v = torch.randn(1, hkv, t, hd, device=dev, dtype=dtype, requires_grad=cuda)
    ctx = AttentionContext(layer_idx=99, positions=torch.arange(t, device=dev)[None])  # past Quest's dense layers
    page = 16 if cuda else 4
    block = 128 if cuda else 16

    def run(mask_mod):
        def f():
            out = flex_attend(q, k, v, mask_mod, block)
            if cuda:
                out.float().sum().backward()
            return out
        return f

    rows = {}
    rows["dense_flex_causal"] = timed(run(None), reps, cuda)
    if cuda:
        def sdpa():
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).float().sum().backward()
        rows["dense_sdpa_causal"] = timed(sdpa, reps, cuda)
    for name in POLICIES:
        pol = build_policy(CacheConfig(policy=name, budget=args.budget, page_size=page, reference_len=t))
        budget = pol.budget_tokens(t)

        def f(pol=pol, budget=budget):
            mm = pol.mask_mod(q, k, ctx, budget)  # includes the policy's selection / decision pass
            out = flex_attend(q, k, v, mm, block)
            if cuda:
                out.float().sum().backward()

        def blocks(pol=pol, budget=budget):
            out = block_attend(q, k, v, pol.block_plan(q, k, ctx, budget))
            if cuda:
                out.float().sum().backward()
        rows[name] = timed(f, reps, cuda)
        rows[name + "_blocks"] = timed(blocks, reps, cuda)
        bm = block_mask_for(pol.mask_mod(q, k, ctx, budget), 1, h, hkv, t, t, dev, block)
        rows[name + "_block_sparsity"] = float(bm.sparsity()) if hasattr(bm, "sparsity") else None
    out = {
        "device": torch.cuda.get_device_name() if cuda else "cpu (dry run, eager FlexAttention)",
        "seq_len": t, "budget": args.budget, "heads": h, "kv_heads": hkv, "head_dim": hd, "dtype": str(dtype),
        "seconds_fwd_bwd": {k_: v_ for k_, v_ in rows.items() if not k_.endswith("sparsity")},
        "block_sparsity_pct": {k_: v_ for k_, v_ in rows.items() if k_.endswith("sparsity")},
    }
    dense = rows["dense_flex_causal"]
    out["speedup_vs_dense_flex"] = {n: round(dense / rows[n], 2) for n in rows if not n.endswith("sparsity")}
    print(json.dumps(out, indent=2))
    name = "gpu_cache_policies" + ("" if cuda else "_dry_run") + ".json"
    path = ROOT / "benchmarks/results" / name
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
