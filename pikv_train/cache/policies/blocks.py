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
from torch.utils.checkpoint import checkpoint


ALWAYS, WINDOW = 1, 2  # key-slot kinds: read by every row at or after the key; read while row - key < window


def kind_vis(j: Tensor, kind: Tensor, i: Tensor, window: int) -> Tensor:
    """Whether row i reads key slot j of the given kind (broadcasting): causal, and ALWAYS or within the window."""
    return (j <= i) & ((kind == ALWAYS) | ((kind == WINDOW) & (i - j < window)))


@dataclass
class BlockPlan:
    """Which keys each block of query rows reads, stored compactly (the plans of every layer stay alive until
    the backward, so nothing of size (T, S) is kept: visibility is rebuilt per group of blocks).

    rows: (nB, C) long, the row of each block slot (-1: padding, when a block is shorter than C).
    keys: (B|1, H_kv|1, nB, S) long, the key index of each key slot (any index where unused; >= T is never read);
        or None with ``page_ids`` (Quest): (B, H_kv, nB, U) long pages, slot u * page + r holding key
        page_ids[u] * page + r (see :meth:`block_keys`).
    kind: (B|1, H_kv|1, nB, S) int8 per key slot: 0 unused, ALWAYS (read by every row j <= i), WINDOW (read by
        rows with 0 <= i - j < ``window``); or None with ``page_sel``.
    page_sel: (B|1, H_kv|1, nB, C, U) bool, Quest: row slot reads the block's u-th page (key slots
        [u * page, (u + 1) * page)), causally.
    """

    rows: Tensor
    keys: Tensor | None
    kind: Tensor | None = None
    window: int = 0
    page_sel: Tensor | None = None
    page: int = 1
    page_ids: Tensor | None = None

    @property
    def n_slots(self) -> int:
        """S, key slots per block."""
        return self.keys.shape[-1] if self.keys is not None else self.page_ids.shape[-1] * self.page

    def block_keys(self, lo: int = 0, hi: int | None = None) -> Tensor:
        """(B|1, H_kv|1, n, S) long key index of each slot of blocks [lo, hi)."""
        if self.keys is not None:
            return self.keys[..., lo:hi, :]
        pages = self.page_ids[..., lo:hi, :, None]
        return (pages * self.page + torch.arange(self.page, device=pages.device)).flatten(-2)

    def block_vis(self, lo: int = 0, hi: int | None = None) -> Tensor:
        """(B|1, H_kv|1, n, C, S) bool visibility of blocks [lo, hi) (False for unused and duplicate slots)."""
        r = self.rows[lo:hi, :, None]  # (n, C, 1)
        j = self.block_keys(lo, hi)[..., None, :]  # (.., n, 1, S)
        if self.kind is not None:
            return kind_vis(j, self.kind[..., lo:hi, None, :], r, self.window) & (r >= 0)
        return (j <= r) & (r >= 0) & self.page_sel[..., lo:hi, :, :].repeat_interleave(self.page, -1)

    def slot_of_row(self, t: int) -> Tensor:
        """(T,) index into the flattened (nB * C) slots of each row."""
        flat = self.rows.flatten()
        slot = torch.empty(t, dtype=torch.long, device=flat.device)
        real = flat >= 0
        slot[flat[real]] = real.nonzero().flatten()
        return slot

    def counts(self, b: int, hkv: int, t: int) -> Tensor:
        """(B, H_kv, T) number of keys each row reads (the policy's statistics, as from a dense mask)."""
        n = self.block_vis().sum(-1).flatten(-2)  # (B|1, H_kv|1, nB * C)
        return n.index_select(-1, self.slot_of_row(t)).expand(b, hkv, t)

    def dense(self, b: int, hkv: int, t: int) -> Tensor:
        """(B, H_kv, T, T) bool: the same visibility as a dense mask (only where one is needed anyway)."""
        nb, c = self.rows.shape
        s = self.n_slots
        vis = self.block_vis().expand(b, hkv, nb, c, s)
        out = torch.zeros(b, hkv, nb * c, t + 1, dtype=torch.bool, device=vis.device)
        keys = self.block_keys().expand(b, hkv, nb, s)[:, :, :, None].expand(b, hkv, nb, c, s)
        keys = torch.where(vis, keys, t)  # unused slots to the spare column
        out.scatter_(-1, keys.reshape(b, hkv, nb * c, s), True)
        return out[..., :t].index_select(2, self.slot_of_row(t))


def true_indices(mask: Tensor, n: int) -> Tensor:
    """(..., max(n, 1)) long indices of the True entries of ``mask`` (..., T) first (n >= their count per row);
    the rest point at arbitrary False entries, so callers mark them unused with ``mask.gather(-1, idx)``."""
    return mask.to(torch.int8).topk(max(1, min(n, mask.shape[-1])), dim=-1, sorted=False).indices


def window_plan(starts: list[int], t: int, c: int, keep_c: Tensor | None, n_sink: int, window: int, n_keep: int,
                device) -> BlockPlan:
    """The plan of blocks starting at ``starts`` (C rows each) that read ``sinks ∪ window ∪ keep_c[:, :, block]``
    (keep_c (B|1, H_kv|1, nB, T) bool or None), built with :func:`window_block`."""
    parts = [window_block(None if keep_c is None else keep_c[:, :, i], s0, c, n_sink, window, n_keep, t, device)
             for i, s0 in enumerate(starts)]
    return BlockPlan(row_blocks(starts, t, c, device), torch.stack([p[0] for p in parts], 2),
                     torch.stack([p[1] for p in parts], 2), window=window)


def row_blocks(starts: list[int], t: int, c: int, device) -> Tensor:
    """(nB, C) long rows of blocks starting at ``starts`` (each up to the next start or T), -1 padded."""
    bounds = starts[1:] + [t]
    rows = torch.full((len(starts), c), -1, dtype=torch.long, device=device)
    for i, (s0, e) in enumerate(zip(starts, bounds)):
        rows[i, : e - s0] = torch.arange(s0, e, device=device)
    return rows


def block_attend(q: Tensor, k: Tensor, v: Tensor, plan: BlockPlan, max_elems: int = 1 << 20) -> Tensor:
    """(B, H, T, hd) attention of q (B, H, T, hd) over k, v (B, H_kv, T, hd) as ``plan`` shows each row.

    Every (sequence, kv-head, block) is one SDPA batch entry: the g = H / H_kv query heads of the kv-head attend
    as g heads over one gathered key head (GQA), with one (C, S) mask broadcast over them, so nothing is
    expanded g times. Blocks run in groups of at most ``max_elems`` elements (scores plus gathered keys and
    values); with gradients each group is checkpointed (its gathered keys and mask are rebuilt in the backward),
    so the memory kept for the backward is the output and the compact plan, and the temporaries are one group's,
    whatever T is.
    """
    b, h, t, hd = q.shape
    hkv = k.shape[1]
    nb, c = plan.rows.shape
    # Per block: g·C scores per key slot and head, plus the gathered keys and values (2·hd per slot).
    per_block = b * hkv * plan.n_slots * (h // hkv * c + 2 * hd)
    step = max(1, max_elems // max(per_block, 1))
    ys = []
    for i in range(0, nb, step):
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            ys.append(checkpoint(_attend_blocks, q, k, v, plan, i, i + step, use_reentrant=False))
        else:
            ys.append(_attend_blocks(q, k, v, plan, i, i + step))
    y = torch.cat(ys, 2) if len(ys) > 1 else ys[0]  # (B, H, nB * C, hd)
    return y.index_select(2, plan.slot_of_row(t))


def _attend_blocks(q: Tensor, k: Tensor, v: Tensor, plan: BlockPlan, lo: int, hi: int) -> Tensor:
    """(B, H, n * C, hd) outputs of the plan's blocks [lo, hi)."""
    rows, keys, vis = plan.rows[lo:hi], plan.block_keys(lo, hi), plan.block_vis(lo, hi)
    b, h, t, hd = q.shape
    hkv = k.shape[1]
    g = h // hkv
    n, c = rows.shape
    s = keys.shape[-1]
    qb = q.view(b, hkv, g, t, hd)[:, :, :, rows.clamp_min(0).flatten()].view(b, hkv, g, n, c, hd)
    qb = qb.permute(0, 1, 3, 2, 4, 5).reshape(b * hkv * n, g, c, hd)
    idx = keys.clamp_max(t - 1).expand(b, hkv, n, s).reshape(b, hkv, n * s, 1).expand(-1, -1, -1, hd)
    kb = k.gather(2, idx).view(b * hkv * n, 1, s, hd)
    vb = v.gather(2, idx).view(b * hkv * n, 1, s, hd)
    # Padding rows read key slot 0 (any one key keeps their softmax finite; their outputs are dropped).
    pad = (rows < 0)[:, :, None] & (torch.arange(s, device=q.device) == 0)
    mask = (vis | pad).expand(b, hkv, n, c, s).reshape(b * hkv * n, 1, c, s)
    y = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, enable_gqa=g > 1)  # (B·H_kv·n, g, C, hd)
    return y.view(b, hkv, n, g, c, hd).permute(0, 1, 3, 2, 4, 5).reshape(b, h, n * c, hd)


def window_block(keep: Tensor | None, s0: int, c: int, n_sink: int, window: int, n_keep: int, t: int,
                 device) -> tuple[Tensor, Tensor]:
    """Key slots of a block of rows [s0, s0 + c) that read ``sinks ∪ recent window ∪ keep`` (H2O, LRU, LRU+, AdaKV,
    StreamingLLM): row i reads key j <= i when j < n_sink, i - j < window, or keep[j].

    The slots are [sinks (n_sink) | the window range [s0 - window + 1, s0 + c) | the n_keep kept keys before
    that range], S = n_sink + window + c - 1 + n_keep; a key in two parts is read through one of them only.

    Args:
        keep: (B|1, H_kv|1, T) bool kept keys (at most n_keep of them before the window range), or None.
    Returns:
        keys (B|1, H_kv|1, S) long and kind (B|1, H_kv|1, S) int8 (see :class:`BlockPlan`).
    """
    lo = s0 - window + 1  # the first key some row of the block sees through the window
    sink = torch.arange(n_sink, device=device)
    win = torch.arange(lo, s0 + c, device=device)
    win_ok = (win >= n_sink) & (win >= 0) & (win < t)  # sinks are read through their own slots
    winc = win.clamp(0, t - 1)
    sink_kind = torch.where(sink < t, ALWAYS, 0).to(torch.int8)
    sink = sink.clamp_max(t - 1)  # T < n_sink: the missing sinks are unused slots, indices kept in range
    win_kind = torch.where(win_ok, WINDOW, 0).to(torch.int8)
    if keep is None:
        return torch.cat([sink, winc])[None, None], torch.cat([sink_kind, win_kind])[None, None]
    # A kept key still in the window range is read through its window slot, by every row from it on.
    win_kind = torch.where(keep[..., winc] & win_ok, torch.tensor(ALWAYS, dtype=torch.int8, device=device), win_kind)
    before = keep & (torch.arange(keep.shape[-1], device=device) < max(lo, 0))  # kept keys not in the window range
    kidx = true_indices(before, n_keep)  # one spare slot when nothing is kept keeps the shapes simple
    k_kind = torch.where(before.gather(-1, kidx), ALWAYS, 0).to(torch.int8)
    lead = k_kind.shape[:-1]
    keys = torch.cat([sink.expand(*lead, -1), winc.expand(*lead, -1), kidx], -1)
    return keys, torch.cat([sink_kind.expand(*lead, -1), win_kind, k_kind], -1)
