"""Chunk-sequential eviction shared by H2O, LRU and LRU+ (SPEC §4, §7, anchors §2.1/§2.5).

Rows are cut into chunks at boundaries: the multiples of C below the fixed reference length L, then L and
L + multiples of C (L is a boundary, so a budget of L drops nothing whatever C is). Row i of chunk c
(rows [s0, e)) reads ``sinks ∪ recent window (i - j < R) ∪ keep_c``. At each boundary s0 the candidates
are ``keep_{c-1}`` plus the keys that leave the recent window during chunk c (``s0 - R <= j < e - R``:
still in the window of row s0 - 1, gone by row e - 1); ``keep_c`` is the top ``H`` candidates by the
policy's score.
Keys that stay in the window for the whole chunk are decided at a later boundary, so no heavy slot is
spent on a key the window shows anyway (with budget = L nothing is ever dropped). A candidate not kept
leaves as soon as it exits the window and never comes back (C3). Budget split: ``s`` sinks, ``R``
recent, ``H`` heavy with s + R + H = budget; C is capped at R so that every key is a candidate before it
leaves the window.

Scores are exactly what the deployed cache computes (SPEC §7): each row's attention over the keys it
can still see, renormalised over them (and over what expert sharding lets it read, ``ctx.prior_mask``),
accumulated over the rows before the boundary. The training pass is a no-grad chunk-sequential loop:
chunk c's rows attend under the visibility fixed at its boundary, their probabilities update the
statistics, then the next boundary decides. ``chunk_size: 1`` is the published per-token H2O / LRU;
C > 1 takes the same decisions every C tokens (the one deviation, a knob). The inference cache
(``SeqCache``) runs the same rule token by token on the keys it really holds; both score in float64, so
token-by-token decoding equals the training forward (tests/cache/test_contract.py). The two sum in different
orders, so they agree to float64 rounding, not bit for bit: two keys with exactly equal vectors (which RoPE makes
practically impossible at distinct positions) can receive probabilities that differ in the last bit and be ranked
differently by the two.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pikv_train.cache.compression.base import scoring_logits
from pikv_train.cache.policies.base import CachePolicy, PolicyCache, causal_mask, top_n_mask
from pikv_train.cache.policies.blocks import (BlockPlan, kind_vis, row_blocks, true_indices, window_block_kept,
                                              window_slots)

NEG = float("-inf")


def used_by_rows(p: Tensor, tau: float, top_m: int) -> Tensor:
    """(..., S) probabilities of one or more query rows -> bool 'used' (p >= tau or in the row's top-m)."""
    used = p >= tau
    if top_m > 0:
        kth = p.topk(min(top_m, p.shape[-1]), dim=-1).values[..., -1:]
        used |= (p >= kth) & (p > 0)
    return used


class SeqTrack:
    """Append/evict lists of one (sequence, kv-head): positions and per-key statistics."""

    def __init__(self, policy: "ChunkSequentialPolicy", budget: int, device, ref_len: int | None = None):
        self.policy, self.ref_len = policy, ref_len
        self.s, self.r, self.h, self.c = policy.sizes(budget)
        z = lambda dt: torch.zeros(0, dtype=dt, device=device)  # noqa: E731
        self.pos, self.idx = z(torch.long), z(torch.long)
        self.imp = z(torch.float64)
        # Frequency and last use only for the policies that score by them (LRU, LRU+), not H2O.
        self.stats = ("imp", "freq", "last") if policy.uses_use_signal else ("imp",)
        self.freq = self.last = None
        if policy.uses_use_signal:
            self.freq, self.last = z(torch.float64), z(torch.float64)
        self.keep = z(torch.bool)

    def _select(self, sel: Tensor) -> None:
        for name in ("pos", "idx", "keep") + self.stats:
            setattr(self, name, getattr(self, name)[sel])

    def step(self, t: int, idx: int) -> None:
        """Boundary decision (if t is one), append key t, drop keys row t cannot read (they never return)."""
        if t > 0 and self.policy.is_boundary(t, self.c, self.ref_len):
            end = self.policy.chunk_end(t, self.c, self.ref_len)
            cand = (self.pos >= self.s) & (self.pos < end - self.r)  # keep ∪ keys leaving the window
            sc = self.policy.score(self.imp, self.freq, self.last, self.pos, t, cand).masked_fill(~cand, NEG)
            self.keep = top_n_mask(sc, self.h, self.pos.double()) if self.h > 0 else torch.zeros_like(cand)
        dev = self.pos.device
        self.pos = torch.cat([self.pos, torch.tensor([t], device=dev)])
        self.idx = torch.cat([self.idx, torch.tensor([idx], device=dev)])
        for name, v in (("imp", 0.0), ("freq", 0.0), ("last", float(t)))[: len(self.stats)]:
            setattr(self, name, torch.cat([getattr(self, name), torch.tensor([v], dtype=torch.float64, device=dev)]))
        self.keep = torch.cat([self.keep, torch.zeros(1, dtype=torch.bool, device=dev)])
        self._select((self.pos < self.s) | (t - self.pos < self.r) | self.keep)

    def accumulate(self, t: int, p: Tensor, used: Tensor) -> None:
        """Row t's attention p over the stored (= visible) keys, and which of them it used."""
        self.imp = self.imp + p.double()
        if self.freq is not None:
            self.freq = self.freq + used.double()
            self.last = torch.where(used, float(t), self.last)


class SeqCache(PolicyCache):
    """The inference cache: the per-token loop of ``SeqTrack`` on the cache's own attention (float64,
    over the kept keys the sharding rule shows the query, as in the training pass)."""

    def _step(self, layer_idx, h, st, q, k_all, p_all, n_old):
        tr = st.get("track") or SeqTrack(self.policy, self.budget, k_all.device, self.ref_len)
        st["track"] = tr
        new = p_all[n_old:].tolist()
        allow = None if self.allow is None else self.allow[h]  # (Tr, S) sharding visibility
        rows = torch.zeros(len(new), len(p_all), dtype=torch.bool, device=k_all.device)
        cfg = self.policy.cfg
        for r, t in enumerate(new):
            tr.step(t, n_old + r)
            vis = torch.ones(len(tr.idx), dtype=torch.bool, device=k_all.device) if allow is None else allow[r, tr.idx]
            logits = (q[:, r].double() / math.sqrt(k_all.shape[-1])) @ k_all[tr.idx].double().t()  # (g, S_vis)
            p = logits.masked_fill(~vis, NEG).softmax(-1).mean(0)  # (S_vis,)
            used = used_by_rows(p, cfg.lru_threshold, cfg.lru_top_m) & vis if tr.freq is not None else None
            tr.accumulate(t, p, used)
            rows[r, tr.idx[vis]] = True
        keep = torch.zeros(len(p_all), dtype=torch.bool, device=k_all.device)
        keep[tr.idx] = True
        tr.idx = torch.arange(len(tr.idx), device=k_all.device)
        return rows, keep


class ChunkSequentialPolicy(CachePolicy):
    """Base of H2O / LRU / LRU+: the chunk-sequential training pass and the token-by-token cache."""

    has_sinks = True
    uses_use_signal = True  # LRU / LRU+ need the 'used' statistics (frequency, last use); H2O does not
    scores_by_attention = True

    def held_mask(self, t, ctx):
        return self.held_after_previous_row(ctx)
    cache_cls = SeqCache

    def sizes(self, budget: int) -> tuple[int, int, int, int]:
        """(sinks s, recent R, heavy H, chunk C) for a budget in tokens."""
        cfg = self.cfg
        s = min(cfg.n_sink, budget - 1) if self.has_sinks else 0
        rest = budget - s
        r = min(rest, max(1, round(rest * cfg.recent_ratio / (cfg.heavy_ratio + cfg.recent_ratio))))
        return s, r, rest - r, self.capped_chunk(r)

    def score(self, imp: Tensor, freq: Tensor, last: Tensor, pos: Tensor, s0: int, cand: Tensor) -> Tensor:
        """Eviction score of candidate keys at boundary s0 (higher = keep), from rows < s0."""
        raise NotImplementedError

    def used(self, a: Tensor) -> Tensor:
        return used_by_rows(a, self.cfg.lru_threshold, self.cfg.lru_top_m)

    @torch.no_grad()
    def keep_per_chunk(self, q: Tensor, k: Tensor, budget: int, prior: Tensor | None = None,
                       versions=None, dense_keep: bool = True) -> tuple[Tensor | None, tuple, BlockPlan]:
        """The chunk-sequential pass (module docstring): keep_c (B, H_kv, nC, T) bool (None unless
        ``dense_keep``), the sizes, and the block plan of the keys each chunk's rows read (blocks.py).

        Each chunk's rows score over exactly the keys they can read, gathered to S = s + R + C - 1 + H slots
        (sinks, the recent-window range, the kept keys), so the pass costs O(T·budget), not O(T²); the same
        gathering is the plan the block-sparse attention then runs with gradients. The kept set is carried as
        H indices, and each boundary ranks only its H + C candidates (the kept keys and the keys leaving the
        window), so no step touches all T keys but the statistics' scatter.

        Args:
            q: (B, H, T, hd) rotated queries; k: (B, H_kv, T, hd) rotated keys.
            prior: (B|1, 1|H_kv, T, T) bool what other hooks let each row read (expert sharding), or None.
            versions: a versioned compressor's stored forms (rows score over the keys as they read them).
        """
        b, h, t, hd = q.shape
        hkv, g = k.shape[1], h // k.shape[1]
        s, r, hh, c = self.sizes(budget)
        dev = q.device
        # (B, H_kv, T, g, hd): a chunk's rows of all g query heads are one contiguous (n·g, hd) matrix. Chunks
        # are turned float64 one at a time (no float64 copy of q or k lives through the pass).
        qt = q.view(b, hkv, g, t, hd).transpose(2, 3).contiguous()
        kd = None if versions is None else k.double()
        j = torch.arange(t, device=dev)
        starts = self.chunk_starts(t, c)
        n_c = len(starts)
        n_keep = max(hh, 1)  # one unused slot when nothing is kept keeps the shapes simple
        kidx = torch.zeros(b, hkv, n_keep, dtype=torch.long, device=dev)  # the kept keys (any index where unused)
        kval = torch.zeros(b, hkv, n_keep, dtype=torch.bool, device=dev)
        out = torch.zeros(b, hkv, n_c, t + 1, dtype=torch.bool, device=dev) if dense_keep else None
        imp = torch.zeros(b, hkv, t, dtype=torch.float64, device=dev)
        freq = torch.zeros_like(imp)
        last = j.double().expand(b, hkv, t).clone()  # last use; a key counts as used when appended
        keys_c, kind_c = [], []
        slots = window_slots(torch.tensor(starts, device=dev), c, s, r, t)  # sinks and window ranges, all chunks
        for ci, s0 in enumerate(starts):
            e = starts[ci + 1] if ci + 1 < n_c else t
            if ci > 0:
                # Candidates: the kept keys and the keys leaving the window (disjoint: kept keys left it before).
                leave = j[max(s0 - r, s): max(self.chunk_end(s0, c) - r, s)]
                cidx = torch.cat([kidx, leave.expand(b, hkv, -1)], -1)  # (B, H_kv, H + n_leave)
                cval = torch.cat([kval, torch.ones(b, hkv, len(leave), dtype=torch.bool, device=dev)], -1)
                if hh > 0:
                    sc = self.score(imp.gather(-1, cidx), freq.gather(-1, cidx), last.gather(-1, cidx), cidx, s0, cval)
                    sel = top_n_mask(sc.masked_fill(~cval, NEG), hh, cidx.double())
                    pick = true_indices(sel, n_keep)
                    kidx, kval = cidx.gather(-1, pick), sel.gather(-1, pick)
                if out is not None:
                    out[:, :, ci].scatter_(-1, torch.where(kval, kidx, t), True)
            # The keys rows [s0, e) can read: (B, H_kv, S) slots, (B, H_kv, n, S) visibility.
            keys, kind = window_block_kept([x[ci] for x in slots], kidx, kval, s0 - r + 1)
            keys_c.append(keys)
            kind_c.append(kind)
            n = e - s0
            rows = j[s0:e]
            vis = kind_vis(keys[:, :, None], kind[:, :, None], rows[:, None], r)  # (B, H_kv, n, S)
            if prior is not None:
                pr = prior[..., s0:e, :].expand(b, hkv, n, t)
                vis = vis & pr.gather(-1, keys[:, :, None].expand(b, hkv, n, -1))
            if versions is None:
                kg = k.gather(2, keys[..., None].expand(-1, -1, -1, hd)).double()  # (B, H_kv, S, hd)
                qc = qt[:, :, s0:e].reshape(b, hkv, n * g, hd).double() / math.sqrt(hd)
                logits = (qc @ kg.transpose(-1, -2)).view(b, hkv, n, g, -1)
            else:  # the keys as each row reads them (stored forms), then the same slots
                idx = keys[:, :, None, None].expand(b, hkv, g, n, -1)  # (B, H_kv, g, n, S)
                logits = scoring_logits(versions, qt[:, :, s0:e].transpose(2, 3).double() / math.sqrt(hd), kd[:, :, None], rows,
                                        lambda x: x.double()[:, :, None]).gather(-1, idx).transpose(2, 3)
            p = logits.masked_fill(~vis[:, :, :, None], NEG).softmax(-1).mean(3)  # (B, H_kv, n, S)
            imp.scatter_add_(-1, keys, p.sum(2))
            if self.uses_use_signal:
                used = self.used(p) & vis  # (B, H_kv, n, S)
                freq.scatter_add_(-1, keys, used.sum(2).double())
                last.scatter_reduce_(-1, keys, torch.where(used, rows[:, None].double(), -1.0).amax(2), "amax")
        plan = BlockPlan(row_blocks(starts, t, c, dev), torch.stack(keys_c, 2), torch.stack(kind_c, 2), window=r)
        return (None if out is None else out[..., :t].contiguous()), (s, r, hh, c), plan

    def block_plan(self, q, k, ctx, budget):
        return self.keep_per_chunk(q, k, budget, dense_keep=False)[2]

    def _mask(self, keep_c: Tensor, sizes: tuple, t: int, device) -> Tensor:
        s, r, _, c = sizes
        i = torch.arange(t, device=device)
        kept = keep_c[:, :, self.row_chunks(t, c, device)]  # (B, H_kv, T, T)
        return causal_mask(t, device) & ((i[None] < s) | (i[:, None] - i[None] < r) | kept)

    def mask(self, q, k, ctx, budget):
        keep_c, sizes, _ = self.keep_per_chunk(q, k, budget, getattr(ctx, "prior_mask", None), getattr(ctx, "versions", None))
        return self._mask(keep_c, sizes, q.shape[2], q.device)

    def mask_mod(self, q, k, ctx, budget):
        keep_c, (s, r, _, c), _ = self.keep_per_chunk(q, k, budget, getattr(ctx, "prior_mask", None),
                                                   getattr(ctx, "versions", None))
        rc = self.row_chunks(q.shape[2], c, q.device)
        return lambda b, h, qi, ki: (ki < s) | (qi - ki < r) | keep_c[b, h, rc[qi], ki]  # T/C x T bits per head
