"""Triton kernels, each beside its PyTorch reference (installed as ``pikv_kernels``).

Router dispatch (:func:`resolve_router_kernel`, :func:`fused_router`):

* ``"triton"``: the fused Triton router (``router_triton``); CUDA, or CPU under ``TRITON_INTERPRET=1``.
* ``"reference"``: ``router_reference``, the same math in eager PyTorch.
* ``"eager"``: not a kernel; routers run their own PyTorch code (``pikv_train.routing``).
* ``"auto"``: the ``PIKV_ROUTER_KERNEL`` environment variable if set, else ``"triton"`` on CUDA when
  triton imports, else ``"eager"``.

A config value other than ``"auto"`` wins over the environment variable.
"""

from __future__ import annotations

import os

from pikv_kernels.router_reference import FusedRouterOutput, router_reference

KERNELS = ("auto", "triton", "reference", "eager")


def triton_available() -> bool:
    """True when triton imports (on CPU it can only run with TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the environment
        return False
    return True


def resolve_router_kernel(kernel: str, device_type: str) -> str:
    """Resolve ``auto`` to a concrete choice: ``triton`` | ``reference`` | ``eager``."""
    if kernel not in KERNELS:
        raise ValueError(f"router kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "auto":
        env = os.environ.get("PIKV_ROUTER_KERNEL", "auto").strip().lower() or "auto"
        if env not in KERNELS:
            raise ValueError(f"PIKV_ROUTER_KERNEL must be one of {KERNELS}, got {env!r}")
        kernel = env
    if kernel == "auto":
        kernel = "triton" if device_type == "cuda" and triton_available() else "eager"
    if kernel == "triton" and device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("router kernel 'triton' on CPU needs TRITON_INTERPRET=1 set before importing triton")
    return kernel


def router_fn(kernel: str):
    """The fused-router function for a resolved kernel name ('triton' or 'reference')."""
    if kernel == "triton":
        from pikv_kernels.router_triton import router_triton

        return router_triton
    if kernel == "reference":
        return router_reference
    raise ValueError(f"no fused-router function for kernel {kernel!r}")


def fused_router(x, weight, top_k: int, *, kernel: str = "auto", **kw) -> FusedRouterOutput:
    """Route x (N, d) with gate weight (E, d) through the chosen implementation ('eager' -> reference)."""
    k = resolve_router_kernel(kernel, x.device.type)
    return router_fn("reference" if k == "eager" else k)(x, weight, top_k, **kw)


__all__ = ["FusedRouterOutput", "KERNELS", "fused_router", "resolve_router_kernel", "router_fn", "router_reference",
           "triton_available"]
