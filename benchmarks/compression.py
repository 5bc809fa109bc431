"""KV storage compressors side by side: bytes per token, perplexity (training-free and trained-under), decode
speed at a 2,048-token context and training-step time, in one run (issue 13 item 6).

    python benchmarks/compression.py                      # every compressor in the registry, 100 steps each
    python benchmarks/compression.py --steps 150 --only quantized lora svd
    python benchmarks/compression.py --reuse              # keep finished runs under runs/compression/

Start: the dense-trained student, i.e. the distilled student of the main job (``runs/distill``, from
``python -m pikv_train fit --config recipes/distill.yaml``; trained here through that CLI, and the teacher
before it, if missing). Every compressor in ``pikv_train.cache.compression.REGISTRY`` (read at run time) runs
at two settings:

* ``quantized`` (KIVI) 2-bit and 4-bit, group G = 32, residual R = 32. R is KIVI's smallest legal residual
  (R must be a multiple of G): with this student's head_dim of 24 the closed form gives 0.151x the fp32 cache
  at 2-bit with R = 32 but 0.165x with R = 64 (0.191x with R = 128), over the 0.16x target, because every
  token's values carry an fp32 min and scale (8 bytes next to 6 bytes of codes) and the residual keys and
  values stay fp32 (the JSON lists the ratio for each R);
* ``svd`` (Palu), ``lora`` and ``lora_plus`` at rank d_h/4 and d_h/2;
* ``pruning`` (ThinK) keeping 0.6 and 0.4 of the key channels;
* ``pyramid`` (MiKV) at byte budgets 0.3 and 0.2 when it is in the registry; any other registry name with its
  defaults.

For each it measures, side by side:

1. **KV bytes per token** against the full fp32 cache (2 x head_dim x 4 bytes per layer and kv-head): the
   closed form (``compressor.bytes_per_token_head(4, 2048)``, scales and the residual amortised over a 2,048-token
   context) and ``cache.bytes_stored()`` of the deployed cache (``model.new_cache()``) after a 2,048-token
   prefill, with the int64 positions the policy cache keeps per (layer, kv-head) reported separately (8 bytes
   per token and stream; the plain cache keeps one per layer).
2. **Validation perplexity** (``pikv_train.evaluate.evaluate``: the training forward with the compressor
   active, the same code and the same first ``--val-batches`` validation batches for every model) of
   (a) the dense-trained student with the compressor applied training-free (ThinK calibrated on one training
   batch with ``PruningCompressor.calibrate``; ``lora`` / ``lora_plus`` start from the SVD, so training-free
   they equal ``svd``), (b) the student distilled under the compressor for ``--steps`` steps from that start
   (``fit --config recipes/distill.yaml --model.init_args.student_init <start> --model.init_args.cache.compressor
   {...}``, out_dir ``runs/compression/<setting>``), evaluated under the configuration it was trained with (its
   checkpoint's cache config and compressor state: LoRA factors, ThinK channels), and (c) the baseline: the
   same start distilled the same steps with no compressor. The issue's "within 3% of its own full-cache
   perplexity" compares (b) with (c).
3. **Decode tokens/s**, batch 1, one CPU thread (with two threads a core shared with other work stalls the
   OpenMP barriers and the figures swing by 10x): the student's weights in a model built with a longer
   ``max_seq_len`` (RoPE has no learned positions), 2,048 prompt tokens of validation text prefilled into the
   deployed cache (KIVI's cache takes a prompt row by row, so its prefill is as many decode steps; prefill
   tokens/s are reported too), 8 untimed decode steps, then ``--decode-steps`` steps timed round-robin over
   every configuration (median step). References in the same run: the plain cache (``KVCache``, what a model
   without a compressor deploys) and the per-(sequence, head) policy cache storing raw keys/values (the
   machinery every compressor's cache uses).
4. **Training-step time** against the full cache, timed round-robin in one process on two threads at the
   recipe's shape (16 x 256 tokens): student forward with the compressor, FKL against the teacher's hidden
   states, backward and the AdamW step with the task's parameter groups (``build_optimizer``); median over
   ``--time-rounds`` rounds after a warm-up round. The ratio is reported for the student step and for the
   whole distillation step (plus the teacher forward, timed in the same rounds). The fit runs' own
   training-loop times (``PerformanceMonitor``) are in the JSON as well; they ran one after another, so machine
   load differs between them.

Wall time: about 20-25 minutes on 2 CPU cores with the defaults (11 fits of 100 steps, most of it), more
when the cores are shared. Writes benchmarks/results/compression.{json,md} and compression.png (bytes per
token vs perplexity, one point per compressor and setting, training-free and trained-under).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEACHER_CKPT = ROOT / "runs/teacher/checkpoints/last.ckpt"
START_CKPT = ROOT / "runs/distill/checkpoints/last.ckpt"
RUNS = ROOT / "runs/compression"
RESULTS = ROOT / "benchmarks/results"
CONTEXT = 2048
FP32 = 4
WARM_DECODE = 8


# ---------------------------------------------------------------------------------------------- settings
def settings_for(registry, head_dim: int) -> list[dict]:
    """(compressor, label, slug, compressor config) for every compressor in the registry, two settings each."""
    out = []

    def add(name, label, slug, short, **cfg):
        out.append({"compressor": name, "setting": label, "slug": f"{name}_{slug}", "short": short,
                    "config": {"name": name, **cfg}})

    for name in registry:
        if name == "quantized":
            for bits in (2, 4):
                add(name, f"{bits}-bit, G 32, R 32", f"{bits}bit", f"KIVI {bits}-bit", bits=bits, group_size=32, residual=32)
        elif name in ("svd", "lora", "lora_plus"):
            for frac, tag in ((0.25, "d_h/4"), (0.5, "d_h/2")):
                r = max(1, round(frac * head_dim))
                add(name, f"rank {r} ({tag})", f"r{r}", f"{name.replace('_plus', '+')} r{r}", rank=frac)
        elif name == "pruning":
            for keep in (0.6, 0.4):
                add(name, f"keep {keep} of key channels", f"keep{keep}", f"ThinK keep {keep}", keep_channels=keep)
        elif name == "pyramid":
            for budget in (0.3, 0.2):
                add(name, f"byte budget {budget}", f"budget{budget}", f"MiKV {budget}", byte_budget=budget)
        else:
            add(name, "defaults", "default", name)
    return out


def flow(cfg: dict) -> str:
    """A compressor config as a YAML flow mapping for the CLI."""
    return "{" + ", ".join(f"{k}: {v}" for k, v in cfg.items()) + "}"


# ---------------------------------------------------------------------------------------------- training
FIT_THREADS: int | None = None  # --threads: intra-op threads of the fit subprocesses (None: torch's default)


def run_cli(args: list[str], log: Path) -> tuple[float, str]:
    """``python -m pikv_train <args>`` with its output in ``log``; returns (wall seconds, output)."""
    env = dict(os.environ, PIKV_QUIET_CONFIG="1")
    if FIT_THREADS:
        env["OMP_NUM_THREADS"] = str(FIT_THREADS)
    cmd = [sys.executable, "-m", "pikv_train", *args]
    print("=== " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(proc.stdout)
    if proc.returncode:
        tail = "\n".join(proc.stdout.splitlines()[-25:])
        raise RuntimeError(f"exit code {proc.returncode} ({log.relative_to(ROOT)}):\n{tail}")
    return wall, proc.stdout


def ensure_start() -> None:
    """The teacher and the dense-trained (distilled) student of the main job, trained through the CLI if missing."""
    if not TEACHER_CKPT.is_file():
        run_cli(["fit", "--config", "recipes/teacher.yaml", "--trainer.enable_progress_bar", "false"],
                RUNS / "logs/teacher.log")
    if not START_CKPT.is_file():
        run_cli(["fit", "--config", "recipes/distill.yaml", "--trainer.enable_progress_bar", "false"],
                RUNS / "logs/distill.log")


def ckpt_info(path: Path) -> dict | None:
    import torch

    if not path.is_file():
        return None
    ck = torch.load(path, map_location="cpu", weights_only=False)
    hp = ck.get("hyper_parameters", {})
    return {"global_step": ck.get("global_step"), "cache": hp.get("cache"), "student_init": hp.get("student_init")}


def train(slug: str, comp: dict | None, steps: int, reuse: bool) -> dict:
    """Distil from the start for ``steps`` steps under ``comp`` (None: no compressor) through the real CLI."""
    out = RUNS / slug
    ckpt = out / "checkpoints/last.ckpt"
    if reuse:
        info = ckpt_info(ckpt)
        same = info is not None and info["global_step"] == steps and (
            (info["cache"] or {}).get("compressor", {}).get("name", "none") == (comp or {}).get("name", "none"))
        if same and comp:
            stored = info["cache"]["compressor"]
            same = all(stored.get(k) == v for k, v in comp.items())
        if same:
            print(f"reusing {ckpt.relative_to(ROOT)}", flush=True)
            prev = json.loads((out / "bench_fit.json").read_text()) if (out / "bench_fit.json").is_file() else {}
            return {"ckpt": ckpt, "wall_s": prev.get("wall_s"), "loop_s": prev.get("loop_s"), "reused": True}
    shutil.rmtree(out, ignore_errors=True)
    flags = ["fit", "--config", "recipes/distill.yaml", "--model.init_args.student_init", str(START_CKPT.relative_to(ROOT)),
             "--out_dir", str(out.relative_to(ROOT)), "--trainer.max_steps", str(steps),
             "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false"]
    if comp:
        flags += ["--model.init_args.cache.compressor", flow(comp)]
    wall, text = run_cli(flags, RUNS / "logs" / f"{slug}.log")
    m = re.search(r"wall time\s+([\d.]+)\s*s", text)  # PerformanceMonitor: the training loop's wall time
    loop = float(m.group(1)) if m else None
    (out / "bench_fit.json").write_text(json.dumps({"wall_s": wall, "loop_s": loop}))
    return {"ckpt": ckpt, "wall_s": wall, "loop_s": loop, "reused": False}


# ---------------------------------------------------------------------------------------------- models
def with_compressor(model, comp: dict | None, calib=None):
    """Set ``comp`` on ``model`` training-free (ThinK calibrated on ``calib``, training data); returns the policy."""
    from pikv_train.cache import CacheConfig, build_policy

    policy = None if comp is None else build_policy(CacheConfig(compressor=comp), model.cfg)
    model.set_cache_policy(policy)
    if policy is not None and getattr(policy.compressor, "name", "") == "pruning":
        policy.compressor.calibrate(model, calib)
    model.eval()
    return policy


def load_trained(ckpt: Path):
    """A student trained under a compressor, configured as it was trained: its checkpoint's cache config and the
    compressor's state (LoRA factors, ThinK channels) loaded after the policy is attached."""
    import torch

    from pikv_train.cache import CacheConfig, build_policy
    from pikv_train.evaluate import load_decoder

    model = load_decoder(ckpt)
    cache = torch.load(ckpt, map_location="cpu", weights_only=False)["hyper_parameters"]["cache"]
    cache_cfg = cache if isinstance(cache, CacheConfig) else CacheConfig.from_dict(dict(cache))
    model.set_cache_policy(build_policy(cache_cfg, model.cfg))
    if model.hook_state:
        missing, unexpected = model.load_state_dict(model.hook_state, strict=False)
        if unexpected:
            raise RuntimeError(f"{ckpt}: checkpoint state the configured policy does not hold: {unexpected}")
        held = {k for k in model.state_dict() if k.startswith("cache_policy.")}
        if held - set(model.hook_state):
            raise RuntimeError(f"{ckpt}: policy state missing from the checkpoint: {sorted(held - set(model.hook_state))}")
    comp = getattr(model.cache_policy, "compressor", None)
    if comp is not None and hasattr(comp, "calibrated") and not bool(comp.calibrated.all()):
        raise RuntimeError(f"{ckpt}: ThinK channels not calibrated in the checkpoint")
    return model.eval(), cache_cfg


# ---------------------------------------------------------------------------------------------- bytes + decode
def position_bytes(cache) -> int:
    """Bytes of the int64 positions a cache keeps (per (layer, sequence, kv-head) in a policy cache, per layer in
    the plain one)."""
    if hasattr(cache, "store"):
        return sum(s["pos"].numel() * s["pos"].element_size() for layer in cache.store if layer is not None
                   for row in layer for s in row)
    return sum(kp.numel() * kp.element_size() for kp in cache.key_pos if kp is not None)


def decode_bench(start_state, cfg, entries: list[tuple[str, dict | None, str]], tokens, calib, n_steps: int) -> dict:
    """Prefill ``CONTEXT`` tokens into each configuration's deployed cache, count its bytes, then time
    ``n_steps`` batch-1 decode steps round-robin over the configurations (one thread)."""
    import torch

    from pikv_train.cache import CacheConfig
    from pikv_train.cache.policies.full import FullScheduler
    from pikv_train.models import Decoder

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    total = CONTEXT + WARM_DECODE + n_steps
    long_cfg = dataclasses.replace(cfg, max_seq_len=max(total, cfg.max_seq_len))
    x = tokens[:total][None]
    pos = torch.arange(total)[None]
    live, res = {}, {}
    with torch.no_grad():
        for key, comp, kind in entries:
            model = Decoder(long_cfg)
            model.load_state_dict(start_state)
            if kind == "raw":
                model.set_cache_policy(FullScheduler(CacheConfig(policy="full"), long_cfg))
                model.eval()
            else:
                with_compressor(model, comp, calib)
            cache = model.new_cache()
            t0 = time.perf_counter()
            model(x[:, :CONTEXT], positions=pos[:, :CONTEXT], cache=cache)
            prefill = time.perf_counter() - t0
            stored, posb = cache.bytes_stored(), position_bytes(cache)
            for i in range(CONTEXT, CONTEXT + WARM_DECODE):
                model(x[:, i: i + 1], positions=pos[:, i: i + 1], cache=cache)
            live[key] = (model, cache)
            res[key] = {"prefill_s": round(prefill, 2), "prefill_tok_s": round(CONTEXT / prefill, 1),
                        "stored_bytes_per_token": stored / CONTEXT, "position_bytes_per_token": posb / CONTEXT}
            print(f"  {key}: prefill {prefill:.1f} s, {stored / CONTEXT:.1f} bytes/token stored "
                  f"({posb / CONTEXT:.0f} of them positions)", flush=True)
        times = {k: [] for k in live}
        keys = list(live)
        for j, i in enumerate(range(CONTEXT + WARM_DECODE, total)):
            for key in keys[j % len(keys):] + keys[: j % len(keys)]:
                model, cache = live[key]
                t0 = time.perf_counter()
                model(x[:, i: i + 1], positions=pos[:, i: i + 1], cache=cache)
                times[key].append(time.perf_counter() - t0)
    torch.set_num_threads(threads)
    for key, ts in times.items():
        med = statistics.median(ts)
        res[key].update({"decode_ms": round(med * 1000, 2), "decode_tok_s": round(1 / med, 1)})
    return res


# ---------------------------------------------------------------------------------------------- step time
def step_bench(start_state, cfg, teacher, batch, entries: list[tuple[str, dict | None]], rounds: int) -> dict:
    """Median training-step time of each configuration (student forward + FKL + backward + AdamW step), timed
    round-robin with the teacher forward in every round."""
    import torch

    from pikv_train.cache import CacheConfig, build_policy
    from pikv_train.distill import chunked_distill_loss
    from pikv_train.models import Decoder
    from pikv_train.tasks import OptimConfig
    from pikv_train.tasks.base import build_optimizer

    x = batch["input_ids"]
    mask = batch["loss_mask"].flatten().bool()
    with torch.no_grad():
        th = teacher(x).hidden.flatten(0, 1)
    setups = {}
    for key, comp in entries:
        model = Decoder(cfg)
        model.load_state_dict(start_state)
        if comp is not None:
            model.set_cache_policy(build_policy(CacheConfig(compressor=comp), cfg))
        model.train()  # ThinK calibrates on its first (warm-up) training forward, as in a run
        setups[key] = (model, build_optimizer(model, OptimConfig(), rounds + 1)["optimizer"])
    times = {k: [] for k in setups}
    teacher_t = []
    keys = list(setups)
    for rnd in range(rounds + 1):
        t0 = time.perf_counter()
        with torch.no_grad():
            teacher(x)
        if rnd:
            teacher_t.append(time.perf_counter() - t0)
        for key in keys[rnd % len(keys):] + keys[: rnd % len(keys)]:
            model, opt = setups[key]
            t0 = time.perf_counter()
            h = model(x).hidden.flatten(0, 1)
            loss = chunked_distill_loss(h, model.head_weight, th, teacher.head_weight, mask=mask)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if rnd:
                times[key].append(time.perf_counter() - t0)
    t_teacher = statistics.median(teacher_t)
    out = {"teacher_forward_s": round(t_teacher, 4)}
    full = statistics.median(times["full"])
    for key, ts in times.items():
        s = statistics.median(ts)
        out[key] = {"student_step_s": round(s, 4), "ratio_student": round(s / full, 3),
                    "ratio_with_teacher": round((s + t_teacher) / (full + t_teacher), 3)}
    return out


# ---------------------------------------------------------------------------------------------- output
def fmt(v, spec=".3f", none="–"):
    return none if v is None else format(v, spec)


def plot(rows, start_ppl, base_ppl, full_bytes, path: Path, steps: int) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is missing (pip install -e '.[bench]'): no plot written", flush=True)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    names = list(dict.fromkeys(r["compressor"] for r in rows))
    colors = dict(zip(names, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3))
    for r in rows:
        c = colors[r["compressor"]]
        x = r["bytes_per_token"]
        if r["ppl_training_free"] is not None:
            ax.scatter(x, r["ppl_training_free"], marker="o", facecolors="none", edgecolors=c, s=55, zorder=3)
        if r["ppl_trained_under"] is not None:
            ax.scatter(x, r["ppl_trained_under"], marker="^", color=c, s=55, zorder=3)
        y = r["ppl_trained_under"] if r["ppl_trained_under"] is not None else r["ppl_training_free"]
        ax.annotate(r["short"], (x, y), textcoords="offset points", xytext=(6, -3), fontsize=7, color=c)
    ax.scatter(full_bytes, start_ppl, marker="o", facecolors="none", edgecolors="k", s=55, zorder=3)
    ax.scatter(full_bytes, base_ppl, marker="^", color="k", s=55, zorder=3)
    ax.annotate("full fp32 cache", (full_bytes, max(start_ppl, base_ppl)), textcoords="offset points",
                xytext=(-70, 6), fontsize=7)
    ax.axhline(base_ppl * 1.03, color="grey", lw=0.8, ls=":", zorder=1)
    ax.set_xscale("log")
    ax.text(0.01, base_ppl * 1.03, " full-cache baseline + 3%", transform=ax.get_yaxis_transform(), fontsize=7,
            color="grey", va="bottom")
    ax.set_xlabel(f"KV cache bytes per token (closed form, {CONTEXT}-token context, all layers and kv-heads)")
    ax.set_ylabel("validation perplexity")
    handles = [plt.Line2D([], [], marker="s", ls="", color=colors[n], label=n) for n in names]
    handles += [plt.Line2D([], [], marker="o", ls="", mfc="none", mec="k", label="dense-trained, compressor training-free"),
                plt.Line2D([], [], marker="^", ls="", color="k", label=f"distilled {steps} steps under it")]
    ax.legend(handles=handles, fontsize=7, loc="center left")
    ax.set_title("KV storage compressors on the PiKV MoE student (head_dim 24, fp32)", fontsize=10)
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    global CONTEXT, FIT_THREADS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100, help="distillation steps of every trained student")
    ap.add_argument("--only", nargs="*", help="compressor names to run (default: every name in the registry)")
    ap.add_argument("--reuse", action="store_true", help="keep runs under runs/compression/ that already finished "
                    "with the same steps and compressor settings")
    ap.add_argument("--val-batches", type=int, default=10, help="validation batches (16 x 256 tokens) per evaluation")
    ap.add_argument("--decode-steps", type=int, default=64, help="timed decode steps after the 2,048-token prefill")
    ap.add_argument("--time-rounds", type=int, default=7, help="timed rounds of the training-step comparison")
    ap.add_argument("--threads", type=int, help="intra-op threads of the fits and evaluations (default: torch's, "
                    "every core); 1 on a machine shared with other jobs: with two threads a process whose second "
                    "core is busy stalls at every OpenMP barrier and runs up to 10x slower")
    ap.add_argument("--step-threads", type=int, default=2, help="threads of the training-step timing (the recipe's)")
    ap.add_argument("--context", type=int, default=CONTEXT, help="prefill length of the bytes and decode measurements")
    ap.add_argument("--out", help="output path without extension (default benchmarks/results/compression, or "
                    "benchmarks/results/compression_partial with --only, so a partial run never overwrites the table)")
    args = ap.parse_args()
    CONTEXT, FIT_THREADS = args.context, args.threads
    args.out = args.out or str(RESULTS / ("compression_partial" if args.only else "compression"))
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    t_all = time.perf_counter()
    ensure_start()

    import torch
    import yaml

    from pikv_train.cache.compression import REGISTRY, build_compressor
    from pikv_train.data import TextDataModule
    from pikv_train.evaluate import evaluate, load_decoder

    warnings.filterwarnings("ignore", message=".*budget.*")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data_cfg = yaml.safe_load((ROOT / "configs/data/embedded.yaml").read_text())["data"]
    dm = TextDataModule(**data_cfg)
    dm.setup("fit")
    val = dm.val_dataloader()
    calib = next(iter(dm.train_dataloader()))  # one training batch: ThinK's calibration and the step timing
    start = load_decoder(START_CKPT)
    cfg, start_state = start.cfg, start.state_dict()
    hd, n_streams = cfg.head_dim, cfg.n_layer * cfg.n_kv_head
    full_bytes = 2 * hd * FP32 * n_streams  # fp32 keys + values of one token, all layers and kv-heads
    registry = list(REGISTRY)
    unknown = set(args.only or []) - set(registry)
    if unknown:
        sys.exit(f"error: --only {sorted(unknown)}: not in the registry ({', '.join(registry)})")
    settings = [s for s in settings_for(registry, hd) if not args.only or s["compressor"] in args.only]
    phases = {}

    # 1. closed-form bytes (and the residual choice for KIVI 2-bit)
    for s in settings:
        comp = build_compressor(s["config"], cfg)
        s["bytes_closed"] = comp.bytes_per_token_head(FP32, CONTEXT) * n_streams
    kivi_residuals = {}
    if "quantized" in registry:
        for r in (32, 64, 128):
            c = build_compressor({"name": "quantized", "bits": 2, "group_size": 32, "residual": r}, cfg)
            kivi_residuals[r] = round(c.bytes_per_token_head(FP32, CONTEXT) * n_streams / full_bytes, 4)
        print(f"KIVI 2-bit, G 32: closed-form ratio vs fp32 by residual R: {kivi_residuals}", flush=True)

    # 2. measured bytes and decode speed at a 2,048-token context
    t0 = time.perf_counter()
    tokens = torch.cat([b["input_ids"].flatten() for _, b in zip(range(2), val)])
    print(f"\n--- decode: {CONTEXT}-token prefill + {args.decode_steps} timed steps, batch 1, 1 thread", flush=True)
    entries = [("full (plain KVCache)", None, "plain"), ("full (policy cache, raw store)", None, "raw")]
    entries += [(s["slug"], s["config"], "comp") for s in settings]
    dec = decode_bench(start_state, cfg, entries, tokens, calib["input_ids"], args.decode_steps)
    phases["decode_s"] = round(time.perf_counter() - t0, 1)

    # 3. training-step time vs the full cache
    t0 = time.perf_counter()
    eval_threads = torch.get_num_threads()
    torch.set_num_threads(args.step_threads)
    print(f"\n--- training-step time (16 x 256 tokens, {torch.get_num_threads()} threads, {args.time_rounds} rounds)",
          flush=True)
    teacher = load_decoder(TEACHER_CKPT)
    steps_t = step_bench(start_state, cfg, teacher, calib, [("full", None)] + [(s["slug"], s["config"]) for s in settings],
                         args.time_rounds)
    for k, v in steps_t.items():
        print(f"  {k}: {v}", flush=True)
    torch.set_num_threads(eval_threads)
    phases["step_time_s"] = round(time.perf_counter() - t0, 1)

    # 4. distil from the start: no compressor (baseline) and under each compressor
    t0 = time.perf_counter()
    print(f"\n--- distillation runs, {args.steps} steps each, from {START_CKPT.relative_to(ROOT)}", flush=True)
    fits = {"baseline": train("baseline", None, args.steps, args.reuse)}
    for s in settings:
        try:
            fits[s["slug"]] = train(s["slug"], s["config"], args.steps, args.reuse)
        except RuntimeError as e:  # keep going: one failing compressor must not hide the others' numbers
            print(f"!!! {s['slug']} failed: {e}", flush=True)
            fits[s["slug"]] = {"ckpt": None, "error": str(e).splitlines()[0]}
    phases["training_s"] = round(time.perf_counter() - t0, 1)

    # 5. perplexities, all by the same code on the same validation batches
    t0 = time.perf_counter()
    print(f"\n--- evaluation: first {args.val_batches} validation batches", flush=True)
    ev = lambda m: evaluate(m, val, max_batches=args.val_batches)  # noqa: E731
    res_start = ev(start)
    start_ppl, val_tokens = res_start["ppl"], res_start["tokens"]
    base_model, _ = load_trained(fits["baseline"]["ckpt"])
    base_ppl = ev(base_model)["ppl"]
    print(f"  start (dense-trained, full cache): {start_ppl:.4f}; baseline ({args.steps} steps, no compressor): "
          f"{base_ppl:.4f}", flush=True)
    rows = []
    for s in settings:
        model = load_decoder(START_CKPT)
        with_compressor(model, s["config"], calib["input_ids"])
        free = ev(model)["ppl"]
        trained = trained_off = None
        fit = fits[s["slug"]]
        if fit.get("ckpt") is not None:
            tm, tcfg = load_trained(fit["ckpt"])
            if tcfg.compressor.name != s["config"]["name"]:
                raise RuntimeError(f"{fit['ckpt']} was trained with compressor {tcfg.compressor.name}")
            trained = ev(tm)["ppl"]
            if s["compressor"] == "quantized":  # same weights, compressor off: KIVI's other "own full cache"
                tm.set_cache_policy(None)
                trained_off = ev(tm)["ppl"]
        d, st = dec[s["slug"]], steps_t[s["slug"]]
        measured_net = d["stored_bytes_per_token"] - d["position_bytes_per_token"]
        base_loop = fits["baseline"].get("loop_s")
        row = {
            "compressor": s["compressor"], "setting": s["setting"], "config": s["config"],
            "short": s["short"],
            "bytes_per_token": round(s["bytes_closed"], 2), "ratio_vs_full": round(s["bytes_closed"] / full_bytes, 4),
            "measured_bytes_per_token": round(d["stored_bytes_per_token"], 2),
            "measured_position_bytes_per_token": round(d["position_bytes_per_token"], 2),
            "measured_minus_positions": round(measured_net, 2),
            "measured_vs_closed_gap": round(measured_net - s["bytes_closed"], 3),
            "ppl_training_free": round(free, 4), "ppl_trained_under": None if trained is None else round(trained, 4),
            "ppl_trained_under_compressor_off": None if trained_off is None else round(trained_off, 4),
            "ppl_full_cache_baseline": round(base_ppl, 4), "ppl_start": round(start_ppl, 4),
            "trained_vs_baseline": None if trained is None else round(trained / base_ppl - 1, 4),
            "decode_tok_s": d["decode_tok_s"], "decode_ms": d["decode_ms"], "prefill_tok_s": d["prefill_tok_s"],
            "step_time_ratio": st["ratio_student"], "step_time_ratio_with_teacher": st["ratio_with_teacher"],
            "student_step_s": st["student_step_s"],
            "fit_wall_s": None if fit.get("wall_s") is None else round(fit["wall_s"], 1),
            "fit_loop_s": fit.get("loop_s"),
            "fit_loop_ratio": None if not (fit.get("loop_s") and base_loop) else round(fit["loop_s"] / base_loop, 3),
            "run_dir": str((RUNS / s["slug"]).relative_to(ROOT)), "error": fit.get("error"),
        }
        rows.append(row)
        print(f"  {s['slug']}: training-free {free:.4f}, trained-under {fmt(trained, '.4f')}"
              + (f", trained-under with the compressor off {trained_off:.4f}" if trained_off else ""), flush=True)
    phases["evaluation_s"] = round(time.perf_counter() - t0, 1)
    wall = time.perf_counter() - t_all

    # 6. targets
    by = {(r["compressor"], r["setting"].split(" (")[0].split(",")[0]): r for r in rows}
    targets = {}
    q2 = next((r for r in rows if r["compressor"] == "quantized" and r["config"].get("bits") == 2), None)
    if q2:
        targets["quantized_2bit"] = {
            "ratio_vs_full": q2["ratio_vs_full"], "ratio_ok": q2["ratio_vs_full"] <= 0.16,
            "trained_under_ppl": q2["ppl_trained_under"], "baseline_ppl": round(base_ppl, 4),
            "gap": q2["trained_vs_baseline"],
            "ppl_ok": q2["ppl_trained_under"] is not None and q2["ppl_trained_under"] <= 1.03 * base_ppl}
    quarter = f"rank {max(1, round(0.25 * hd))}"
    lo, sv = by.get(("lora", quarter)), by.get(("svd", quarter))
    if lo and sv and lo["ppl_trained_under"] is not None:
        targets["lora_vs_svd_d_h/4"] = {
            "lora_trained_under": lo["ppl_trained_under"], "svd_training_free": sv["ppl_training_free"],
            "beats": lo["ppl_trained_under"] < sv["ppl_training_free"],
            "by": round(sv["ppl_training_free"] - lo["ppl_trained_under"], 4),
            "by_rel": round(1 - lo["ppl_trained_under"] / sv["ppl_training_free"], 4),
            "svd_trained_under": sv["ppl_trained_under"],
            "lora_minus_svd_both_trained": None if sv["ppl_trained_under"] is None
            else round(lo["ppl_trained_under"] - sv["ppl_trained_under"], 4)}
    targets["step_time_within_2x"] = {r["compressor"] + " " + r["setting"]: r["step_time_ratio"] for r in rows}
    targets["step_time_all_ok"] = all(r["step_time_ratio"] <= 2.0 for r in rows)
    targets["distillation_step_time_within_2x"] = {r["compressor"] + " " + r["setting"]: r["step_time_ratio_with_teacher"]
                                                   for r in rows}
    targets["distillation_step_time_all_ok"] = all(r["step_time_ratio_with_teacher"] <= 2.0 for r in rows)

    # 7. write
    import subprocess as sp

    commit = sp.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = sp.run(["git", "status", "--porcelain", "pikv_train"], cwd=ROOT, capture_output=True, text=True).stdout.split("\n")
    env = (f"Python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPU cores; commit {commit}"
           + (" with uncommitted changes in pikv_train/" if any(d.strip() for d in dirty) else ""))
    ref = {k: dec[k] for k in ("full (plain KVCache)", "full (policy cache, raw store)")}
    result = {
        "steps": args.steps, "start": str(START_CKPT.relative_to(ROOT)), "context": CONTEXT, "head_dim": hd,
        "layers_x_kv_heads": n_streams, "full_bytes_per_token": full_bytes, "val_batches": args.val_batches,
        "val_tokens": val_tokens, "ppl_start_full_cache": round(start_ppl, 4),
        "ppl_baseline_full_cache": round(base_ppl, 4), "baseline_fit": {k: v for k, v in fits["baseline"].items() if k != "ckpt"},
        "kivi_2bit_ratio_by_residual": kivi_residuals, "decode_reference": ref,
        "teacher_forward_s": steps_t["teacher_forward_s"], "full_student_step_s": steps_t["full"]["student_step_s"],
        "threads": {"fits_and_evaluation": args.threads or "torch default", "step_timing": args.step_threads,
                    "decode": 1},
        "rows": rows, "targets": targets, "phases_s": phases, "wall_s": round(wall, 1), "environment": env,
        "dirty_files": [d for d in dirty if d.strip()],
    }
    plain, raw = ref["full (plain KVCache)"], ref["full (policy cache, raw store)"]
    md = [
        f"Start: the dense-trained (distilled) student `{START_CKPT.relative_to(ROOT)}` (head_dim {hd}, "
        f"{cfg.n_layer} layers x {cfg.n_kv_head} kv-heads, fp32). Trained-under: {args.steps} distillation steps "
        f"from it under the compressor; baseline: the same {args.steps} steps with no compressor. Perplexity on the "
        f"first {args.val_batches} validation batches ({val_tokens:,} tokens) by `pikv_train.evaluate`; bytes per "
        f"token of all layers and kv-heads at a {CONTEXT:,}-token context (full fp32 cache: {full_bytes:,}); decode "
        f"batch 1 at {CONTEXT:,} tokens on 1 thread; step time: student step at 16 x 256 tokens vs the full cache.",
        "",
        "| compressor | setting | bytes / token (closed form) | measured, excl. positions | ratio vs full | ppl training-free "
        "| ppl trained-under | ppl full-cache baseline | decode tok/s | step-time ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| full cache | fp32 | {full_bytes:,} | {plain['stored_bytes_per_token'] - plain['position_bytes_per_token']:,.0f} "
        f"| 1.000 | {start_ppl:.3f} | – | {base_ppl:.3f} | {plain['decode_tok_s']:.0f} (policy cache: "
        f"{raw['decode_tok_s']:.0f}) | 1.00 |",
    ]
    for r in rows:
        md.append(f"| {r['compressor']} | {r['setting']} | {r['bytes_per_token']:,.1f} | {r['measured_minus_positions']:,.1f} "
                  f"| {r['ratio_vs_full']:.3f} | {r['ppl_training_free']:.3f} | {fmt(r['ppl_trained_under'])} "
                  f"| {r['ppl_full_cache_baseline']:.3f} | {r['decode_tok_s']:.0f} | {r['step_time_ratio']:.2f} |")
    md += ["", f"Positions: the policy cache keeps an int64 position per token and (layer, kv-head) "
               f"(+{rows[0]['measured_position_bytes_per_token']:.0f} bytes per token here) and the plain cache one per "
               f"token and layer (+{plain['position_bytes_per_token']:.0f}); they are left out of the columns above. "
               f"Prefill of the {CONTEXT:,}-token prompt (tokens/s): "
               + ", ".join(f"{r['short']} {r['prefill_tok_s']:.0f}" for r in rows) + f"; plain cache {plain['prefill_tok_s']:.0f}."]
    md += ["", "Targets:"]
    if "quantized_2bit" in targets:
        t = targets["quantized_2bit"]
        md.append(f"- quantized 2-bit: {t['ratio_vs_full']:.3f}x the full cache's bytes per token "
                  f"({'meets' if t['ratio_ok'] else 'MISSES'} <= 0.16x); trained under it {fmt(t['trained_under_ppl'])} vs "
                  f"{t['baseline_ppl']:.3f} full-cache baseline ({fmt(t['gap'], '+.1%')}; "
                  f"{'meets' if t['ppl_ok'] else 'MISSES'} within 3%). Closed-form ratio by residual R: "
                  + ", ".join(f"R {k}: {v:.3f}" for k, v in kivi_residuals.items()) + ".")
    if "lora_vs_svd_d_h/4" in targets:
        t = targets["lora_vs_svd_d_h/4"]
        md.append(f"- lora at {quarter} (d_h/4), trained under: {t['lora_trained_under']:.3f} vs svd at the same rank "
                  f"training-free {t['svd_training_free']:.3f}: {'beats it' if t['beats'] else 'DOES NOT beat it'} by "
                  f"{t['by']:.3f} ({t['by_rel']:.1%}). Both trained under: lora {t['lora_trained_under']:.3f}, svd "
                  f"{fmt(t['svd_trained_under'])} (lora - svd = {fmt(t['lora_minus_svd_both_trained'], '+.3f')}).")
    worst = max(rows, key=lambda r: r["step_time_ratio"])
    worst_d = max(rows, key=lambda r: r["step_time_ratio_with_teacher"])
    within = lambda ok: "every compressor within" if ok else "NOT every compressor within"  # noqa: E731
    md.append(f"- step time of the distillation run's step (teacher forward + student step): "
              f"{within(targets['distillation_step_time_all_ok'])} 2x of the full cache (largest: {worst_d['compressor']} "
              f"{worst_d['setting']}, {worst_d['step_time_ratio_with_teacher']:.2f}x). The student step alone (the "
              f"table's column): {within(targets['step_time_all_ok'])} 2x (largest: {worst['compressor']} "
              f"{worst['setting']}, {worst['step_time_ratio']:.2f}x).")
    md += ["", f"`python benchmarks/compression.py --steps {args.steps}`: {wall / 60:.0f} min wall "
               f"({', '.join(f'{k[:-2]} {v / 60:.1f} min' for k, v in phases.items())}); {env}."]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(str(out) + ".json").write_text(json.dumps(result, indent=2) + "\n")
    Path(str(out) + ".md").write_text("\n".join(md) + "\n")
    plot(rows, start_ppl, base_ppl, full_bytes, Path(str(out) + ".png"), args.steps)
    print("\n" + "\n".join(md))
    print(f"wrote {out}.md, .json and .png")


if __name__ == "__main__":
    main()
