"""Validation perplexity under every cache policy and budget, dense-trained vs policy-trained students.

    nice -n 10 python benchmarks/cache_policy_eval.py                 # table (first 20 val batches)
    nice -n 10 python benchmarks/cache_policy_eval.py --agreement     # + chunked vs per-token H2O/LRU/LRU+

Checkpoints: the dense-trained student ``runs/student_ce`` (``fit --config recipes/student_ce.yaml``) and
every policy-trained student found under ``runs/student_<policy>`` (``recipes/student_streaming_llm.yaml``,
``recipes/student_h2o.yaml``). Each model is evaluated by ``pikv_train.evaluate.evaluate`` with the policy
set on the loaded decoder (``set_cache_policy``), i.e. the training-forward masks, on the same validation
tokens (embedded corpus, 256-token sequences, so budget 0.25 = 64 keys per query). DuoAttention gates of a
student not trained with them are set by on-the-fly head scoring (``calibrate_gates``, 50% streaming).
Writes benchmarks/results/cache_policy_eval.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import yaml

from pikv_train.cache import CacheConfig, build_policy
from pikv_train.cache.policies import calibrate_gates, dense_probs
from pikv_train.data import TextDataModule
from pikv_train.evaluate import evaluate, load_decoder
from pikv_train.models.hooks import AttentionHook

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ["streaming_llm", "h2o", "quest", "flexgen", "lru", "lru_plus", "ada_kv", "duo_attention"]
BUDGETS = [1.0, 0.5, 0.25, 0.125]


def set_policy(model, name: str, budget: float, calib: torch.Tensor):
    policy = build_policy(CacheConfig(policy=name, budget=budget), model.cfg)
    model.set_cache_policy(policy)
    if name == "duo_attention":  # none of these students was trained with DuoAttention gates
        calibrate_gates(model, calib)
    model.eval()  # after attaching: DuoAttention thresholds its gates in eval mode
    return policy


class _Recorder(AttentionHook):
    """Records each layer's dense attention (B, H_kv, T, T) and leaves attention unchanged."""

    def __init__(self):
        super().__init__()
        self.probs = []

    def training_mask(self, q, k, ctx):
        self.probs.append(dense_probs(q, k))
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
            t = batch["input_ids"].shape[1]
            for a in rec.probs:
                pols = [build_policy(CacheConfig(policy=name, budget=budget, chunk_size=c)) for c in (chunk, 1)]
                b_tok = pols[0].budget_tokens(t)
                m_c, m_1 = (p.mask_from_probs(a, b_tok) for p in pols)
                inter += int((m_c & m_1).sum())
                union += int((m_c | m_1).sum())
                same_rows += int((m_c == m_1).all(-1).sum())
                rows += m_c.shape[0] * m_c.shape[1] * m_c.shape[2]
        out[name] = {"iou": round(inter / union, 4), "identical_rows": round(same_rows / rows, 4)}
    model.set_cache_policy(None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-batches", type=int, default=20, help="validation batches (16 x 256 tokens each)")
    ap.add_argument("--policies", nargs="*", default=POLICIES)
    ap.add_argument("--agreement", action="store_true", help="also measure chunked vs per-token decisions")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/cache_policy_eval"))
    args = ap.parse_args()
    torch.manual_seed(0)
    dm = TextDataModule(**yaml.safe_load((ROOT / "configs/data/embedded.yaml").read_text())["data"])
    dm.setup("validate")
    loader = dm.val_dataloader()
    calib = next(iter(loader))["input_ids"][:4]
    students = {"dense": ROOT / "runs/student_ce/checkpoints/last.ckpt"}
    for name in POLICIES:
        ck = ROOT / f"runs/student_{name}/checkpoints/last.ckpt"
        if ck.is_file():
            students[name] = ck
    t0 = time.perf_counter()
    models = {k: load_decoder(v) for k, v in students.items()}
    full = {k: evaluate(m, loader, max_batches=args.max_batches) for k, m in models.items()}
    tokens = full["dense"]["tokens"]
    print("full attention:", {k: round(v["ppl"], 4) for k, v in full.items()}, flush=True)
    rows = []
    for name in args.policies:
        for budget in BUDGETS:
            row = {"policy": name, "budget": budget}
            for who, model in models.items():
                if who != "dense" and who != name:
                    continue
                set_policy(model, name, budget, calib)
                res = evaluate(model, loader, max_batches=args.max_batches)
                model.set_cache_policy(None)
                row["dense_trained" if who == "dense" else "policy_trained"] = round(res["ppl"], 4)
            rows.append(row)
            print(row, flush=True)
    claims = []
    for name in POLICIES:
        if name not in models:
            continue
        r = next(x for x in rows if x["policy"] == name and x["budget"] == 0.25)
        own_dense = full[name]["ppl"]
        claims.append({
            "policy": name, "budget": 0.25, "policy_trained_under_policy": r["policy_trained"],
            "policy_trained_dense": round(own_dense, 4), "dense_trained_under_policy": r["dense_trained"],
            "within_10pct_of_own_dense": r["policy_trained"] <= 1.10 * own_dense,
            "beats_dense_trained_under_policy": r["policy_trained"] < r["dense_trained"],
        })
    result = {
        "val_tokens": tokens, "full_attention_ppl": {k: round(v["ppl"], 4) for k, v in full.items()},
        "checkpoints": {k: str(v.relative_to(ROOT)) for k, v in students.items()}, "rows": rows, "claims": claims,
        "wall_s": round(time.perf_counter() - t0, 1), "torch": torch.__version__, "python": platform.python_version(),
    }
    if args.agreement:
        result["chunked_vs_per_token"] = {"budget": 0.25, "chunk_size": 32, "val_batches": 2,
                                          **agreement(models["dense"], loader, 0.25, 32, 2)}
        print("chunked (C=32) vs per-token (C=1):", result["chunked_vs_per_token"], flush=True)
    md = [f"Validation perplexity (first {args.max_batches} validation batches, {tokens:,} byte tokens, T = 256) "
          "under each policy, the mask active in the forward.", "",
          "| policy | budget | dense-trained student | policy-trained student |", "|---|---|---|---|"]
    md.append(f"| full attention | 1.0 | {full['dense']['ppl']:.3f} | " + ", ".join(
        f"{k}: {v['ppl']:.3f}" for k, v in full.items() if k != "dense") + " |")
    for r in rows:
        pt = f"{r['policy_trained']:.3f}" if "policy_trained" in r else "–"
        md.append(f"| {r['policy']} | {r['budget']} | {r['dense_trained']:.3f} | {pt} |")
    if claims:
        md += ["", "| trained with | ppl under policy @0.25 | own dense ppl | within 10% | dense-trained under policy @0.25 | lower |",
               "|---|---|---|---|---|---|"]
        for c in claims:
            md.append(f"| {c['policy']} | {c['policy_trained_under_policy']:.3f} | {c['policy_trained_dense']:.3f} | "
                      f"{'yes' if c['within_10pct_of_own_dense'] else 'NO'} | {c['dense_trained_under_policy']:.3f} | "
                      f"{'yes' if c['beats_dense_trained_under_policy'] else 'NO'} |")
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
