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

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint


ALWAYS, WINDOW = 1, 2  # key-slot kinds: read by every row at or after the key; read while row - key < window


def kind_vis(j: Tensor, kind: Tensor, i: Tensor, window: int) -> Tensor:
    """Whether row i reads key slot j of the given kind (broadcasting): 0 <= i - j < limit, the limit being the
    window for WINDOW slots, any distance for ALWAYS ones and none for unused ones (a lookup by kind); rows -1
    (padding) read nothing."""
    d = i - j
    return (d >= 0) & (d < _limits(window, j.device)[kind.long()])


@functools.lru_cache(maxsize=64)
def _limits(window: int, device: torch.device) -> Tensor:
    """Reading distance limit by slot kind (unused, ALWAYS, WINDOW), made once per device (no copy per call)."""
    return torch.tensor([0, 1 << 62, window], dtype=torch.long, device=device)


@dataclass
class BlockPlan:
    """Which keys each block of query rows reads, stored compactly (the plans of every layer stay alive until
    the backward, so nothing of size (T, S) is kept: visibility is rebuilt per group of blocks).

    rows: (nB, C) long, the row of each block slot (-1: padding, when a block is shorter than C).
    keys: (B|1, H_kv|1, nB, S) int32 (stored; given as any integer type), the key index of each key slot (any
        index where unused; >= T is never read); or None with ``page_ids`` (Quest): (B, H_kv, nB, U) int32 pages,
        slot u * page + r holding key page_ids[u] * page + r (see :meth:`block_keys`).
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

    def __post_init__(self):
        # Every layer's plan lives until the backward: int32 halves it (indices are widened per group of blocks).
        if self.keys is not None:
            self.keys = self.keys.to(torch.int32)
        if self.page_ids is not None:
            self.page_ids = self.page_ids.to(torch.int32)

    @property
    def n_slots(self) -> int:
        """S, key slots per block."""
        return self.keys.shape[-1] if self.keys is not None else self.page_ids.shape[-1] * self.page

    def block_keys(self, lo: int = 0, hi: int | None = None) -> Tensor:
        """(B|1, H_kv|1, n, S) long key index of each slot of blocks [lo, hi)."""
        if self.keys is not None:
            return self.keys[..., lo:hi, :].long()
        pages = self.page_ids[..., lo:hi, :, None].long()
        return (pages * self.page + torch.arange(self.page, device=pages.device)).flatten(-2)

    def block_vis(self, lo: int = 0, hi: int | None = None) -> Tensor:
        """(B|1, H_kv|1, n, C, S) bool visibility of blocks [lo, hi) (False for unused and duplicate slots)."""
        r = self.rows[lo:hi, :, None]  # (n, C, 1)
        j = self.block_keys(lo, hi)[..., None, :]  # (.., n, 1, S)
        if self.kind is not None:
            return kind_vis(j, self.kind[..., lo:hi, None, :], r, self.window)
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
        nb, c = self.rows.shape
        lead = (self.keys if self.keys is not None else self.page_ids).shape[:2]
        step = max(1, (1 << 20) // (c * self.n_slots * lead.numel()))  # blocks at a time: bounded temporaries
        n = torch.cat([self.block_vis(i, i + step).sum(-1) for i in range(0, nb, step)], -2)  # (.., nB, C)
        return n.flatten(-2).index_select(-1, self.slot_of_row(t)).expand(b, hkv, t)

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


def window_plan(starts: list[int], t: int, c: int, n_sink: int, window: int, device,
                kept: tuple[Tensor, Tensor] | None = None) -> BlockPlan:
    """The plan of blocks starting at ``starts`` (C rows each) that read ``sinks ∪ window ∪ kept keys``, the kept
    keys of each block given as ``kept`` = (indices, valid) (B, H_kv, nB, n) long and bool, or none.

    Slots per block: [sinks (n_sink) | the window range [s0 - window + 1, s0 + C) | the kept slots],
    S = n_sink + window + C - 1 + n; a kept key inside the window range is read through its window slot
    (turned ALWAYS: every row from the key on reads it). All blocks at once."""
    s0 = torch.tensor(starts, device=device)
    sink_k, sink_kind, win_k, win_kind = window_slots(s0, c, n_sink, window, t)
    rows = row_blocks(starts, t, c, device)
    if kept is None:
        return BlockPlan(rows, torch.cat([sink_k, win_k], -1)[None, None],
                         torch.cat([sink_kind, win_kind], -1)[None, None], window=window)
    kidx, kval = kept
    lead = kidx.shape[:2]
    win_kind, k_kind = mark_kept(win_kind.expand(*lead, -1, -1), kidx, kval, (s0 - window + 1)[:, None])
    # Kept slots that stay used first, and as many as the fullest block needs.
    pick = k_kind.topk(max(1, int((k_kind > 0).sum(-1).max())), dim=-1).indices
    kidx, k_kind = kidx.gather(-1, pick), k_kind.gather(-1, pick)
    nb = len(starts)
    keys = torch.cat([sink_k.expand(*lead, nb, -1), win_k.expand(*lead, nb, -1), kidx], -1)
    return BlockPlan(rows, keys, torch.cat([sink_kind.expand(*lead, nb, -1), win_kind, k_kind], -1), window=window)


def mark_kept(win_kind: Tensor, kidx: Tensor, kval: Tensor, lo: Tensor | int) -> tuple[Tensor, Tensor]:
    """Kinds of window-range slots (..., W) and of kept slots (..., n) given the kept keys ``kidx`` (..., n)
    (``kval``: which are kept; ``lo``: the first window-range key, broadcasting). A kept key on a used
    window-range slot turns that slot ALWAYS and leaves its kept slot unused; the others are ALWAYS kept slots."""
    n_win = win_kind.shape[-1]
    spare = torch.cat([win_kind, win_kind.new_zeros(*win_kind.shape[:-1], 1)], -1)  # column W: spare, dropped
    spare = spare.expand(*kidx.shape[:-1], -1).clone()
    at = torch.where(kval & (kidx >= lo) & (kidx - lo < n_win), kidx - lo, n_win)
    in_win = spare.gather(-1, at) > 0  # on a used window slot (never a sink's or one outside [0, T))
    spare.scatter_(-1, torch.where(in_win, at, n_win), ALWAYS)
    return spare[..., :n_win], (kval & ~in_win).to(torch.int8)  # ALWAYS == 1


def window_slots(s0: Tensor, c: int, n_sink: int, window: int, t: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sink and window-range slots of blocks of rows [s0, s0 + c) (s0 (nB,) long): keys (nB, n_sink) and
    (nB, window + c - 1) long (clamped into [0, T)) with their kinds (int8: ALWAYS for sinks, WINDOW for window
    keys past the sinks, 0 for slots outside [0, T), and for sinks when T < n_sink)."""
    dev = s0.device
    sink = torch.arange(n_sink, device=dev).expand(len(s0), -1)
    win = (s0 - window + 1)[:, None] + torch.arange(window + c - 1, device=dev)
    win_ok = (win >= n_sink) & (win >= 0) & (win < t)  # sinks are read through their own slots
    sink_kind = torch.where(sink < t, ALWAYS, 0).to(torch.int8)
    win_kind = torch.where(win_ok, WINDOW, 0).to(torch.int8)
    return sink.clamp_max(t - 1), sink_kind, win.clamp(0, t - 1), win_kind


def row_blocks(starts: list[int], t: int, c: int, device) -> Tensor:
    """(nB, C) long rows of blocks starting at ``starts`` (each up to the next start or T), -1 padded."""
    bounds = starts[1:] + [t]
    rows = torch.full((len(starts), c), -1, dtype=torch.long, device=device)
    for i, (s0, e) in enumerate(zip(starts, bounds)):
        rows[i, : e - s0] = torch.arange(s0, e, device=device)
    return rows


def block_attend(q: Tensor, k: Tensor, v: Tensor, plan: BlockPlan, max_elems: int = 1 << 18) -> Tensor:
    """(B, H, T, hd) attention of q (B, H, T, hd) over k, v (B, H_kv, T, hd) as ``plan`` shows each row.

    Every (sequence, kv-head, block) is one SDPA batch entry: the g = H / H_kv query heads of the kv-head attend
    as g heads over one gathered key head (GQA), with one (C, S) mask broadcast over them, so nothing is
    expanded g times. Blocks run in groups of at most ``max_elems`` elements (scores plus gathered keys and
    values), so the temporaries are one group's, whatever T is. With gradients nothing gathered is kept for the
    backward: on CPU all groups are one autograd node over the flash kernel that keeps each group's output and
    log-sum-exp and gathers its keys, values and mask again in the backward (no second forward, gradients
    allocated once); elsewhere each group is checkpointed (recomputed in the backward).
    """
    b, h, t, hd = q.shape
    hkv = k.shape[1]
    nb, c = plan.rows.shape
    # Per block: g·C scores per key slot and head, plus the gathered keys and values (2·hd per slot).
    per_block = b * hkv * plan.n_slots * (h // hkv * c + 2 * hd)
    step = max(1, max_elems // max(per_block, 1))
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    # The gathers index flattened (B·H_kv·T, hd) keys and values: one copy here if they are strided (v comes
    # from a permuted projection), not one per group.
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    groups = [(i, min(i + step, nb)) for i in range(0, nb, step)]
    if grad and _cpu_flash(q):
        y = _BlockFlash.apply(q, k, v, plan, groups)
    else:
        ys = [checkpoint(_attend_blocks, q, k, v, plan, lo, hi, use_reentrant=False) if grad
              else _attend_blocks(q, k, v, plan, lo, hi) for lo, hi in groups]
        y = torch.cat(ys, 2) if len(ys) > 1 else ys[0]  # (B, H, nB * C, hd)
    return y.index_select(2, plan.slot_of_row(t))


def _cpu_flash(q: Tensor) -> bool:
    return q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64) and hasattr(
        torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")


def _gather_blocks(q: Tensor, k: Tensor, v: Tensor, plan: BlockPlan, lo: int, hi: int):
    """Blocks [lo, hi) as one SDPA batch: q (N, g, C, hd), k and v (N, 1, S, hd) with N = B·H_kv·n, the
    additive float mask (N, 1, C, S) (0 where read, -inf elsewhere), and the flat row and key indices
    (into q viewed (B·H_kv, g, T, hd) rows and k viewed (B·H_kv·T, hd)) the backward scatters through."""
    rows, keys, vis = plan.rows[lo:hi], plan.block_keys(lo, hi), plan.block_vis(lo, hi)
    b, h, t, hd = q.shape
    hkv = k.shape[1]
    g = h // hkv
    n, c = rows.shape
    s = keys.shape[-1]
    ridx = rows.clamp_min(0).flatten()  # (n·C,) padding rows read row 0 (their outputs are dropped)
    qb = q.view(b, hkv, g, t, hd).index_select(3, ridx).view(b, hkv, g, n, c, hd)
    qb = qb.permute(0, 1, 3, 2, 4, 5).reshape(b * hkv * n, g, c, hd)
    base = (torch.arange(b * hkv, device=q.device) * t).view(b, hkv, 1, 1)
    kidx = (keys.clamp_max(t - 1) + base).flatten()  # (B·H_kv·n·S,) into the flattened keys
    kb = k.reshape(b * hkv * t, hd).index_select(0, kidx).view(b * hkv * n, 1, s, hd)
    vb = v.reshape(b * hkv * t, hd).index_select(0, kidx).view(b * hkv * n, 1, s, hd)
    mask = torch.where(vis, q.new_zeros(()), q.new_full((), float("-inf")))
    pad = (rows < 0).nonzero()
    if len(pad):  # padding rows read key slot 0: any one key keeps their softmax finite (outputs dropped)
        mask[..., pad[:, 0], pad[:, 1], 0] = 0.0
    mask = mask.expand(b, hkv, n, c, s).reshape(b * hkv * n, 1, c, s)
    return qb, kb, vb, mask, ridx, kidx


def _attend_blocks(q: Tensor, k: Tensor, v: Tensor, plan: BlockPlan, lo: int, hi: int) -> Tensor:
    """(B, H, n * C, hd) outputs of the plan's blocks [lo, hi)."""
    qb, kb, vb, mask, _, _ = _gather_blocks(q, k, v, plan, lo, hi)
    return _ungroup(F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, enable_gqa=qb.shape[1] > 1), q, k)


def _ungroup(y: Tensor, q: Tensor, k: Tensor) -> Tensor:
    """(B·H_kv·n, g, C, hd) -> (B, H, n·C, hd)."""
    b, h, _, hd = q.shape
    hkv = k.shape[1]
    nbh, g, c, _ = y.shape
    n = nbh // (b * hkv)
    return y.view(b, hkv, n, g, c, hd).permute(0, 1, 3, 2, 4, 5).reshape(b, h, n * c, hd)


class _BlockFlash(torch.autograd.Function):
    """All groups of blocks through the CPU flash kernel, as one autograd node: the forward keeps each group's
    output and log-sum-exp; the backward gathers each group's keys, values and mask again (memory O(output),
    one forward) and accumulates into one gradient per input, so the backward allocates q, k and v's
    gradients once, not once per group."""

    @staticmethod
    def forward(ctx, q, k, v, plan, groups):
        outs, lses, ys = [], [], []
        for lo, hi in groups:
            qb, kb, vb, mask, _, _ = _gather_blocks(q, k, v, plan, lo, hi)
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qb, kb, vb, 0.0, False,
                                                                                    attn_mask=mask)
            outs.append(out)
            lses.append(lse)
            ys.append(_ungroup(out, q, k))
        ctx.save_for_backward(q, k, v)
        ctx.plan, ctx.groups, ctx.outs, ctx.lses = plan, groups, outs, lses
        return torch.cat(ys, 2) if len(ys) > 1 else ys[0]  # (B, H, nB * C, hd)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        q, k, v = ctx.saved_tensors
        b, h, t, hd = q.shape
        hkv = k.shape[1]
        g = h // hkv
        dq = torch.zeros(b, hkv, g, t, hd, dtype=q.dtype, device=q.device)
        dk = torch.zeros(b * hkv * t, hd, dtype=k.dtype, device=k.device)
        dv = torch.zeros_like(dk)
        c = ctx.plan.rows.shape[1]
        for (lo, hi), out, lse in zip(ctx.groups, ctx.outs, ctx.lses):
            qb, kb, vb, mask, ridx, kidx = _gather_blocks(q, k, v, ctx.plan, lo, hi)
            n = hi - lo
            go = gy[:, :, lo * c: hi * c].reshape(b, hkv, g, n, c, hd).permute(0, 1, 3, 2, 4, 5)
            gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                go.reshape(b * hkv * n, g, c, hd), qb, kb, vb, out, lse, 0.0, False, attn_mask=mask)
            # Back through the gathers (padding rows' gradients are zero: their outputs were dropped).
            dq.index_add_(3, ridx, gq.view(b, hkv, n, g, c, hd).permute(0, 1, 3, 2, 4, 5).reshape(b, hkv, g, n * c, hd))
            dk.index_add_(0, kidx, gk.reshape(-1, hd))
            dv.index_add_(0, kidx, gv.reshape(-1, hd))
        ctx.outs = ctx.lses = None
        return dq.view_as(q), dk.view_as(k), dv.view_as(v), None, None


def window_block_kept(slots: tuple[Tensor, Tensor, Tensor, Tensor], kidx: Tensor, kval: Tensor, lo: int
                      ) -> tuple[Tensor, Tensor]:
    """One block's keys and kinds in :func:`window_plan`'s layout, its kept keys given as indices (H2O, LRU, LRU+).

    Args:
        slots: the block's row of :func:`window_slots` (sink keys, sink kinds, window keys, window kinds).
        kidx: (B, H_kv, n_keep) long kept keys, any index where unused; kval: (B, H_kv, n_keep) bool which are
            kept. Kept keys lie before s0 + C, outside the sinks.
        lo: the block's first window-range key, s0 - window + 1.
    """
    sink, sink_kind, winc, win_kind = slots
    b, hkv, _ = kidx.shape
    win_kind, k_kind = mark_kept(win_kind, kidx, kval, lo)
    keys = torch.cat([sink.expand(b, hkv, -1), winc.expand(b, hkv, -1), kidx], -1)
    return keys, torch.cat([sink_kind.expand(b, hkv, -1), win_kind, k_kind], -1)
