"""FlexAttention backend (CUDA): the policy's visibility as a block mask, empty tiles skipped.

The mask is given as a ``mask_mod(b, h_kv, q_idx, kv_idx)`` over compact tensors (positions, page
bitmaps, per-chunk keep bitmaps), never as a dense float mask per head. On CPU the same code runs
eagerly (tests and ``--dry-run``), materialising scores, which is only meant for tiny shapes.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def block_mask_for(mask_mod, b: int, h: int, h_kv: int, t: int, s: int, device, block_size: int = 128,
                   causal: bool = True):
    """BlockMask of ``causal ∧ mask_mod`` (``mask_mod`` alone if not causal) for query heads ``h``
    grouped over ``h_kv`` kv-heads."""
    from torch.nn.attention.flex_attention import create_block_mask

    g = h // h_kv

    def mm(bi, hi, qi, ki):
        if not causal:
            return mask_mod(bi, hi // g, qi, ki)
        c = ki <= qi
        return c if mask_mod is None else c & mask_mod(bi, hi // g, qi, ki)

    return create_block_mask(mm, b, h, t, s, device=device, BLOCK_SIZE=block_size)


def flex_attend(q: Tensor, k: Tensor, v: Tensor, mask_mod, block_size: int = 128, causal: bool = True) -> Tensor:
    """(B, H, T, hd) attention under ``causal ∧ mask_mod`` (or ``mask_mod`` alone) with FlexAttention
    (compiled on CUDA)."""
    from torch.nn.attention.flex_attention import flex_attention

    b, h, t, _ = q.shape
    bm = block_mask_for(mask_mod, b, h, k.shape[1], t, k.shape[2], q.device, block_size, causal)
    fn = _compiled_flex() if q.is_cuda else flex_attention
    return fn(q, k, v, block_mask=bm, enable_gqa=h != k.shape[1])
