"""Peak memory and time: chunked fused KD loss vs the plain full-logits loss (forward + backward).

What is compared (same inputs, same divergence, same teacher work):

* ``plain``: ``s = h @ W.T`` (N, V), teacher ``t = h_t @ W_t.T`` (N, V) under no_grad, then the
  pure divergence from ``pikv_train.distill`` and ``loss.backward()``; autograd keeps the full
  (N, V) logits and softmax intermediates alive until the backward.
* ``chunked``: ``pikv_train.distill.chunked_distill_loss`` on the same tensors + ``backward()``.

How memory is measured (CPU): each path runs in its own fresh Python subprocess, so allocator
caches and freed-but-retained pages of one path can never flatter or penalise the other. In the
worker, after the inputs are built, the peak resident set size is reset by writing ``5`` to
``/proc/self/clear_refs`` (Linux >= 4.0), and the baseline ``VmRSS`` is read. After the warm-up and
timed repeats, ``VmHWM`` (the kernel's high-water mark of resident memory) minus that baseline is
the peak extra memory of the loss step: every page the step touched at the same time, including
the gradients of ``h`` and ``W``, whatever the allocator did. If ``clear_refs`` cannot be written
the script says so and the figure also includes setup (still an upper bound for that path).

Timing: ``--warmup`` untimed iterations, then ``--repeats`` timed iterations (``perf_counter``
around forward + backward); the median is reported. The two workers run one after the other, so on
a shared machine repeat the run if the load changed. The loss values and gradient norms of the two
paths are compared to confirm that they computed the same thing.

Usage (defaults: N=4096, d=512, V=32768, fp32, fkl)::

    .venv/bin/python benchmarks/chunked_loss_memory.py
    .venv/bin/python benchmarks/chunked_loss_memory.py --n 2048 --v 65536 --divergence srkl \\
        --chunk-size 256

Writes the figures to ``benchmarks/results/chunked_loss_memory.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "chunked_loss_memory.json"
TARGET_MEMORY_RATIO = 0.25  # chunked peak <= 25% of plain
TARGET_TIME_RATIO = 1.10  # chunked time <= 1.1x plain


def _status_kib(field: str) -> int:
    """A memory field (``VmRSS``, ``VmHWM``) of this process from /proc/self/status, in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _worker(args: argparse.Namespace) -> dict:
    """Run one path in this (fresh) process and return its figures."""
    import torch

    from pikv_train.distill import DIVERGENCES, chunked_distill_loss

    torch.manual_seed(0)
    n, d, d_t, v = args.n, args.d, args.d_teacher or args.d, args.v
    # Scaled like a trained LM head so logits have a realistic spread (std ~ 1).
    h = torch.randn(n, d).requires_grad_(True)  # (N, d)
    w = (torch.randn(v, d) / d**0.5).requires_grad_(True)  # (V, d)
    th = torch.randn(n, d_t)  # (N, d_t)
    tw = torch.randn(v, d_t) / d_t**0.5  # (V, d_t)
    div_kwargs = {}

    def plain_step():
        s_logits = h @ w.t()  # (N, V)
        with torch.no_grad():
            t_logits = th @ tw.t()  # (N, V)
        loss = DIVERGENCES[args.divergence](
            student_logits=s_logits, teacher_logits=t_logits, **div_kwargs
        )
        loss.backward()
        return loss

    def chunked_step():
        loss = chunked_distill_loss(
            h, w, th, tw, divergence=args.divergence, chunk_size=args.chunk_size, **div_kwargs
        )
        loss.backward()
        return loss

    step = plain_step if args.worker == "plain" else chunked_step
    peak_reset = _reset_peak()
    baseline_kib = _status_kib("VmRSS")
    times, loss = [], None
    for i in range(args.warmup + args.repeats):
        h.grad = None
        w.grad = None
        t0 = time.perf_counter()
        loss = step()
        elapsed = time.perf_counter() - t0
        if i >= args.warmup:
            times.append(elapsed)
    peak_kib = _status_kib("VmHWM")
    return {
        "path": args.worker,
        "peak_mb": (peak_kib - baseline_kib) / 1024,
        "baseline_rss_mb": baseline_kib / 1024,
        "peak_reset": peak_reset,
        "time_s_median": statistics.median(times),
        "time_s_min": min(times),
        "times_s": times,
        "loss": float(loss),
        "grad_h_norm": float(h.grad.norm()),
        "grad_w_norm": float(w.grad.norm()),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def _run_path(path: str, argv: list) -> dict:
    """Run one path in a fresh interpreter and parse its JSON line."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", path, *argv]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _parse(argv=None) -> argparse.Namespace:
    from pikv_train.distill.chunked import DEFAULT_CHUNK_SIZE

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=4096, help="tokens N")
    ap.add_argument("--d", type=int, default=512, help="student hidden size")
    ap.add_argument("--d-teacher", type=int, default=None, help="teacher hidden size (default d)")
    ap.add_argument("--v", type=int, default=32768, help="vocabulary size")
    ap.add_argument("--divergence", default="fkl", help="fkl|rkl|jsd|tvd|skl|srkl")
    ap.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--worker", choices=["plain", "chunked"], help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = _parse(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    forwarded = [
        "--n", str(args.n), "--d", str(args.d), "--v", str(args.v),
        "--divergence", args.divergence, "--chunk-size", str(args.chunk_size),
        "--warmup", str(args.warmup), "--repeats", str(args.repeats),
    ]
    if args.d_teacher:
        forwarded += ["--d-teacher", str(args.d_teacher)]
    plain = _run_path("plain", forwarded)
    chunked = _run_path("chunked", forwarded)

    mem_ratio = chunked["peak_mb"] / plain["peak_mb"]
    time_ratio = chunked["time_s_median"] / plain["time_s_median"]
    loss_diff = abs(chunked["loss"] - plain["loss"])
    grad_rel = max(
        abs(chunked[k] - plain[k]) / max(plain[k], 1e-12) for k in ("grad_h_norm", "grad_w_norm")
    )
    config = {
        "n": args.n, "d": args.d, "d_teacher": args.d_teacher or args.d, "v": args.v,
        "dtype": "float32", "device": "cpu", "divergence": args.divergence,
        "chunk_size": args.chunk_size, "warmup": args.warmup, "repeats": args.repeats,
        "threads": plain["threads"], "torch": plain["torch"], "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }
    result = {
        "config": config,
        "method": "fresh subprocess per path; peak = VmHWM - VmRSS baseline after input setup, "
        "VmHWM reset via /proc/self/clear_refs; time = median of timed fwd+bwd repeats",
        "plain": plain,
        "chunked": chunked,
        "memory_ratio": mem_ratio,
        "time_ratio": time_ratio,
        "targets": {"memory_ratio_max": TARGET_MEMORY_RATIO, "time_ratio_max": TARGET_TIME_RATIO},
        "targets_met": mem_ratio <= TARGET_MEMORY_RATIO and time_ratio <= TARGET_TIME_RATIO,
        "check": {"abs_loss_diff": loss_diff, "max_rel_grad_norm_diff": grad_rel},
    }

    print(
        f"N={args.n} d={args.d} V={args.v} fp32 cpu divergence={args.divergence} "
        f"chunk={args.chunk_size} threads={config['threads']} repeats={args.repeats}"
    )
    print(f"{'path':<10}{'peak MB':>12}{'time s (median)':>18}{'time s (min)':>15}{'loss':>14}")
    for r in (plain, chunked):
        print(
            f"{r['path']:<10}{r['peak_mb']:>12.1f}{r['time_s_median']:>18.3f}"
            f"{r['time_s_min']:>15.3f}{r['loss']:>14.6f}"
        )
    print(
        f"{'ratio':<10}{mem_ratio:>12.3f}{time_ratio:>18.3f}{'':>15}"
        f"{'':>14}   (target <= {TARGET_MEMORY_RATIO} memory, <= {TARGET_TIME_RATIO} time)"
    )
    print(f"same result: |dloss|={loss_diff:.2e}, max rel grad-norm diff={grad_rel:.2e}")
    if not (plain["peak_reset"] and chunked["peak_reset"]):
        print("warning: could not reset VmHWM; peaks include input setup")
    print("targets met" if result["targets_met"] else "TARGETS NOT MET")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
