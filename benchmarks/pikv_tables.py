"""The PiKV seed's two tables, measured with our students in one run (issue 14 item 4).

    python benchmarks/pikv_tables.py                 # both tables, 100 distillation steps per configuration
    python benchmarks/pikv_tables.py --reuse         # keep finished runs under runs/pikv_tables/
    python benchmarks/pikv_tables.py --device cuda --dtype bf16 --context 8192   # the GPU run (benchmarks/gpu.sh)

The seed claims, for Standard MoE / PiKV (no compression) / PiKV (Pyramid) / PiKV (Quantized): memory 100 / 85 /
52 / 35 %, speed 1.0 / 1.3 / 1.8 / 2.2x, quality 100 / 99 / 98 / 94 %; no code ever produced them. Here:

**Start**: the main job's distilled MoE student (``runs/distill``; trained through the CLI, teacher first, when
missing). **Trained-under**: ``--steps`` more distillation steps from it under the configuration, through the real
CLI (``fit --config recipes/distill.yaml --model.init_args.student_init ...``); **Standard MoE** is the same
``--steps`` with nothing on, and every quality figure is relative to it. **Training-free**: the Standard-MoE start
run under the configuration without training.

Performance table (configurations in ``PERF``): Standard MoE (plain cache, no sharding); PiKV (no compression):
expert-sharded KV (by routing, 4 sinks, window 16) + H2O at 3/8 of the 512-token reference length (192 tokens);
PiKV (Pyramid) and PiKV (Quantized): the same + MiKV mixed precision (byte budget 0.3) or KIVI 2-bit (G 32, R 32).
Compression table: every compressor in the registries (storage and token) at the setting in ``RECOMMENDED``, alone
(policy full, no sharding); compressors not built yet are listed as such.

Columns, every figure measured in this run:

* **KV memory**: ``cache.bytes_stored()`` of the deployed cache (``model.new_cache()``: policy, sharding state,
  codes, scales, positions: everything it holds) after reading one validation sequence (``--seq`` 256 tokens, the
  context the quality is measured at), as % of Standard MoE's plain cache; also per token at the decode context.
* **Decode**: batch-1 tokens/s after a ``--context``-token prefill (2,048), one thread, steps timed round-robin
  over the configurations (median), as x Standard MoE. Budgets stay those of training (fractions of the 512-token
  reference length), so at 2,048 tokens an evicting configuration holds far fewer tokens than the full cache.
* **Peak memory during decoding**: each performance configuration in a process of its own; the kernel's peak
  resident set (VmHWM) is reset after the model is built (``/proc/self/clear_refs``), so the figure is the peak
  over prefill + decoding; the increase over the resident set before the prefill is reported as well.
* **Quality**: validation perplexity (``pikv_train.evaluate``, first ``--val-batches`` batches, the training
  forward with the configuration active: SPEC §7 makes it equal to decoding with its cache), retained = Standard
  MoE's ppl / the configuration's ppl.

Writes benchmarks/results/pikv_tables.{json,md} and pikv_tables_memory_quality.png, pikv_tables_speed_quality.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import compression as C  # noqa: E402  the same CLI runner, start and checkpoint helpers

RUNS = ROOT / "runs/pikv_tables"
DTYPES: dict = {}  # filled in main(): fp32 / bf16 -> torch dtypes
RESULTS = ROOT / "benchmarks/results"
SHARDING = {"enabled": True}  # by routing, 4 sinks, window 16 (ShardingConfig defaults)
POLICY = {"policy": "h2o", "budget": 0.375}
PERF = [  # (key, label, cache config or None, sharding or None)
    ("standard", "Standard MoE", None, None),
    ("pikv", "PiKV (no compression)", POLICY, SHARDING),
    ("pikv_pyramid", "PiKV (Pyramid)", {**POLICY, "compressor": {"name": "pyramid", "byte_budget": 0.3}}, SHARDING),
    ("pikv_quantized", "PiKV (Quantized)", {**POLICY, "compressor": {"name": "quantized", "bits": 2, "group_size": 32,
                                                                       "residual": 32}}, SHARDING),
]
SEED = {"standard": (100, 1.0, 100), "pikv": (85, 1.3, 99), "pikv_pyramid": (52, 1.8, 98), "pikv_quantized": (35, 2.2, 94)}
RECOMMENDED = {  # compression table: name -> (setting label, cache config)
    "quantized": ("KIVI 2-bit, G 32, R 32", {"compressor": {"name": "quantized", "bits": 2, "group_size": 32, "residual": 32}}),
    "pyramid": ("MiKV, byte budget 0.3", {"compressor": {"name": "pyramid", "byte_budget": 0.3}}),
    "svd": ("Palu, rank d_h/2", {"compressor": {"name": "svd", "rank": 0.5}}),
    "lora": ("rank d_h/4", {"compressor": {"name": "lora", "rank": 0.25}}),
    "lora_plus": ("rank d_h/4, LoRA+ 16", {"compressor": {"name": "lora_plus", "rank": 0.25}}),
    "pruning": ("ThinK, keep 0.6 of key channels", {"compressor": {"name": "pruning", "keep_channels": 0.6}}),
    "fastv": ("K = 1, R = 50%, window 16", {"compressor": {"name": "fastv", "fastv_layer": 1, "fastv_ratio": 0.5,
                                                           "obs_window": 16}}),
    "pyramid_kv": ("budget 0.25, window 16", {"budget": 0.25, "compressor": {"name": "pyramid_kv", "obs_window": 16}}),
    "chunk_kv": ("budget 0.25, window 16, chunks of 10", {"budget": 0.25, "compressor": {"name": "chunk_kv",
                                                                                          "obs_window": 16}}),
    "distillation": ("KV-Distill, budget 0.25, window 16, LoRA rank 8", {"budget": 0.25, "compressor": {
        "name": "distillation", "obs_window": 16}}),
    "pikv": ("PiKV hybrid, byte budget 0.2", {"compressor": {"name": "pikv", "byte_budget": 0.2}}),
}


def flow(d) -> str:
    """A nested config as a YAML flow mapping for the CLI."""
    if isinstance(d, dict):
        return "{" + ", ".join(f"{k}: {flow(v)}" for k, v in d.items()) + "}"
    return str(d).lower() if isinstance(d, bool) else str(d)


TRAIN_FLAGS: list[str] = []  # --device cuda: the fits run on the GPU in bf16 mixed precision


def train(key: str, cache: dict | None, sharding: dict | None, steps: int, reuse: bool) -> Path:
    """Distil from the start for ``steps`` steps under the configuration through the real CLI."""
    out = RUNS / key
    ckpt = out / "checkpoints/last.ckpt"
    want = {"cache": cache or {}, "sharding": sharding or {}, "steps": steps, "flags": TRAIN_FLAGS}
    if reuse and ckpt.is_file() and (out / "bench_fit.json").is_file() and \
            json.loads((out / "bench_fit.json").read_text()).get("want") == want:
        print(f"reusing {ckpt.relative_to(ROOT)}", flush=True)
        return ckpt
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    flags = ["fit", "--config", "recipes/distill.yaml", "--model.init_args.student_init",
             str(C.START_CKPT.relative_to(ROOT)), "--out_dir", str(out.relative_to(ROOT)), "--trainer.max_steps",
             str(steps), "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false"]
    if cache:
        flags += ["--model.init_args.cache", flow(cache)]
    if sharding:
        flags += ["--model.init_args.kv_sharding", flow(sharding)]
    wall, _ = C.run_cli(flags + TRAIN_FLAGS, RUNS / "logs" / f"{key}.log")
    (out / "bench_fit.json").write_text(json.dumps({"want": want, "wall_s": wall}))
    return ckpt


def configure(model, cache: dict | None, sharding: dict | None, calib=None, reference_len: int | None = None):
    """Set the configuration on ``model`` (training-free; ThinK calibrated on ``calib``)."""
    from pikv_train.cache import CacheConfig, build_policy
    from pikv_train.cache.sharding import ShardingConfig, build_sharding

    model.set_kv_sharding(build_sharding(ShardingConfig(**sharding), model.cfg) if sharding else None)
    cfg = None if cache is None else CacheConfig.from_dict({**cache, **({"reference_len": reference_len}
                                                                       if reference_len else {})})
    policy = None if cfg is None else build_policy(cfg, model.cfg)
    model.set_cache_policy(policy)
    comp = getattr(policy, "compressor", None)
    if comp is not None and comp.name == "pruning" and calib is not None:
        comp.calibrate(model, calib)
    return model.eval()


def load_trained(ckpt: Path, reference_len: int | None = None, max_seq_len: int | None = None):
    """A student trained under a configuration, configured as trained (its cache, sharding and hook state)."""
    import torch

    from pikv_train.evaluate import load_decoder
    from pikv_train.models import Decoder

    model = load_decoder(ckpt)
    hp = torch.load(ckpt, map_location="cpu", weights_only=False)["hyper_parameters"]
    cache = hp.get("cache")
    cache = None if cache is None else (dataclasses.asdict(cache) if dataclasses.is_dataclass(cache) else dict(cache))
    if cache is not None and cache.get("policy") == "full" and (cache.get("compressor") or {}).get("name") in (None, "none"):
        cache = None
    sh = hp.get("kv_sharding")
    sh = None if sh is None else (dataclasses.asdict(sh) if dataclasses.is_dataclass(sh) else dict(sh))
    sh = sh if sh and sh.get("enabled") else None
    if max_seq_len:  # RoPE has no learned positions: the same weights at a longer context
        long = Decoder(dataclasses.replace(model.cfg, max_seq_len=max_seq_len))
        long.load_state_dict(model.state_dict())
        long.hook_state = model.hook_state
        model = long
    configure(model, cache, sh, reference_len=reference_len)
    if model.hook_state:
        model.load_state_dict(model.hook_state, strict=False)
    return model.eval()


def stored_bytes(model, tokens) -> int:
    """Bytes the deployed cache holds after reading ``tokens`` (1, T)."""
    import torch

    cache = model.new_cache()
    with torch.no_grad():
        model(tokens, positions=torch.arange(tokens.shape[1])[None], cache=cache)
    return cache.bytes_stored()


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def decode_bench(models: dict, tokens, context: int, n_steps: int, device="cpu") -> dict:
    """Prefill ``context`` tokens into each model's deployed cache, then time ``n_steps`` batch-1 decode steps
    round-robin (one CPU thread); also the bytes held per token at that context, and the share of a decode step
    spent in the cache (``update``: store reads, dequantisation, policy decisions, gathers; ``attend``), measured
    in a separate pass of 8 steps with the cache's calls timed."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    total = context + C.WARM_DECODE + n_steps + 8
    x, pos = tokens[:total][None].to(device), torch.arange(total, device=device)[None]
    live, res = {}, {}
    with torch.no_grad():
        for key, model in models.items():
            cache = model.new_cache()
            _sync(device)
            t0 = time.perf_counter()
            model(x[:, :context], positions=pos[:, :context], cache=cache)
            _sync(device)
            res[key] = {"prefill_tok_s": round(context / (time.perf_counter() - t0), 1),
                        "bytes_per_token_at_context": round(cache.bytes_stored() / context, 1)}
            for i in range(context, context + C.WARM_DECODE):
                model(x[:, i: i + 1], positions=pos[:, i: i + 1], cache=cache)
            live[key] = cache
            print(f"  {key}: prefill {res[key]['prefill_tok_s']:.0f} tok/s, "
                  f"{res[key]['bytes_per_token_at_context']:.0f} bytes/token held", flush=True)
        times = {k: [] for k in live}
        keys = list(live)
        first = context + C.WARM_DECODE
        for j, i in enumerate(range(first, first + n_steps)):
            for key in keys[j % len(keys):] + keys[: j % len(keys)]:
                _sync(device)
                t0 = time.perf_counter()
                models[key](x[:, i: i + 1], positions=pos[:, i: i + 1], cache=live[key])
                _sync(device)
                times[key].append(time.perf_counter() - t0)
        for key, cache in live.items():  # where the time goes: the cache's own calls, timed
            spent = [0.0]

            def timed(fn):
                def call(*a, **kw):
                    _sync(device)
                    t0 = time.perf_counter()
                    out = fn(*a, **kw)
                    _sync(device)
                    spent[0] += time.perf_counter() - t0
                    return out
                return call

            cache.update, cache.attend = timed(cache.update), timed(cache.attend)
            _sync(device)
            t0 = time.perf_counter()
            for i in range(first + n_steps, first + n_steps + 8):
                models[key](x[:, i: i + 1], positions=pos[:, i: i + 1], cache=cache)
            _sync(device)
            res[key]["cache_share"] = round(spent[0] / (time.perf_counter() - t0), 3)
    torch.set_num_threads(threads)
    for key, ts in times.items():
        res[key]["decode_tok_s"] = round(1 / statistics.median(ts), 1)
    return res


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def memory_worker(spec: dict) -> None:
    """One configuration in this process: peak memory over prefill + decoding (printed as JSON): the resident set
    on CPU, the CUDA allocator's peak on a GPU."""
    import torch

    torch.set_num_threads(1)
    tokens = torch.load(spec["tokens"])
    total = spec["context"] + spec["steps"]
    dev = spec.get("device", "cpu")
    model = load_trained(Path(spec["ckpt"]), reference_len=spec["reference_len"], max_seq_len=total)
    model = model.to(dev, dtype=DTYPES[spec.get("dtype", "fp32")])
    x, pos = tokens[:total][None].to(dev), torch.arange(total, device=dev)[None]
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            cache = model.new_cache()
            model(x[:, : spec["context"]], positions=pos[:, : spec["context"]], cache=cache)
            for i in range(spec["context"], total):
                model(x[:, i: i + 1], positions=pos[:, i: i + 1], cache=cache)
        torch.cuda.synchronize()
        print(json.dumps({"rss_before_mb": round(base / 2**20, 1), "peak_mb": round(torch.cuda.max_memory_allocated()
                                                                                  / 2**20, 1), "peak_reset": True}))
        return
    before = _status("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current resident set
        reset = True
    except OSError:
        reset = False
    with torch.no_grad():
        cache = model.new_cache()
        model(x[:, : spec["context"]], positions=pos[:, : spec["context"]], cache=cache)
        for i in range(spec["context"], total):
            model(x[:, i: i + 1], positions=pos[:, i: i + 1], cache=cache)
    print(json.dumps({"rss_before_mb": round(before / 2**20, 1), "peak_mb": round(_status("VmHWM") / 2**20, 1),
                      "peak_reset": reset}))


def peak_memory(key: str, ckpt: Path, tokens_path: Path, context: int, steps: int, reference_len: int,
                device: str = "cpu", dtype: str = "fp32") -> dict:
    spec = {"ckpt": str(ckpt), "tokens": str(tokens_path), "context": context, "steps": steps,
            "reference_len": reference_len, "device": device, "dtype": dtype}
    proc = subprocess.run([sys.executable, __file__, "--memory-worker", json.dumps(spec)], cwd=ROOT,
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode:
        raise RuntimeError(f"memory worker for {key} failed:\n{proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["increase_mb"] = round(out["peak_mb"] - out["rss_before_mb"], 1)
    print(f"  {key}: peak {out['peak_mb']:.0f} MB (+{out['increase_mb']:.1f} MB over the loaded model)", flush=True)
    return out


def plot(perf: list, comp: list, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name, xkey, xlabel in (("memory_quality", "memory_pct", "KV memory held (% of Standard MoE)"),
                               ("speed_quality", "speed_x", "decode speed (x Standard MoE)")):
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for rows, marker, tag in ((perf, "o", "performance table"), (comp, "s", "compression table")):
            pts = [r for r in rows if r.get("quality_trained_pct") is not None]
            ax.scatter([r[xkey] for r in pts], [r["quality_trained_pct"] for r in pts], marker=marker, label=f"{tag}, trained under")
            ax.scatter([r[xkey] for r in pts], [r["quality_free_pct"] for r in pts], marker=marker, facecolors="none",
                       edgecolors="grey", label=f"{tag}, training-free")
            for r in pts:
                ax.annotate(r["short"], (r[xkey], r["quality_trained_pct"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        if xkey == "memory_pct":
            ax.scatter([v[0] for v in SEED.values()], [v[2] for v in SEED.values()], marker="x", color="red",
                       label="seed's claims (never measured)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("quality retained (% of Standard MoE, ppl ratio)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out.parent / f"{out.name}_{name}.png", dpi=120)
        plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100, help="distillation steps per trained configuration")
    ap.add_argument("--reuse", action="store_true", help="keep finished runs under runs/pikv_tables/")
    ap.add_argument("--val-batches", type=int, default=10, help="validation batches (16 x 256 tokens) per evaluation")
    ap.add_argument("--context", type=int, default=2048, help="prefill length of the decode measurements")
    ap.add_argument("--decode-steps", type=int, default=48, help="timed decode steps after the prefill")
    ap.add_argument("--threads", type=int, help="intra-op threads of the fits and evaluations")
    ap.add_argument("--device", default="cpu", help="device of the decode and memory measurements (cuda: the fits "
                    "run there too, in bf16 mixed precision); quality is evaluated on the CPU in fp32 either way")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weights dtype of the decode and "
                    "memory measurements")
    ap.add_argument("--out", help="results name under benchmarks/results (default pikv_tables, or pikv_tables_gpu "
                    "with --device cuda)")
    ap.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    import torch

    DTYPES.update(fp32=torch.float32, bf16=torch.bfloat16)
    if args.memory_worker:
        memory_worker(json.loads(args.memory_worker))
        return
    global RUNS
    gpu = torch.device(args.device).type == "cuda"
    name = args.out or ("pikv_tables_gpu" if gpu else "pikv_tables")
    if gpu:
        RUNS = ROOT / "runs/pikv_tables_gpu"
        TRAIN_FLAGS[:] = ["--trainer.accelerator", "gpu", "--trainer.precision", "bf16-mixed"]
    t_all = time.perf_counter()
    C.FIT_THREADS = args.threads
    C.ensure_start()

    import yaml

    from pikv_train.cache.compression import REGISTRY, TOKEN_REGISTRY
    from pikv_train.data import TextDataModule
    from pikv_train.evaluate import evaluate, load_decoder

    warnings.filterwarnings("ignore", message=".*(budget|chunk_size).*")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dm = TextDataModule(**yaml.safe_load((ROOT / "configs/data/embedded.yaml").read_text())["data"])
    dm.setup("fit")
    val = dm.val_dataloader()
    calib = next(iter(dm.train_dataloader()))["input_ids"]
    val_tokens = torch.cat([b["input_ids"].flatten() for _, b in zip(range(2), val)])
    seq = next(iter(val))["input_ids"][:1]  # (1, 256): the context quality is measured at
    start = load_decoder(C.START_CKPT)
    built = set(REGISTRY) | set(TOKEN_REGISTRY)
    comp_rows = [(n, RECOMMENDED.get(n)) for n in RECOMMENDED]
    entries = [(k, label, cache, sh, "perf") for k, label, cache, sh in PERF]
    entries += [(f"c_{n}", n, rec[1], None, "comp") for n, rec in comp_rows if rec is not None and n in built]
    phases = {}

    # 1. train every configuration (Standard MoE: the same steps with nothing on)
    t0 = time.perf_counter()
    ckpts = {k: train(k, cache, sh, args.steps, args.reuse) for k, _, cache, sh, _ in entries}
    phases["training_s"] = round(time.perf_counter() - t0, 1)

    # 2. quality: trained-under and training-free, same code, same batches
    t0 = time.perf_counter()
    ev = lambda m: evaluate(m, val, max_batches=args.val_batches)["ppl"]  # noqa: E731
    rows = {}
    for key, label, cache, sh, table in entries:
        trained = load_trained(ckpts[key])
        free = configure(load_decoder(C.START_CKPT), cache, sh, calib)
        rows[key] = {"key": key, "label": label, "table": table, "cache": cache, "sharding": sh,
                     "ppl_trained": ev(trained), "ppl_free": ev(free),
                     "bytes_at_seq": stored_bytes(trained, seq)}
        print(f"  {key}: ppl trained-under {rows[key]['ppl_trained']:.4f}, training-free {rows[key]['ppl_free']:.4f}, "
              f"{rows[key]['bytes_at_seq']:,} bytes held after {seq.shape[1]} tokens", flush=True)
    phases["evaluation_s"] = round(time.perf_counter() - t0, 1)

    # 3. decode speed at the long context, round-robin over every trained configuration
    t0 = time.perf_counter()
    total = args.context + C.WARM_DECODE + args.decode_steps
    print(f"\n--- decode: {args.context}-token prefill + {args.decode_steps} timed steps, batch 1, 1 thread", flush=True)
    total += 8  # the timed-cache pass
    models = {k: load_trained(ckpts[k], reference_len=start.cfg.max_seq_len, max_seq_len=total).to(
        args.device, dtype=DTYPES[args.dtype]) for k, *_ in entries}
    dec = decode_bench(models, val_tokens, args.context, args.decode_steps, args.device)
    phases["decode_s"] = round(time.perf_counter() - t0, 1)

    # 4. peak memory during decoding, one process per performance configuration
    t0 = time.perf_counter()
    tok_path = RUNS / "decode_tokens.pt"
    torch.save(val_tokens.clone(), tok_path)
    mem = {k: peak_memory(k, ckpts[k], tok_path, args.context, 16, start.cfg.max_seq_len, args.device, args.dtype)
           for k, _, _, _, t in entries if t == "perf"}
    phases["memory_s"] = round(time.perf_counter() - t0, 1)

    std = rows["standard"]
    for key, r in rows.items():
        r.update({"memory_pct": round(100 * r["bytes_at_seq"] / std["bytes_at_seq"], 1),
                  "speed_x": round(dec[key]["decode_tok_s"] / dec["standard"]["decode_tok_s"], 2),
                  "quality_trained_pct": round(100 * std["ppl_trained"] / r["ppl_trained"], 1),
                  "quality_free_pct": round(100 * std["ppl_free"] / r["ppl_free"], 1), **dec[key],
                  "short": r["label"].replace("PiKV ", "").strip("()") if r["table"] == "perf" else r["label"]})
        if key in mem:
            r["peak_memory"] = mem[key]
    perf = [rows[k] for k, *_ in PERF]
    comp = [rows[f"c_{n}"] for n, rec in comp_rows if rec is not None and n in built]
    missing = [n for n, rec in comp_rows if rec is None or n not in built]
    wall = time.perf_counter() - t_all

    # 5. targets and the written tables
    ok = [r for r in perf + comp if r["memory_pct"] <= 35 and r["quality_trained_pct"] >= 97]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    env = f"Python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPU cores; commit {commit}"
    md = [
        "| configuration | KV memory held (% Standard) | decode tok/s (x Standard) | cache share of a decode step "
        "| peak memory in decoding (increase) | ppl trained-under (% retained) | ppl training-free (% retained) "
        "| seed's claim (memory / speed / quality) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in perf:
        pm = r["peak_memory"]
        s = SEED[r["key"]]
        md.append(f"| {r['label']} | {r['bytes_at_seq']:,} B ({r['memory_pct']:.1f}%) | {r['decode_tok_s']:.0f} "
                  f"({r['speed_x']:.2f}x) | {r['cache_share']:.0%} | {pm['peak_mb']:.0f} MB (+{pm['increase_mb']:.1f} MB) | {r['ppl_trained']:.3f} "
                  f"({r['quality_trained_pct']:.1f}%) | {r['ppl_free']:.3f} ({r['quality_free_pct']:.1f}%) | "
                  f"{s[0]}% / {s[1]}x / {s[2]}% |")
    md += ["", "| compressor | setting | compression ratio (bytes held) | decode x (cache share) | quality retained, "
               "trained-under | quality retained, training-free |", "|---|---|---|---|---|---|"]
    for r in comp:
        md.append(f"| {r['label']} | {RECOMMENDED[r['label']][0]} | {100 / r['memory_pct']:.2f}x ({r['memory_pct']:.1f}% of "
                  f"the bytes) | {r['speed_x']:.2f}x ({r['cache_share']:.0%}) | {r['quality_trained_pct']:.1f}% | "
                  f"{r['quality_free_pct']:.1f}% |")
    for n in missing:
        md.append(f"| {n} | not built yet | – | – | – | – |")
    md += ["", f"Target (<= 35% of Standard MoE's KV bytes with >= 97% of its quality, trained under): "
               + ("met by " + ", ".join(f"{r['label']} ({r['memory_pct']:.1f}%, {r['quality_trained_pct']:.1f}%)"
                                        for r in ok) if ok else "NOT met") + ".",
           "", f"`python benchmarks/pikv_tables.py --steps {args.steps}"
               + (f" --device {args.device} --dtype {args.dtype} --context {args.context}" if gpu else "")
               + f"`: {wall / 60:.0f} min wall; {env}."]
    result = {"steps": args.steps, "context": args.context, "device": args.device, "dtype": args.dtype, "seq": int(seq.shape[1]), "val_batches": args.val_batches,
              "performance": perf, "compression": comp, "not_built": missing, "target_met_by": [r["key"] for r in ok],
              "seed_claims": SEED, "phases_s": phases, "wall_s": round(wall, 1), "environment": env}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (RESULTS / f"{name}.md").write_text("\n".join(md) + "\n")
    plot(perf, comp, RESULTS / name)
    print("\n" + "\n".join(md))


if __name__ == "__main__":
    main()
