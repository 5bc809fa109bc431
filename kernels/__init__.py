"""Triton kernels, each beside its PyTorch reference (installed as `pikv_kernels`)."""
