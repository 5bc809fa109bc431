"""Expert load balance and expert-sharded KV read modes of the distilled student (README "Routing").

    python benchmarks/routing_sharding.py --train-missing    # trains runs/distill_eplb if missing (~2.5 min)

* **max/mean expert load** per layer over the whole validation split (the routed assignments of every
  validation token, summed per layer): the distilled student of ``recipes/distill.yaml``
  (TopKBalancedRouter, from the main job) and the same recipe with ``router.name: eplb`` (auxiliary-loss-free
  bias balancing), trained here into ``runs/distill_eplb`` when missing;
* **sharded KV read modes** on the distilled student (trained without sharding; 4 sinks, window 16):
  validation NLL over the whole split under each read mode, and the fraction of cached tokens a query reads
  (``router/kv_read_fraction`` of the training forward, averaged over batches).

Writes benchmarks/results/routing_sharding.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from pikv_train.cache.sharding import ShardingConfig, build_sharding
from pikv_train.data import TextDataModule
from pikv_train.evaluate import evaluate, load_decoder

ROOT = Path(__file__).resolve().parent.parent
READ_MODES = [("by_routing (the query's own layer ℓ−1 experts)", dict(read_mode="by_routing")),
              ("by_score, 2 shards (MoBA-style q · mean key)", dict(read_mode="by_score", read_shards=2)),
              ("by_score, 1 shard", dict(read_mode="by_score", read_shards=1))]


@torch.no_grad()
def max_over_mean_load(model, loader) -> list[float]:
    """Per layer: max expert load / mean expert load over every validation token."""
    counts = None
    for batch in loader:
        out = model(batch["input_ids"])
        c = torch.stack([r.counts for r in out.routing])  # (L, E)
        counts = c if counts is None else counts + c
    return [round(float(c.max() / c.mean()), 3) for c in counts]


@torch.no_grad()
def read_fraction(model, loader) -> float:
    vals = [float(model(b["input_ids"]).stats["router/kv_read_fraction"]) for b in loader]
    return sum(vals) / len(vals)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train-missing", action="store_true", help="train runs/distill_eplb if it is missing")
    args = ap.parse_args()
    torch.set_num_threads(2)
    distill = ROOT / "runs/distill/checkpoints/last.ckpt"
    eplb = ROOT / "runs/distill_eplb/checkpoints/last.ckpt"
    if not distill.is_file():
        sys.exit("error: runs/distill has no checkpoint; run python benchmarks/main_job.py first")
    if not eplb.is_file():
        if not args.train_missing:
            sys.exit("error: runs/distill_eplb is missing; run with --train-missing")
        subprocess.run([sys.executable, "-m", "pikv_train", "fit", "--config", "recipes/distill.yaml",
                        "--model.init_args.student.moe.router.name", "eplb", "--out_dir", "runs/distill_eplb",
                        "--trainer.enable_progress_bar", "false"], cwd=ROOT, check=True)
    dm = TextDataModule(**yaml.safe_load((ROOT / "configs/data/embedded.yaml").read_text())["data"])
    dm.setup("fit")
    loader = dm.val_dataloader()
    loads = {name: max_over_mean_load(load_decoder(p), loader) for name, p in (("topk_balanced", distill), ("eplb", eplb))}
    model = load_decoder(distill)
    full = evaluate(model, loader)
    rows = []
    for label, kw in READ_MODES:
        model.set_kv_sharding(build_sharding(ShardingConfig(enabled=True, n_sink=4, window=16, **kw), model.cfg))
        rows.append({"read_mode": label, "val_nll": round(evaluate(model, loader)["nll"], 4),
                     "read_fraction": round(read_fraction(model, loader), 3)})
        print(rows[-1], flush=True)
    md = [f"Max/mean expert load per layer over the whole validation split ({full['tokens']:,} tokens): "
          + "; ".join(f"{n}: {', '.join(f'{x:.2f}' for x in v)} (worst {max(v):.2f})" for n, v in loads.items()), "",
          f"| read mode | val NLL (full cache {full['nll']:.4f}) | fraction of cached tokens a query reads |",
          "|---|---|---|"]
    md += [f"| {r['read_mode']} | {r['val_nll']:.4f} | {r['read_fraction']:.3f} |" for r in rows]
    out = ROOT / "benchmarks/results"
    (out / "routing_sharding.md").write_text("\n".join(md) + "\n")
    (out / "routing_sharding.json").write_text(json.dumps({"max_over_mean_load": loads, "full_nll": full["nll"],
                                                           "read_modes": rows, "tokens": full["tokens"]}, indent=1) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
