"""Expert sharding × cache policy on a trained student: bytes per token, read fraction, quality.

    python benchmarks/sharding_policy.py --train-missing     # trains runs/student_ce first if it is missing (~1 min)

For each configuration (plain cache, sharding alone, H2O / StreamingLLM at budget 0.25 alone and with
sharding) on the CE-trained MoE student (``recipes/student_ce.yaml``, trained without either):

* **val NLL**: the training forward (``pikv_train.evaluate.evaluate``) on the first ``--val-batches`` batches
  of the validation split of ``configs/data/embedded.yaml`` (the split the student was trained with;
  256-token sequences, budgets refer to 256 tokens);
* decoding one 256-token validation sequence token by token with the deployed cache (``Decoder.new_cache()``):
  **read fraction** = keys each query reads / keys before it (itself included), averaged over queries,
  layers and kv-heads (``read_fraction()``), and **bytes per token** = ``bytes_stored()`` / 256: keys,
  values, positions, shard membership and policy state, all layers. The decoded logits are checked against
  the training forward (SPEC §7).

Sharding: ``by_routing`` (the query's own layer l-1 experts), 4 sinks, window 16, as in the README; one row
adds per-shard budgets (``shard_budget: 16``: each of the 4 shards keeps its 16 most recent members).
Writes benchmarks/results/sharding_policy.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from pikv_train.cache import CacheConfig, build_policy
from pikv_train.cache.sharding import ShardingConfig, build_sharding
from pikv_train.data import TextDataModule
from pikv_train.evaluate import evaluate, load_decoder

ROOT = Path(__file__).resolve().parent.parent
SEQ_LEN = 256
CONFIGS = [
    ("plain cache", None, None),
    ("sharding (by_routing)", "by_routing", None),
    ("sharding, per-shard budget 16", "by_routing/16", None),
    ("H2O 0.25", None, "h2o"),
    ("StreamingLLM 0.25", None, "streaming_llm"),
    ("sharding + H2O 0.25", "by_routing", "h2o"),
    ("sharding + StreamingLLM 0.25", "by_routing", "streaming_llm"),
]


def configure(model, sharding: str | None, policy: str | None) -> None:
    mode, _, budget = (sharding or "").partition("/")
    model.set_kv_sharding(None if sharding is None else build_sharding(ShardingConfig(
        enabled=True, read_mode=mode, n_sink=4, window=16, shard_budget=int(budget) if budget else None), model.cfg))
    model.set_cache_policy(None if policy is None else build_policy(
        CacheConfig(policy=policy, budget=0.25, reference_len=SEQ_LEN), model.cfg))
    model.eval()


@torch.no_grad()
def decode(model, x: torch.Tensor) -> tuple[float, float, float]:
    """Decode x token by token with the deployed cache: (bytes per token it holds, the fraction of earlier keys
    a query reads, max |decode - train| / max |train|)."""
    cache = model.new_cache()
    pos = torch.arange(x.shape[1]).expand_as(x)
    outs = [model.logits(model(x[:, i: i + 1], positions=pos[:, i: i + 1], cache=cache).hidden) for i in range(x.shape[1])]
    train = model.logits(model(x).hidden)
    gap = float((torch.cat(outs, 1) - train).abs().max() / train.abs().max())
    read = cache.read_fraction() if hasattr(cache, "read_fraction") else 1.0  # a plain cache reads every key
    return cache.bytes_stored() / x.shape[1], read, gap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", default=str(ROOT / "runs/student_ce/checkpoints/last.ckpt"))
    ap.add_argument("--train-missing", action="store_true", help="train runs/student_ce if the checkpoint is missing")
    ap.add_argument("--val-batches", type=int, default=20, help="validation batches of 16 x 256 tokens (as cache_policy_eval)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if not Path(args.ckpt).is_file():
        if not args.train_missing:
            sys.exit(f"error: no checkpoint at {args.ckpt}; run with --train-missing or fit recipes/student_ce.yaml")
        subprocess.run([sys.executable, "-m", "pikv_train", "fit", "--config", "recipes/student_ce.yaml",
                        "--trainer.enable_progress_bar", "false"], cwd=ROOT, check=True)
    dm = TextDataModule(**yaml.safe_load((ROOT / "configs/data/embedded.yaml").read_text())["data"])  # as trained
    dm.setup("fit")
    loader = dm.val_dataloader()
    first = next(iter(loader))["input_ids"][:1]
    model = load_decoder(args.ckpt)
    rows = []
    for label, sharding, policy in CONFIGS:
        t0 = time.perf_counter()
        configure(model, sharding, policy)
        ev = evaluate(model, loader, max_batches=args.val_batches)
        bpt, read, gap = decode(model, first)
        rows.append({"config": label, "val_nll": round(ev["nll"], 4), "read_fraction": round(read, 3),
                     "bytes_per_token": round(bpt, 1), "decode_vs_train_rel_gap": gap, "tokens": ev["tokens"]})
        print(rows[-1], f"({time.perf_counter() - t0:.0f} s)", flush=True)
    plain = rows[0]["bytes_per_token"]
    md = [f"Student: {Path(args.ckpt).relative_to(ROOT) if Path(args.ckpt).is_relative_to(ROOT) else args.ckpt}; "
          f"val NLL over {rows[0]['tokens']:,} validation tokens (256-token sequences); bytes after decoding one "
          "256-token sequence with the deployed cache.", "",
          "| configuration | val NLL | read fraction | bytes / token | vs plain cache |", "|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['config']} | {r['val_nll']:.4f} | {r['read_fraction']:.3f} | {r['bytes_per_token']:,.0f} | "
                  f"{r['bytes_per_token'] / plain:.2f} |")
    md += ["", f"Decoding equals the training forward in every row (max relative logit gap "
               f"{max(r['decode_vs_train_rel_gap'] for r in rows):.1e})."]
    out = ROOT / "benchmarks/results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "sharding_policy.md").write_text("\n".join(md) + "\n")
    (out / "sharding_policy.json").write_text(json.dumps({
        "rows": rows, "seq_len": SEQ_LEN, "val_batches": args.val_batches, "torch": torch.__version__,
        "python": platform.python_version()}, indent=1) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
