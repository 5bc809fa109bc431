"""AdaKV (Feng et al., 2024) over SnapKV window scores, re-selected every C tokens.

Per layer the heads share one budget ``H_kv * budget``: a recent/observation window of ``w`` keys per
head (w = min(snap_window, budget // 2)) plus ``H_kv * (budget - w)`` selected keys. AdaKV's safeguard
gives every head at least ``floor(alpha * budget)`` (alpha = 0.2) of its best keys, the window counting
(as in kvpress, where SnapKV's window keys score highest), so each head first reserves its top
``max(0, floor(alpha * budget) - w)`` selected keys and the rest go to the globally best (head, key)
scores. The base scorer is SnapKV: the last w queries before the boundary s0 (rows [s0 - w, s0), so
C1 holds) attend over the stored keys (previous selection + window; softmax over those they can see,
mean over the query heads of the group), summed over the window and max-pooled over key positions
(kernel 7). Candidates: the previous selection plus the keys that leave the window during the coming
chunk (``s0 - w <= j < e - w``, e = min(s0 + C, L) with L the reference length); keys that stay in the window are decided at a later boundary, so
no selected slot is spent on a key the window shows anyway. A key not selected leaves when it exits
the window and never returns.

Exact at chunk boundaries: the inference cache keeps the last w queries and takes the same decision
from the keys it really stores, so decoding equals the masked parallel forward. Heads keep different
numbers of keys (no fake keys: per-head storage).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pikv_train.cache.compression.base import scoring_logits
from pikv_train.cache.policies.base import CachePolicy, PolicyCache, causal_mask, top_n_mask
from pikv_train.cache.policies.blocks import window_plan


def _pool(x, kernel):
    if kernel <= 1:
        return x
    y = F.max_pool1d(x.reshape(-1, 1, x.shape[-1]), kernel, stride=1, padding=kernel // 2)
    return y[..., : x.shape[-1]].reshape(x.shape)


def ada_select(score, floor: int, total: int, tiebreak):
    """score (..., H_kv, S) with -inf outside candidates -> bool keep: per-head floor + global rest."""
    hkv, s = score.shape[-2:]
    head_tb = tiebreak * hkv + torch.arange(hkv, device=score.device, dtype=tiebreak.dtype)[:, None]
    first = top_n_mask(score, floor, head_tb) if floor > 0 else torch.zeros_like(score, dtype=torch.bool)
    left = total - first.flatten(-2).sum(-1, keepdim=True)
    rest = top_n_mask(score.masked_fill(first, float("-inf")).flatten(-2), left, head_tb.expand_as(score).flatten(-2))
    return first | rest.view_as(first)


class AdaKVCache(PolicyCache):
    def new_state(self, layer_idx, h, k):
        st = super().new_state(layer_idx, h, k)
        st.update(keep=torch.zeros(0, dtype=torch.bool, device=k.device), qwin=None)
        return st

    def _step_b(self, layer_idx, states, qb, k_all, p_all, n_old):
        pol = self.policy
        w, hh, c, floor = pol.sizes(self.budget)
        hkv = len(states)
        dev = qb.device
        n_new = qb.shape[2]
        idx = [torch.arange(n, device=dev) for n in n_old]  # stored keys' index into k_all
        keep = [st["keep"] for st in states]
        rows = [torch.zeros(n_new, len(p), dtype=torch.bool, device=dev) for p in p_all]
        for r in range(n_new):
            t = int(p_all[0][n_old[0] + r])
            if t > 0 and pol.is_boundary(t, c, self.ref_len):  # SnapKV scores of the stored keys, AdaKV allocation
                scores = torch.full((hkv, t), float("-inf"), dtype=torch.float64, device=dev)
                for h, st in enumerate(states):
                    pos = p_all[h][idx[h]]
                    qw, qpos = st["qwin"]
                    logits = qw.double() @ k_all[h][idx[h]].double().t() / math.sqrt(qw.shape[-1])  # (g, nw, S)
                    p = logits.masked_fill(pos[None] > qpos[:, None], float("-inf")).softmax(-1).mean(0).sum(0)
                    grid = torch.zeros(t, dtype=torch.float64, device=dev).index_copy(0, pos, p)
                    cand = keep[h] | (pos < pol.chunk_end(t, c, self.ref_len) - w)  # keep ∪ keys leaving the window
                    scores[h, pos[cand]] = _pool(grid[None], pol.cfg.snap_kernel)[0, pos[cand]]
                sel = ada_select(scores, floor, hkv * hh, torch.arange(t, device=dev, dtype=torch.float64))
                keep = [sel[h, p_all[h][idx[h]]] for h in range(hkv)]
            for h, st in enumerate(states):
                idx[h] = torch.cat([idx[h], torch.tensor([n_old[h] + r], device=dev)])
                keep[h] = torch.cat([keep[h], torch.zeros(1, dtype=torch.bool, device=dev)])
                vis = keep[h] | (t - p_all[h][idx[h]] < w)
                idx[h], keep[h] = idx[h][vis], keep[h][vis]
                rows[h][r, idx[h]] = True
                qn = qb[h][:, r: r + 1]  # (g, 1, hd)
                pn = torch.tensor([t], device=dev)
                if st["qwin"] is None:
                    st["qwin"] = (qn, pn)
                else:
                    st["qwin"] = (torch.cat([st["qwin"][0], qn], 1)[:, -w:], torch.cat([st["qwin"][1], pn])[-w:])
        keeps = []
        for h, st in enumerate(states):
            kp = torch.zeros(len(p_all[h]), dtype=torch.bool, device=dev)
            kp[idx[h]] = True
            keeps.append(kp)
            st["keep"] = keep[h]
        return rows, keeps


class AdaKVScheduler(CachePolicy):
    """Adaptive per-head budgets (layer budget shared by heads, floor alpha) with SnapKV scores."""

    cache_cls = AdaKVCache
    scores_by_attention = True

    def held_mask(self, t, ctx):
        return self.held_after_previous_row(ctx)

    def sizes(self, budget: int) -> tuple[int, int, int, int]:
        """(window w, selected per head on average, chunk C, per-head floor)."""
        w = max(1, min(self.cfg.snap_window, budget // 2))
        hh = budget - w
        return w, hh, self.capped_chunk(w), max(0, int(self.cfg.ada_alpha * budget) - w)

    @torch.no_grad()
    def keep_per_chunk(self, q, k, budget, versions=None, dense_keep: bool = True):
        """keep_c (B, H_kv, nC, T) bool, the selection of each chunk (None unless ``dense_keep``), (w, c), and
        the block plan of the keys each chunk's rows read. Scores at boundary s0 use the keys as the cache holds
        them when row s0 arrives (``versions``: a versioned compressor's stored forms at s0).

        The selection is carried as key indices per head (padded to the largest head's count). The window
        rows score only the keys stored at s0 (the window range and the previous selection), and only the
        candidates (the selection plus the keys leaving the window) are pooled and ranked, so the pass costs
        O(T·budget), not O(T²)."""
        b, hkv, t, hd = k.shape
        g = q.shape[1] // hkv
        w, hh, c, floor = self.sizes(budget)
        dev = q.device
        starts = self.chunk_starts(t, c)
        n_c = len(starts)
        qg = q.double().view(b, hkv, g, t, hd)
        kd = k.double()
        j = torch.arange(t, device=dev)
        half = self.cfg.snap_kernel // 2
        taps = torch.arange(self.cfg.snap_kernel, device=dev) - half  # max_pool1d's window around each key
        kidx = torch.zeros(b, hkv, 1, dtype=torch.long, device=dev)  # the selection (any index where unused)
        kval = torch.zeros(b, hkv, 1, dtype=torch.bool, device=dev)
        out = torch.zeros(b, hkv, n_c, t + 1, dtype=torch.bool, device=dev) if dense_keep else None
        kept = [(kidx, kval)]
        for ci in range(1, n_c):
            s0 = starts[ci]
            lo = max(0, s0 - w)
            # Stored at s0: the window range [lo, s0) and the selection (all of it before lo), (B, H_kv, S) slots.
            keys = torch.cat([j[lo:s0].expand(b, hkv, -1), kidx], -1)
            stored = torch.cat([torch.ones(b, hkv, s0 - lo, dtype=torch.bool, device=dev), kval], -1)
            wr = j[lo:s0]
            idx = keys[:, :, None, None].expand(b, hkv, g, len(wr), -1)
            if versions is None:
                kg = kd.gather(2, keys[..., None].expand(-1, -1, -1, hd))[:, :, None]  # (B, H_kv, 1, S, hd)
                logits = qg[:, :, :, lo:s0] @ kg.transpose(-1, -2) / math.sqrt(hd)  # (B, H_kv, g, nw, S)
            else:  # every window row scores the keys as stored at the boundary
                logits = scoring_logits(versions, qg[:, :, :, wr], kd[:, :, None], torch.full_like(wr, s0),
                                        lambda x: x.double()[:, :, None]).gather(-1, idx) / math.sqrt(hd)
            vis = stored[:, :, None, None, :] & (keys[:, :, None, None, :] <= wr[:, None])
            p = logits.masked_fill(~vis, float("-inf")).softmax(-1).mean(2).sum(2)  # (B, H_kv, S)
            grid = torch.zeros(b, hkv, t, dtype=torch.float64, device=dev).scatter_add_(-1, keys, p)
            # Candidates: the selection and the keys leaving the window (disjoint), scored max-pooled.
            cidx = torch.cat([kidx, j[max(s0 - w, 0): max(self.chunk_end(s0, c) - w, 0)].expand(b, hkv, -1)], -1)
            cval = torch.cat([kval, torch.ones(b, hkv, cidx.shape[-1] - kval.shape[-1], dtype=torch.bool,
                                               device=dev)], -1)
            pooled = grid.gather(-1, (cidx[..., None] + taps).clamp(0, t - 1).flatten(-2)).view(*cidx.shape, -1)
            sc = pooled.amax(-1).masked_fill(~cval, float("-inf"))
            sel = ada_select(sc, floor, hkv * hh, cidx.double())
            n_sel = max(1, int(sel.sum(-1).max()))
            pick = sel.to(torch.int8).topk(n_sel, dim=-1).indices  # selected first
            kidx, kval = cidx.gather(-1, pick), sel.gather(-1, pick)
            kept.append((kidx, kval))
            if out is not None:
                out[:, :, ci].scatter_(-1, torch.where(kval, kidx, t), True)
        return (None if out is None else out[..., :t].contiguous()), (w, c), kept

    def block_plan(self, q, k, ctx, budget):
        t = q.shape[2]
        _, (w, c), kept = self.keep_per_chunk(q, k, budget, getattr(ctx, "versions", None), dense_keep=False)
        # Every chunk's selection lies before its rows' window range: [window range | selection] slots.
        n_keep = max(x[0].shape[-1] for x in kept)
        pad = lambda x, v: F.pad(x, (0, n_keep - x.shape[-1]), value=v)  # noqa: E731
        kidx = torch.stack([pad(i, 0) for i, _ in kept], 2)  # (B, H_kv, nC, n_keep)
        kval = torch.stack([pad(v, False) for _, v in kept], 2)
        return window_plan(self.chunk_starts(t, c), t, c, 0, w, q.device, kept=(kidx, kval))

    def mask(self, q, k, ctx, budget):
        t = q.shape[2]
        keep_c, (w, c), _ = self.keep_per_chunk(q, k, budget, getattr(ctx, "versions", None))
        i = torch.arange(t, device=q.device)
        return causal_mask(t, q.device) & ((i[:, None] - i[None] < w) | keep_c[:, :, self.row_chunks(t, c, q.device)])

    def mask_mod(self, q, k, ctx, budget):
        keep_c, (w, c), _ = self.keep_per_chunk(q, k, budget, getattr(ctx, "versions", None))
        rc = self.row_chunks(q.shape[2], c, q.device)
        return lambda b, h, qi, ki: (qi - ki < w) | keep_c[b, h, rc[qi], ki]
