"""Block-sparse attention under a cache policy (CPU and any device without FlexAttention).

A policy at budget b lets row t read about b·L keys, so its attention needs O(T·(budget + C)) work and memory,
not the O(T²) of a dense boolean mask. The rows are cut into blocks of C; each block gathers only the keys some
of its rows can read (sinks, the recent-window range, the policy's kept or selected keys) into a fixed-size
(S,) list, and one batched SDPA runs every block over its own list with a (C, S) mask. Forward and backward
touch T·S keys per head instead of T·T; the outputs and gradients equal the dense masked path
(tests/cache/test_block_attention.py).

A plan is what a policy's ``block_plan`` returns: for the chunk-sequential policies (H2O, LRU, LRU+) and AdaKV
it is the very gathering their decision pass scores over (one pass that decides and attends), for StreamingLLM
and Quest it follows from positions and page selections.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class BlockPlan:
    """Which keys each block of query rows reads.

    rows: (nB, C) long, the row of each block slot (-1: padding, when a block is shorter than C).
    keys: (B|1, H_kv|1, nB, S) long, the key index of each key slot (any valid index where unused).
    vis: (B|1, H_kv|1, nB, C, S) bool, row slot reads key slot (False for unused and duplicate slots).
    """

    rows: Tensor
    keys: Tensor
    vis: Tensor

    def slot_of_row(self, t: int) -> Tensor:
        """(T,) index into the flattened (nB * C) slots of each row."""
        flat = self.rows.flatten()
        slot = torch.empty(t, dtype=torch.long, device=flat.device)
        real = flat >= 0
        slot[flat[real]] = real.nonzero().flatten()
        return slot

    def counts(self, b: int, hkv: int, t: int) -> Tensor:
        """(B, H_kv, T) number of keys each row reads (the policy's statistics, as from a dense mask)."""
        n = self.vis.sum(-1).flatten(-2)  # (B|1, H_kv|1, nB * C)
        return n.index_select(-1, self.slot_of_row(t)).expand(b, hkv, t)

    def dense(self, b: int, hkv: int, t: int) -> Tensor:
        """(B, H_kv, T, T) bool: the same visibility as a dense mask (only where one is needed anyway)."""
        nb, c = self.rows.shape
        s = self.keys.shape[-1]
        out = torch.zeros(b, hkv, nb * c, t + 1, dtype=torch.bool, device=self.vis.device)
        keys = self.keys.expand(b, hkv, nb, s)[:, :, :, None].expand(b, hkv, nb, c, s)
        keys = torch.where(self.vis.expand(b, hkv, nb, c, s), keys, t)  # unused slots to the spare column
        out.scatter_(-1, keys.reshape(b, hkv, nb * c, s), True)
        return out[..., :t].index_select(2, self.slot_of_row(t))


def row_blocks(starts: list[int], t: int, c: int, device) -> Tensor:
    """(nB, C) long rows of blocks starting at ``starts`` (each up to the next start or T), -1 padded."""
    bounds = starts[1:] + [t]
    rows = torch.full((len(starts), c), -1, dtype=torch.long, device=device)
    for i, (s0, e) in enumerate(zip(starts, bounds)):
        rows[i, : e - s0] = torch.arange(s0, e, device=device)
    return rows


def block_attend(q: Tensor, k: Tensor, v: Tensor, plan: BlockPlan) -> Tensor:
    """(B, H, T, hd) attention of q (B, H, T, hd) over k, v (B, H_kv, T, hd) as ``plan`` shows each row.

    The g = H / H_kv query heads of a kv-head read the same keys, so they ride as extra rows of one block:
    q (B·H_kv, nB, g·C, hd) against k, v (B·H_kv, nB, S, hd), one SDPA call for the whole layer.
    """
    b, h, t, hd = q.shape
    hkv = k.shape[1]
    g = h // hkv
    nb, c = plan.rows.shape
    s = plan.keys.shape[-1]
    rows = plan.rows.clamp_min(0).flatten()
    qb = q.view(b, hkv, g, t, hd)[:, :, :, rows].view(b, hkv, g, nb, c, hd).transpose(2, 3)
    qb = qb.reshape(b * hkv, nb, g * c, hd)
    idx = plan.keys.expand(b, hkv, nb, s).reshape(b, hkv, nb * s, 1).expand(-1, -1, -1, hd)
    kb = k.gather(2, idx).view(b * hkv, nb, s, hd)
    vb = v.gather(2, idx).view(b * hkv, nb, s, hd)
    # Padding rows read key slot 0 (any one key keeps their softmax finite; their outputs are dropped).
    pad = (plan.rows < 0)[:, :, None] & (torch.arange(s, device=q.device) == 0)
    vis = plan.vis | pad
    mask = vis.expand(b, hkv, nb, c, s)[:, :, :, None].expand(b, hkv, nb, g, c, s).reshape(b * hkv, nb, g * c, s)
    y = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask)  # (B·H_kv, nB, g·C, hd)
    y = y.view(b, hkv, nb, g, c, hd).transpose(2, 3).reshape(b, h, nb * c, hd)
    return y.index_select(2, plan.slot_of_row(t))


def window_block(keep: Tensor | None, s0: int, e: int, c: int, n_sink: int, window: int, n_keep: int,
                 t: int, device) -> tuple[Tensor, Tensor]:
    """Key slots and visibility of rows [s0, e) that read ``sinks ∪ recent window ∪ keep`` (H2O, LRU, LRU+,
    AdaKV, StreamingLLM): row i reads key j <= i when j < n_sink, i - j < window, or keep[j].

    The slots are [sinks (n_sink) | the window range [s0 - window + 1, s0 + c) | the n_keep kept keys before
    that range], S = n_sink + window + c - 1 + n_keep; a key in two parts is read through one of them only.

    Args:
        keep: (B|1, H_kv|1, T) bool kept keys (at most n_keep of them before the window range), or None.
    Returns:
        keys (B|1, H_kv|1, S) long and vis (B|1, H_kv|1, C, S) bool (rows past e are padding: all False).
    """
    dev = device
    lo = s0 - window + 1  # the first key some row of the block sees through the window
    sink = torch.arange(n_sink, device=dev)
    win = torch.arange(lo, s0 + c, device=dev)
    i = torch.arange(s0, s0 + c, device=dev)[:, None]  # (C, 1) rows (past e: padding)
    row_ok = i < e
    # Sinks: every row past them reads them. Window range: causal, and in the window or kept (a kept key
    # that is still in the range is read through it).
    sink_vis = (sink[None] <= i) & row_ok
    win_ok = (win >= n_sink) & (win >= 0) & (win < t)
    winc = win.clamp(0, t - 1)
    win_vis = (win[None] <= i) & win_ok & row_ok & (i - win[None] < window)
    if keep is None:
        keys = torch.cat([sink, winc])
        return keys[None, None], torch.cat([sink_vis, win_vis], -1)[None, None]
    kept_in_win = keep[..., winc] & win_ok  # (B|1, H_kv|1, W)
    win_vis = win_vis | ((win[None] <= i) & row_ok & kept_in_win[..., None, :])
    n = max(1, min(n_keep, t))  # one spare slot when nothing is kept keeps the shapes simple
    before = keep & (torch.arange(keep.shape[-1], device=dev) < max(lo, 0))  # kept keys not in the window range
    kidx = before.to(torch.int8).topk(n, dim=-1, sorted=False).indices  # the kept keys first (n >= their count)
    kvis = before.gather(-1, kidx)[..., None, :] & row_ok  # (B|1, H_kv|1, C, n): every real row reads them
    lead = kvis.shape[:-2]
    keys = torch.cat([sink.expand(*lead, -1), winc.expand(*lead, -1), kidx], -1)
    vis = torch.cat([sink_vis.expand(*lead, -1, -1), win_vis.expand(*lead, -1, -1), kvis], -1)
    return keys, vis
