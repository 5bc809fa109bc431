"""Validation perplexity under every cache policy and budget, dense-trained vs policy-trained students.

    nice -n 10 python benchmarks/cache_policy_eval.py --train-missing   # train what is missing, then the table
    nice -n 10 python benchmarks/cache_policy_eval.py --agreement       # + chunked vs per-token H2O/LRU/LRU+

Checkpoints: the dense-trained student ``runs/student_ce`` (``fit --config recipes/student_ce.yaml``) and
every policy-trained student found under ``runs/student_<policy>`` (``recipes/student_streaming_llm.yaml``,
``recipes/student_h2o.yaml``); seed n > 0 of each lives in ``runs/<name>_seed<n>`` (same recipe with
``--seed_everything n``; ``--train-missing`` trains them). Each model is evaluated by
``pikv_train.evaluate.evaluate`` with the policy set on the loaded decoder (``set_cache_policy``), i.e. the
training-forward masks, on the same validation tokens (embedded corpus, 256-token sequences, so budget
0.25 = 64 keys per query). The full table uses seed 0; the claims (policy-trained vs dense-trained at
0.25) are reported per seed and as mean +- sd over seeds, dense and policy students of the same seed
compared. DuoAttention gates of a student not trained with them are set by on-the-fly head scoring
(``calibrate_gates``, 50% streaming). FlexGen rows: placement only (quality independent of the budget),
with 4-bit group-64 KV compression, and with ``attn_sparsity`` equal to the budget.
Writes benchmarks/results/cache_policy_eval.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from pikv_train.cache import CacheConfig, build_policy
from pikv_train.cache.policies import calibrate_gates
from pikv_train.data import TextDataModule
from pikv_train.evaluate import evaluate, load_decoder
from pikv_train.models.hooks import AttentionHook

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ["streaming_llm", "h2o", "quest", "flexgen", "lru", "lru_plus", "ada_kv", "duo_attention"]
# Extra table rows: label -> (policy, settings as a function of the budget).
VARIANTS = {
    "flexgen_kv4": ("flexgen", lambda b: {"kv_bits": 4, "kv_group_size": 64}),
    "flexgen_sparse": ("flexgen", lambda b: {"attn_sparsity": b}),
}
TRAINED = ["streaming_llm", "h2o"]  # policies with a recipes/student_<policy>.yaml
BUDGETS = [1.0, 0.5, 0.25, 0.125]
SEQ_LEN = 256  # data.seq_len of configs/data/embedded.yaml: the fixed reference length of the budgets


def run_dir(name: str, seed: int) -> Path:
    """runs/student_ce (dense) or runs/student_<policy>, with a _seed<n> suffix for seed n > 0."""
    base = "student_ce" if name == "dense" else f"student_{name}"
    return ROOT / "runs" / (base if seed == 0 else f"{base}_seed{seed}")


def train_missing(seeds: list[int]) -> None:
    for seed in seeds:
        for name in ["dense"] + TRAINED:
            out = run_dir(name, seed)
            if (out / "checkpoints/last.ckpt").is_file():
                continue
            recipe = "recipes/student_ce.yaml" if name == "dense" else f"recipes/student_{name}.yaml"
            print(f"training {out.relative_to(ROOT)} ({recipe}, seed {seed})", flush=True)
            subprocess.run([sys.executable, "-m", "pikv_train", "fit", "--config", recipe, "--seed_everything",
                            str(seed), "--out_dir", str(out), "--trainer.enable_progress_bar", "false"],
                           cwd=ROOT, check=True)


def set_policy(model, name: str, budget: float, calib: torch.Tensor, **extra):
    # Budgets refer to the 256-token validation sequences (data.seq_len), as in the training recipes.
    policy = build_policy(CacheConfig(policy=name, budget=budget, reference_len=SEQ_LEN, **extra), model.cfg)
    model.set_cache_policy(policy)
    if name == "duo_attention":  # none of these students was trained with DuoAttention gates
        calibrate_gates(model, calib)
    model.eval()  # after attaching: DuoAttention thresholds its gates in eval mode
    return policy


class _Recorder(AttentionHook):
    """Records each layer's rotated queries and keys and leaves attention unchanged."""

    def __init__(self):
        super().__init__()
        self.qk = []

    def training_mask(self, q, k, ctx):
        self.qk.append((q, k, ctx))
        return None


@torch.no_grad()
def agreement(model, loader, budget: float, chunk: int, n_batches: int) -> dict:
    """IoU of the visible sets (and share of identical rows) of chunk-C vs per-token (C=1) decisions."""
    out = {}
    for name in ("h2o", "lru", "lru_plus"):
        inter = union = same_rows = rows = 0
        for i, batch in enumerate(loader):
            if i >= n_batches:
                break
            rec = _Recorder()
            model.set_cache_policy(rec)
            model(batch["input_ids"])
            for q, k, ctx in rec.qk:
                pols = [build_policy(CacheConfig(policy=name, budget=budget, chunk_size=c, reference_len=SEQ_LEN))
                        for c in (chunk, 1)]
                b_tok = pols[0].budget_tokens()
                m_c, m_1 = (p.mask(q, k, ctx, b_tok) for p in pols)
                inter += int((m_c & m_1).sum())
                union += int((m_c | m_1).sum())
                same_rows += int((m_c == m_1).all(-1).sum())
                rows += m_c.shape[0] * m_c.shape[1] * m_c.shape[2]
        out[name] = {"iou": round(inter / union, 4), "identical_rows": round(same_rows / rows, 4)}
    model.set_cache_policy(None)
    return out


def _mean_sd(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f}" + (f" ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-batches", type=int, default=20, help="validation batches (16 x 256 tokens each)")
    ap.add_argument("--policies", nargs="*", default=POLICIES + list(VARIANTS))
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2], help="training seeds for the claims")
    ap.add_argument("--train-missing", action="store_true", help="train the missing students first (CLI)")
    ap.add_argument("--agreement", action="store_true", help="also measure chunked vs per-token decisions")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/cache_policy_eval"))
    args = ap.parse_args()
    if args.train_missing:
        train_missing(args.seeds)
    torch.manual_seed(0)
    dm = TextDataModule(**yaml.safe_load((ROOT / "configs/data/embedded.yaml").read_text())["data"])
    dm.setup("validate")
    loader = dm.val_dataloader()
    calib = next(iter(loader))["input_ids"][:4]
    t0 = time.perf_counter()
    ev = lambda m: evaluate(m, loader, max_batches=args.max_batches)["ppl"]  # noqa: E731

    # Claims over seeds: each policy-trained student vs the dense-trained student of the same seed.
    claims, per_seed = [], []
    full0, models0, ckpts = {}, {}, {}
    for seed in args.seeds:
        dense_dir = run_dir("dense", seed)
        if not (dense_dir / "checkpoints/last.ckpt").is_file():
            print(f"skip seed {seed}: no {dense_dir.relative_to(ROOT)} (run with --train-missing)", flush=True)
            continue
        dense = load_decoder(dense_dir / "checkpoints/last.ckpt")
        ckpts[f"dense/seed{seed}"] = str((dense_dir / "checkpoints/last.ckpt").relative_to(ROOT))
        dense_full = ev(dense)
        if seed == args.seeds[0]:
            models0["dense"], full0["dense"] = dense, dense_full
        for name in TRAINED:
            ck = run_dir(name, seed) / "checkpoints/last.ckpt"
            if not ck.is_file():
                continue
            ckpts[f"{name}/seed{seed}"] = str(ck.relative_to(ROOT))
            student = load_decoder(ck)
            own_dense = ev(student)
            set_policy(student, name, 0.25, calib)
            under = ev(student)
            student.set_cache_policy(None)
            set_policy(dense, name, 0.25, calib)
            dense_under = ev(dense)
            dense.set_cache_policy(None)
            row = {"policy": name, "seed": seed, "policy_trained_under_policy": round(under, 4),
                   "policy_trained_dense": round(own_dense, 4), "dense_trained_dense": round(dense_full, 4),
                   "dense_trained_under_policy": round(dense_under, 4)}
            per_seed.append(row)
            print(row, flush=True)
            if seed == args.seeds[0]:
                models0[name], full0[name] = student, own_dense
    for name in TRAINED:
        rs = [r for r in per_seed if r["policy"] == name]
        if not rs:
            continue
        under = [r["policy_trained_under_policy"] for r in rs]
        own = [r["policy_trained_dense"] for r in rs]
        dense_under = [r["dense_trained_under_policy"] for r in rs]
        claims.append({
            "policy": name, "budget": 0.25, "seeds": [r["seed"] for r in rs],
            "policy_trained_under_policy": _mean_sd(under), "policy_trained_dense": _mean_sd(own),
            "dense_trained_under_policy": _mean_sd(dense_under),
            "within_10pct_of_own_dense": all(r["policy_trained_under_policy"] <= 1.10 * r["policy_trained_dense"] for r in rs),
            "wins_vs_dense_trained": sum(r["policy_trained_under_policy"] < r["dense_trained_under_policy"] for r in rs),
            "mean_gap": round(statistics.mean(d - u for d, u in zip(dense_under, under)), 4),
        })

    # Full table on the first seed: the dense-trained student under every policy and budget.
    rows = []
    for label in args.policies:
        name, extra = VARIANTS.get(label, (label, lambda b: {}))
        for budget in BUDGETS:
            row = {"policy": label, "budget": budget}
            for who, model in models0.items():
                if who != "dense" and who != label:
                    continue
                set_policy(model, name, budget, calib, **extra(budget))
                row["dense_trained" if who == "dense" else "policy_trained"] = round(ev(model), 4)
                model.set_cache_policy(None)
            rows.append(row)
            print(row, flush=True)
    tokens = evaluate(models0["dense"], loader, max_batches=args.max_batches)["tokens"]
    result = {
        "val_tokens": tokens, "full_attention_ppl": {k: round(v, 4) for k, v in full0.items()},
        "checkpoints": ckpts, "rows": rows, "claims": claims, "per_seed": per_seed,
        "wall_s": round(time.perf_counter() - t0, 1), "torch": torch.__version__, "python": platform.python_version(),
    }
    if args.agreement:
        result["chunked_vs_per_token"] = {"budget": 0.25, "chunk_size": 32, "val_batches": 2,
                                          **agreement(models0["dense"], loader, 0.25, 32, 2)}
        print("chunked (C=32) vs per-token (C=1):", result["chunked_vs_per_token"], flush=True)
    md = [f"Validation perplexity (first {args.max_batches} validation batches, {tokens:,} byte tokens, T = 256) "
          f"under each policy, the mask active in the forward; students of seed {args.seeds[0]}.", "",
          "| policy | budget | dense-trained student | policy-trained student |", "|---|---|---|---|"]
    md.append(f"| full attention | 1.0 | {full0['dense']:.3f} | " + ", ".join(
        f"{k}: {v:.3f}" for k, v in full0.items() if k != "dense") + " |")
    for r in rows:
        pt = f"{r['policy_trained']:.3f}" if "policy_trained" in r else "–"
        md.append(f"| {r['policy']} | {r['budget']} | {r['dense_trained']:.3f} | {pt} |")
    if claims:
        md += ["", "Budget 0.25, mean ± sd over training seeds (each policy-trained student against the "
               "dense-trained student of the same seed):", "",
               "| trained with | seeds | ppl under policy | own dense ppl | within 10% | dense-trained under policy "
               "| policy-trained lower (seeds) | mean gap |", "|---|---|---|---|---|---|---|---|"]
        for c in claims:
            md.append(f"| {c['policy']} | {len(c['seeds'])} | {c['policy_trained_under_policy']} | "
                      f"{c['policy_trained_dense']} | {'yes' if c['within_10pct_of_own_dense'] else 'NO'} | "
                      f"{c['dense_trained_under_policy']} | {c['wins_vs_dense_trained']}/{len(c['seeds'])} | "
                      f"{c['mean_gap']:.3f} |")
    if args.agreement:
        md += ["", "Chunk-sequential decisions (C = 32) vs per-token (C = 1), budget 0.25, dense-trained student's "
               "attention on 2 validation batches: IoU of visible sets / share of identical rows: " + ", ".join(
                   f"{k} {v['iou']:.3f} / {v['identical_rows']:.3f}" for k, v in result["chunked_vs_per_token"].items()
                   if isinstance(v, dict))]
    Path(args.out + ".md").write_text("\n".join(md) + "\n")
    Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(md))
    print(f"wrote {args.out}.md and .json")


if __name__ == "__main__":
    main()
