"""Group-wise asymmetric min/max quantization of KV tensors: FlexGen's (Sheng et al., 2023, §5) and the
one every compressor uses (KIVI's per-channel keys / per-token values, the mixed-precision tiers).

FlexGen compresses the cache with ``CompressionConfig(num_bits=4, group_size=64, group_dim=2,
symmetric=False)``: the last dimension is cut into groups of ``group_size`` (zero-padded to a multiple
of it, the zeros taking part in min/max as in FlexGen), each group stores its minimum and its scale
``(2^bits - 1) / (max - min)`` in the data's own dtype, and every value becomes
``round(clamp((x - min) * scale, 0, 2^bits - 1))``; 2- and 4-bit codes are packed four / two per byte
(the first code in the high bits). Dequantized:
``code / scale + min``. Codes are computed in fp32 (FlexGen upcasts half precision on CPU as well; in
bf16 the rounding error would exceed half a step) and min/scale are stored in the source dtype. One
guard FlexGen lacks: a constant group (max == min) would give an infinite scale and NaN codes, so its
range is taken as 1 (codes 0, it dequantizes to the constant exactly).

:func:`minmax_scale` and :func:`quantize_codes` are the two halves of :func:`group_quantize`, so a cache that
learns a group's min/max incrementally (KIVI's key groups, whose members arrive one token at a time and may
be evicted before the group is quantized) computes exactly the codes the training forward computes.
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


BITS = (2, 4, 8)


def minmax_scale(mn: Tensor, mx: Tensor, bits: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Stored (min, scale) of groups with fp32 minimum ``mn`` and maximum ``mx``, in ``dtype``."""
    rng = mx - mn
    scale = (2**bits - 1) / torch.where(rng > 0, rng, torch.ones_like(rng))
    return mn.to(dtype), scale.to(dtype)


def quantize_codes(g: Tensor, mn: Tensor, scale: Tensor, bits: int) -> Tensor:
    """Unpacked uint8 codes of ``g`` (..., G) against stored ``mn``/``scale`` (..., 1): the source-dtype
    values, so that dequantization inverts exactly them."""
    return ((g.float() - mn.float()) * scale.float()).clamp_(0, 2**bits - 1).round_().to(torch.uint8)


def pack(codes: Tensor, bits: int) -> Tensor:
    """(..., D) uint8 codes -> (..., D * bits / 8) bytes, the first code of each byte in its high bits."""
    per = 8 // bits
    if per == 1:
        return codes
    c = codes.view(*codes.shape[:-1], -1, per)
    out = c[..., 0] << (8 - bits)
    for i in range(1, per):
        out = out | (c[..., i] << (8 - bits * (i + 1)))
    return out


def unpack(packed: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`pack`."""
    per = 8 // bits
    if per == 1:
        return packed
    mask = 2**bits - 1
    return torch.stack([(packed >> (8 - bits * (i + 1))) & mask for i in range(per)], -1).flatten(-2)


def group_quantize(x: Tensor, bits: int = 4, group_size: int = 64) -> GroupQuantized:
    """x (..., D) -> codes/min/scale, groups of ``group_size`` along D."""
    if bits not in BITS:
        raise ValueError(f"bits={bits}: KV quantization supports 2, 4 or 8 bits")
    if group_size * bits % 8:
        raise ValueError(f"group_size={group_size} x bits={bits} must fill whole bytes")
    d, dtype = x.shape[-1], x.dtype
    pad = (-d) % group_size
    x = x.float()
    if pad:
        x = torch.cat([x, x.new_zeros(*x.shape[:-1], pad)], -1)
    g = x.view(*x.shape[:-1], -1, group_size)  # (..., n_groups, group_size)
    mn, scale = minmax_scale(g.amin(-1, keepdim=True), g.amax(-1, keepdim=True), bits, dtype)
    codes = pack(quantize_codes(g, mn, scale, bits).flatten(-2), bits)  # (..., D_pad * bits / 8)
    return GroupQuantized(codes, mn, scale, bits, group_size, d)


def dequantize_codes(codes: Tensor, mn: Tensor, scale: Tensor) -> Tensor:
    """Unpacked codes (..., G) with their group's ``mn``/``scale`` (..., 1) -> fp32 values."""
    return codes.float() / scale.float() + mn.float()


def group_dequantize(qt: GroupQuantized) -> Tensor:
    """Inverse of :func:`group_quantize` (up to the rounding): (..., D) in the dtype of ``qt.mn``."""
    codes = unpack(qt.codes, qt.bits)
    g = codes.view(*codes.shape[:-1], -1, qt.group_size)
    return dequantize_codes(g, qt.mn, qt.scale).flatten(-2)[..., : qt.dim].to(qt.mn.dtype)


def fake_quantize(x: Tensor, bits: int = 4, group_size: int = 64) -> Tensor:
    """Quantize-dequantize with a straight-through gradient (training under the compressed cache)."""
    with torch.no_grad():
        xq = group_dequantize(group_quantize(x.detach(), bits, group_size))
    return xq + (x - x.detach())  # forward exactly the stored value (bf16 too), identity gradient
