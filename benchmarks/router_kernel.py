"""Router forward + backward: fused Triton kernel vs eager PyTorch (SPEC §2, issue 4).

    python benchmarks/router_kernel.py                 # GPU: T=16384, d=2048, E=64, k=8, bf16 activations
    python benchmarks/router_kernel.py --dry-run       # CPU: tiny shapes, interpreted Triton vs reference

Two comparisons, both forward + backward through the combine weights, the Switch loss and the z-loss:

* ``op``: ``pikv_kernels.router_triton`` vs ``pikv_kernels.router_reference`` (the same math in eager
  PyTorch, ~15 kernels);
* ``module``: ``TopKBalancedRouter`` with ``kernel=triton`` vs ``kernel=eager`` (the router the model runs).

x is bf16 (T, d); the gate weight is fp32 (E, d) as in the model (the kernel casts it to bf16 for the
tensor-core GEMM with fp32 accumulation; the eager router computes in fp32). Achieved bandwidth counts the
minimum bytes a fused router must move (see ``min_bytes``) over the measured time, as a share of the
device's memory bandwidth (from the device properties, or ``--peak-gbs``). Writes
benchmarks/results/router_kernel.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

KNOWN_BW_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0, "L40S": 864.0, "A10": 600.0, "L4": 300.0}


def _import_kernels():
    """``pikv_kernels`` from the install, or straight from ./kernels when the project is not installed."""
    sys.path.insert(0, str(ROOT))
    try:
        import pikv_kernels  # noqa: F401
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "pikv_kernels", ROOT / "pikv_kernels/__init__.py", submodule_search_locations=[str(ROOT / "pikv_kernels")])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["pikv_kernels"] = mod
        spec.loader.exec_module(mod)
    import pikv_kernels

    return pikv_kernels


def peak_bandwidth_gbs(torch, override: float | None) -> tuple[float, str]:
    if override:
        return override, "--peak-gbs"
    props = torch.cuda.get_device_properties(0)
    clock = getattr(props, "memory_clock_rate", 0)  # kHz
    bus = getattr(props, "memory_bus_width", 0)  # bits
    if clock and bus:
        return 2 * clock * 1e3 * bus / 8 / 1e9, "device properties (2 x memory clock x bus width)"
    for name, bw in KNOWN_BW_GBS.items():
        if name in props.name:
            return bw, f"datasheet value for {name}"
    return float("nan"), "unknown"


def min_bytes(t: int, d: int, e: int, k: int, x_bytes: int, w_bytes: int) -> int:
    """Minimum HBM traffic of a fused router forward + backward.

    forward: read x and W, write logits (fp32, kept for the backward), lse, ids (int64) and weights (fp32);
    backward: read logits, lse, ids, weights, their gradient, W and x, write dlogits once and read it once
    for dW, write dx and dW.
    """
    fwd = t * d * x_bytes + e * d * w_bytes + t * e * 4 + t * 4 + t * k * (8 + 4)
    bwd = (t * e * 4 + t * 4 + t * k * (8 + 4 + 4) + e * d * w_bytes + t * d * x_bytes
           + 2 * t * e * 4 + t * d * x_bytes + e * d * w_bytes)
    return fwd + bwd


def time_fn(torch, fn, iters: int, warmup: int, cuda: bool) -> float:
    """Median milliseconds of fn()."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--peak-gbs", type=float, default=None, help="device memory bandwidth in GB/s")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU, interpreted Triton (fp32)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/router_kernel.json"))
    args = ap.parse_args(argv)

    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        args.tokens, args.d_model, args.experts, args.top_k, args.iters, args.warmup = 77, 48, 12, 3, 2, 1
    import torch

    kernels = _import_kernels()
    from pikv_kernels.router_reference import router_reference
    from pikv_kernels.router_triton import router_triton

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("router_kernel: no CUDA device; run with --dry-run on CPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda" if cuda else "cpu")
    xdtype = torch.bfloat16 if cuda else torch.float32
    t, d, e, k = args.tokens, args.d_model, args.experts, args.top_k
    gen = torch.Generator(device=dev).manual_seed(0)
    x0 = torch.randn(t, d, device=dev, generator=gen).to(xdtype)
    w0 = torch.randn(e, d, device=dev, generator=gen) * d**-0.5
    g = torch.randn(t, k, device=dev, generator=gen)
    opts = dict(aux_weight=1e-2, z_weight=1e-3)

    def op(fn):
        x = x0.detach().requires_grad_()
        w = w0.detach().requires_grad_()

        def step():
            x.grad = w.grad = None
            out = fn(x, w, k, **opts)
            ((out.weights * g).sum() + out.aux + out.z).backward()
            return out, x.grad, w.grad

        return step

    results: dict = {"tokens": t, "d_model": d, "experts": e, "top_k": k, "x_dtype": str(xdtype),
                     "device": torch.cuda.get_device_name(0) if cuda else "cpu (TRITON_INTERPRET=1)"}
    # Correctness first (the dry run's pass criterion; on GPU a report, bf16 GEMM vs fp32 GEMM).
    ref, rdx, rdw = op(router_reference)()
    tri, tdx, tdw = op(router_triton)()
    same = (tri.ids.sort(-1).values == ref.ids.sort(-1).values).all(-1).float().mean().item()
    results["ids_same_rows"] = same
    results["weights_max_abs_diff"] = (tri.weights - ref.weights).abs().max().item()
    results["dx_max_abs_diff"] = (tdx.float() - rdx.float()).abs().max().item()
    results["dw_max_abs_diff"] = (tdw.float() - rdw.float()).abs().max().item()

    t_ref = time_fn(torch, op(router_reference), args.iters, args.warmup, cuda)
    t_tri = time_fn(torch, op(router_triton), args.iters, args.warmup, cuda)
    results["op_eager_ms"], results["op_triton_ms"] = t_ref, t_tri
    results["op_speedup"] = t_ref / t_tri

    try:  # the model's router module (needs pikv_train importable)
        from pikv_train.routing import RouterConfig, TopKBalancedRouter

        mod = TopKBalancedRouter(d, e, RouterConfig(top_k=k, aux_loss_weight=1e-2, z_loss_weight=1e-3)).to(dev)

        def module_step(kernel):
            x = x0.detach().requires_grad_()

            def step():
                mod.cfg.kernel = kernel
                x.grad = None
                mod.zero_grad(set_to_none=True)
                out = mod(x)
                ((out.weights * g).sum() + out.loss).backward()

            return step

        results["module_eager_ms"] = time_fn(torch, module_step("eager"), args.iters, args.warmup, cuda)
        results["module_triton_ms"] = time_fn(torch, module_step("triton"), args.iters, args.warmup, cuda)
        results["module_speedup"] = results["module_eager_ms"] / results["module_triton_ms"]
    except ImportError as exc:  # pragma: no cover - bare device machines
        results["module_skipped"] = repr(exc)

    nbytes = min_bytes(t, d, e, k, x0.element_size(), 4)
    results["min_bytes"] = nbytes
    results["triton_gbs"] = nbytes / (t_tri * 1e-3) / 1e9
    if cuda:
        peak, src = peak_bandwidth_gbs(torch, args.peak_gbs)
        results["peak_gbs"], results["peak_source"] = peak, src
        results["bandwidth_share"] = results["triton_gbs"] / peak

    print(f"router forward+backward  T={t} d={d} E={e} k={k} x={xdtype} on {results['device']}")
    print(f"  op      eager {t_ref:9.3f} ms   triton {t_tri:9.3f} ms   speed-up {results['op_speedup']:.2f}x")
    if "module_speedup" in results:
        print(f"  module  eager {results['module_eager_ms']:9.3f} ms   triton {results['module_triton_ms']:9.3f} ms"
              f"   speed-up {results['module_speedup']:.2f}x")
    print(f"  triton achieved {results['triton_gbs']:.1f} GB/s of minimum traffic ({nbytes / 1e6:.1f} MB)"
          + (f" = {100 * results['bandwidth_share']:.1f}% of {results['peak_gbs']:.0f} GB/s ({results['peak_source']})"
             if cuda else ""))
    print(f"  agreement: same expert sets on {100 * same:.2f}% of tokens, max diff: weights "
          f"{results['weights_max_abs_diff']:.2e}, dx {results['dx_max_abs_diff']:.2e}, "
          f"dW {results['dw_max_abs_diff']:.2e}")

    out = Path(args.out)
    if args.dry_run:
        out = out.with_name(out.stem + "_dry_run.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"  wrote {out}")
    if args.dry_run:
        ok = (same == 1.0 and results["weights_max_abs_diff"] <= 1e-6 and results["dx_max_abs_diff"] <= 1e-5
              and results["dw_max_abs_diff"] <= 1e-5)
        print("dry run:", "PASS" if ok else "FAIL")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
