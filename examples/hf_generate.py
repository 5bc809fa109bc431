"""Serve a distilled student with plain transformers, with and without our cache (issue 15, item 4).

Exports the student checkpoint to a Hugging Face folder (what ``python -m pikv_train export`` does) unless the folder
exists,
reloads it with ``AutoModelForCausalLM`` / ``AutoTokenizer`` (no remote code), then generates greedily from the same
prompts three ways and prints the text, tokens/s and the KV bytes each cache holds at the end:

1. transformers' own ``DynamicCache`` (full attention, ``attn_implementation="sdpa"``);
2. ``PiKVCache.from_pretrained(folder)``: the cache the student was trained under (``pikv_cache.json``);
3. ``PiKVCache(policy=--policy, budget=--budget)``: a policy chosen here (training-free unless the student trained
   under it).

    python examples/hf_generate.py                       # the main job's distilled student, H2O keeping 64 keys per head
    python examples/hf_generate.py --ckpt runs/student_h2o/checkpoints/last.ckpt --out runs/student_h2o/hf

Run the main job first (README, "Two commands"): it writes runs/distill/checkpoints/last.ckpt.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

# The embedded corpus is Python's standard library: prompts a student trained on it can continue.
PROMPTS = ["import os\nimport sys\n\n\ndef ", "class Queue:\n    def __init__(self", "    for i in range("]


def export(ckpt: Path, out: Path) -> None:
    from pikv_train.errors import UserError
    from pikv_train.hf import export_checkpoint
    from pikv_train.hf.command import summary

    if (out / "config.json").is_file():
        print(f"using the exported folder {out}")
        return
    try:
        print(summary(export_checkpoint(ckpt, out)))
    except UserError as e:
        sys.exit(f"error: {e}")


@torch.no_grad()
def run(model, tok, cache, new_tokens: int) -> dict:
    """Greedy generation of PROMPTS (one left-padded batch) with ``cache`` (None: transformers' DynamicCache)."""
    from transformers import DynamicCache

    from pikv_train.hf import kv_bytes

    tok.padding_side = "left"
    batch = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    cache = DynamicCache(config=model.config) if cache is None else cache
    t0 = time.perf_counter()
    out = model.generate(**batch, cache=cache, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens,
                         pad_token_id=tok.pad_token_id)
    dt = time.perf_counter() - t0
    gen = out[:, batch["input_ids"].shape[1]:]
    return {"text": tok.batch_decode(gen, skip_special_tokens=True), "tok_s": gen.numel() / dt,
            "bytes": kv_bytes(cache), "tokens": gen}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", type=Path, default=Path("runs/distill/checkpoints/last.ckpt"))
    ap.add_argument("--out", type=Path, default=Path("runs/distill/hf"), help="the Hugging Face folder")
    ap.add_argument("--policy", default="h2o", help="policy of the third run (a cache.policy name)")
    ap.add_argument("--budget", type=float, default=64, help="its budget: a token count (> 1), or a fraction of --reference-len")
    ap.add_argument("--reference-len", type=int, default=None,
                    help="length a fractional budget refers to (default: the model's max_position_embeddings)")
    ap.add_argument("--new-tokens", type=int, default=200)
    args = ap.parse_args()

    export(args.ckpt, args.out)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import pikv_train.hf  # noqa: F401  (registers attn_implementation="pikv")
    from pikv_train.hf import PiKVCache

    tok = AutoTokenizer.from_pretrained(args.out)
    model = AutoModelForCausalLM.from_pretrained(args.out).eval()  # plain transformers: sdpa attention
    torch.manual_seed(0)
    rows = [("transformers DynamicCache (full)", run(model, tok, None, args.new_tokens))]
    model.set_attn_implementation("pikv")
    from pikv_train.errors import UserError

    try:
        trained = PiKVCache.from_pretrained(args.out)
    except UserError as e:  # e.g. a student trained with expert-sharded KV
        sys.exit(f"error: {e}")
    rows.append((f"PiKVCache as trained: {trained.cache_cfg.policy}, budget {trained.cache_cfg.budget}",
                 run(model, tok, trained, args.new_tokens)))
    extra = {} if args.reference_len is None else {"reference_len": args.reference_len}
    chosen = PiKVCache(args.policy, budget=args.budget, **extra)
    rows.append((f"PiKVCache {args.policy}, budget {args.budget:g}", run(model, tok, chosen, args.new_tokens)))

    full = rows[0][1]["bytes"]
    for name, r in rows:
        print(f"\n=== {name}: {r['tok_s']:.0f} tokens/s, KV {r['bytes'] / 1024:.1f} KiB ({r['bytes'] / full:.1%} of full)")
        for prompt, text in zip(PROMPTS, r["text"]):
            print(f"  {prompt!r} -> {text[:120]!r}")
    same = [int((r["tokens"] == rows[0][1]["tokens"]).sum()) for _, r in rows[1:]]
    n = rows[0][1]["tokens"].numel()
    print(f"\ntokens equal to full attention's: {same[0]}/{n} with the trained cache, {same[1]}/{n} with the chosen one")

if __name__ == "__main__":
    main()
