"""FlexGen's group-wise asymmetric min/max quantization of the KV cache (Sheng et al., 2023, §5).

FlexGen compresses the cache with ``CompressionConfig(num_bits=4, group_size=64, group_dim=2,
symmetric=False)``: the head dimension is cut into groups of ``group_size`` (zero-padded to a multiple
of it, the zeros taking part in min/max as in FlexGen), each group stores its minimum and its scale
``(2^bits - 1) / (max - min)`` in the data's own dtype, and every value becomes
``round(clamp((x - min) * scale, 0, 2^bits - 1))``; 4-bit codes are packed two per byte. Dequantized:
``code / scale + min``. Codes are computed in fp32 (FlexGen upcasts half precision on CPU as well; in
bf16 the rounding error would exceed half a step) and min/scale are stored in the source dtype. One
guard FlexGen lacks: a constant group (max == min) would give an infinite scale and NaN codes, so its
range is taken as 1 (codes 0, it dequantizes to the constant exactly).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class GroupQuantized:
    """Quantized tensor: ``codes`` uint8 (..., n_groups * group_size * bits / 8) packed along the last
    dim, ``mn`` and ``scale`` (..., n_groups, 1) in the source dtype, ``dim`` the unpadded last size."""

    codes: Tensor
    mn: Tensor
    scale: Tensor
    bits: int
    group_size: int
    dim: int

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.mn, self.scale))


def bytes_per_vector(dim: int, bits: int, group_size: int, element_size: int) -> int:
    """Bytes one quantized vector of ``dim`` values takes (codes + min + scale per group)."""
    groups = -(-dim // group_size)
    return groups * group_size * bits // 8 + 2 * groups * element_size


def group_quantize(x: Tensor, bits: int = 4, group_size: int = 64) -> GroupQuantized:
    """x (..., D) -> codes/min/scale, groups of ``group_size`` along D."""
    if bits not in (4, 8):
        raise ValueError(f"bits={bits}: FlexGen KV compression supports 4 or 8 bits")
    d, dtype = x.shape[-1], x.dtype
    pad = (-d) % group_size
    x = x.float()
    if pad:
        x = torch.cat([x, x.new_zeros(*x.shape[:-1], pad)], -1)
    g = x.view(*x.shape[:-1], -1, group_size)  # (..., n_groups, group_size)
    top = 2**bits - 1
    mn = g.amin(-1, keepdim=True)
    rng = g.amax(-1, keepdim=True) - mn
    scale = top / torch.where(rng > 0, rng, torch.ones_like(rng))
    # Quantize against the stored (source-dtype) min and scale, so dequantization inverts exactly them.
    mn, scale = mn.to(dtype), scale.to(dtype)
    codes = ((g - mn.float()) * scale.float()).clamp_(0, top).round_().to(torch.uint8).flatten(-2)  # (..., D_pad)
    if bits == 4:  # two codes per byte: even index in the high nibble
        codes = (codes[..., 0::2] << 4) | codes[..., 1::2]
    return GroupQuantized(codes, mn, scale, bits, group_size, d)


def group_dequantize(qt: GroupQuantized) -> Tensor:
    """Inverse of :func:`group_quantize` (up to the rounding): (..., D) in the dtype of ``qt.mn``."""
    codes = qt.codes
    if qt.bits == 4:
        codes = torch.stack([codes >> 4, codes & 0xF], -1).flatten(-2)
    g = codes.view(*codes.shape[:-1], -1, qt.group_size).float()
    return (g / qt.scale.float() + qt.mn.float()).flatten(-2)[..., : qt.dim].to(qt.mn.dtype)


def fake_quantize(x: Tensor, bits: int = 4, group_size: int = 64) -> Tensor:
    """Quantize-dequantize with a straight-through gradient (training under the compressed cache)."""
    with torch.no_grad():
        xq = group_dequantize(group_quantize(x.detach(), bits, group_size))
    return x + (xq - x).detach()
