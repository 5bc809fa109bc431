"""Chunk-sequential eviction shared by H2O, LRU and LRU+ (SPEC §4, anchors §2.1/§2.5).

Row i of chunk c (rows [cC, (c+1)C)) reads ``sinks ∪ recent window (i - j < R) ∪ keep_c``. At each
boundary s0 = cC the candidates are ``keep_{c-1}`` plus the keys that leave the recent window during
chunk c (``s0 - R <= j < s0 + C - R``: still in the window of row s0 - 1, gone by row s0 + C - 1);
``keep_c`` is the top ``H`` candidates by the policy's score, computed from the attention rows < s0
(exclusive prefix). Keys that stay in the window for the whole chunk are decided at a later boundary,
so no heavy slot is spent on a key the window shows anyway (with budget = T nothing is ever dropped).
A candidate not kept leaves as soon as it exits the window and never comes back (C3). Budget split:
``s`` sinks, ``R`` recent, ``H`` heavy with s + R + H = budget; C is capped at R so that every key is
a candidate before it leaves the window.

Training scores come from a dense no-grad attention pass (``dense_probs``, run in blocks of whole
chunks of rows and reduced to per-chunk statistics at once, so no (T, T) score tensor per head is held
even at long T): deviation (a) from the published algorithms, whose scores come from attention
renormalised over the kept set (so a row's mass, and for LRU/LRU+ which keys count as "used" by the
threshold / top-m rule, also reflect keys already evicted); decisions every C tokens is deviation (b).
``simulate`` is a token-by-token simulator with real append/evict lists fed by the same dense rows; it
agrees exactly with the parallel mask for the same C (tested). The inference cache runs the same
per-token loop on its own (budgeted) attention, i.e. the real algorithm. Measured agreement of C = 32
with per-token (C = 1) decisions, budget 0.25, T = 256 (IoU of visible sets / identical rows): H2O
0.946 / 29.3%, LRU 0.801 / 23.8%, LRU+ 0.904 / 23.7% (benchmarks/cache_policy_eval.py --agreement).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pikv_train.cache.policies.base import CachePolicy, PolicyCache, causal_mask, dense_probs, top_n_mask

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

    def __init__(self, policy: "ChunkSequentialPolicy", budget: int, device):
        self.policy = policy
        self.s, self.r, self.h, self.c = policy.sizes(budget)
        z = lambda dt: torch.zeros(0, dtype=dt, device=device)  # noqa: E731
        self.pos, self.idx = z(torch.long), z(torch.long)
        self.imp, self.freq, self.last = z(torch.float64), z(torch.float64), z(torch.float64)
        self.keep = z(torch.bool)

    def _select(self, sel: Tensor) -> None:
        for name in ("pos", "idx", "imp", "freq", "last", "keep"):
            setattr(self, name, getattr(self, name)[sel])

    def step(self, t: int, idx: int) -> None:
        """Boundary decision (if t is one), append key t, drop keys row t cannot read (they never return)."""
        if t > 0 and t % self.c == 0:
            cand = (self.pos >= self.s) & (self.pos < t + self.c - self.r)  # keep ∪ keys leaving the window
            sc = self.policy.score(self.imp, self.freq, self.last, self.pos, t, cand).masked_fill(~cand, NEG)
            self.keep = top_n_mask(sc, self.h, self.pos.double()) if self.h > 0 else torch.zeros_like(cand)
        dev = self.pos.device
        self.pos = torch.cat([self.pos, torch.tensor([t], device=dev)])
        self.idx = torch.cat([self.idx, torch.tensor([idx], device=dev)])
        for name, v in (("imp", 0.0), ("freq", 0.0), ("last", float(t))):
            setattr(self, name, torch.cat([getattr(self, name), torch.tensor([v], dtype=torch.float64, device=dev)]))
        self.keep = torch.cat([self.keep, torch.zeros(1, dtype=torch.bool, device=dev)])
        self._select((self.pos < self.s) | (t - self.pos < self.r) | self.keep)

    def accumulate(self, t: int, p: Tensor, used: Tensor) -> None:
        """Row t's attention p over the stored (= visible) keys, and which of them it used."""
        self.imp = self.imp + p.double()
        self.freq = self.freq + used.double()
        self.last = torch.where(used, float(t), self.last)


class SeqCache(PolicyCache):
    """The inference cache: the per-token loop of ``SeqTrack`` on the cache's own attention."""

    def _step(self, layer_idx, h, st, q, k_all, p_all, n_old):
        tr = st.get("track") or SeqTrack(self.policy, self.budget, k_all.device)
        st["track"] = tr
        new = p_all[n_old:].tolist()
        rows = torch.zeros(len(new), len(p_all), dtype=torch.bool, device=k_all.device)
        cfg = self.policy.cfg
        for r, t in enumerate(new):
            tr.step(t, n_old + r)
            kv = k_all[tr.idx].float()  # (S_vis, hd)
            p = (q[:, r].float() @ kv.t() / math.sqrt(kv.shape[-1])).softmax(-1).mean(0)  # (S_vis,)
            tr.accumulate(t, p, used_by_rows(p, cfg.lru_threshold, cfg.lru_top_m))
            rows[r, tr.idx] = True
        keep = torch.zeros(len(p_all), dtype=torch.bool, device=k_all.device)
        keep[tr.idx] = True
        tr.idx = torch.arange(len(tr.idx), device=k_all.device)
        return rows, keep


class ChunkSequentialPolicy(CachePolicy):
    """Base of H2O / LRU / LRU+: parallel chunk-sequential mask, token-by-token simulator, cache."""

    has_sinks = True
    uses_use_signal = True  # LRU / LRU+ need the 'used' statistics (frequency, last use); H2O does not
    cache_cls = SeqCache

    def sizes(self, budget: int) -> tuple[int, int, int, int]:
        """(sinks s, recent R, heavy H, chunk C) for a budget in tokens."""
        cfg = self.cfg
        s = min(cfg.n_sink, budget - 1) if self.has_sinks else 0
        rest = budget - s
        r = min(rest, max(1, round(rest * cfg.recent_ratio / (cfg.heavy_ratio + cfg.recent_ratio))))
        return s, r, rest - r, max(1, min(cfg.chunk_size, r))

    def score(self, imp: Tensor, freq: Tensor, last: Tensor, pos: Tensor, s0: int, cand: Tensor) -> Tensor:
        """Eviction score of candidate keys at boundary s0 (higher = keep), from rows < s0."""
        raise NotImplementedError

    def used(self, a: Tensor) -> Tensor:
        return used_by_rows(a, self.cfg.lru_threshold, self.cfg.lru_top_m)

    def chunk_stats(self, a: Tensor, c: int, row0: int = 0) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Per-chunk statistics of attention rows a (B, H_kv, R, T), rows row0.. (row0 a multiple of C).

        Returns, per chunk of C rows and key (B, H_kv, nC_R, T): the attention mass the key receives
        (float64), and for policies with a use signal how many rows use it and the last using row + 1
        (int64, 0 = none); integer counts and row indices are exact.
        """
        b, hkv, rr, t = a.shape
        n_c = -(-rr // c)
        pad = n_c * c - rr
        used = self.used(a) if self.uses_use_signal else None  # before the upcast: same decisions, cheaper
        a = a.double()
        mass = (torch.nn.functional.pad(a, (0, 0, 0, pad)) if pad else a).view(b, hkv, n_c, c, t).sum(3)
        if used is None:
            return mass, None, None
        used = (torch.nn.functional.pad(used, (0, 0, 0, pad)) if pad else used).view(b, hkv, n_c, c, t)
        srow = torch.arange(row0, row0 + n_c * c, device=a.device).view(n_c, c)[..., None]
        return mass, used.sum(3), torch.where(used, srow + 1, 0).amax(3)

    def stats_from_qk(self, q: Tensor, k: Tensor, c: int, block: int | None = None):
        """``chunk_stats`` of the dense no-grad attention, computed in blocks of whole chunks of rows so
        that no (T, T) score tensor per head is ever held (default: about 4M scores per head and block)."""
        t = q.shape[2]
        block = max(c, ((block or 4 * 2**20 // t) // c) * c)
        parts = [self.chunk_stats(dense_probs(q, k, r0, min(t, r0 + block)), c, r0) for r0 in range(0, t, block)]
        return tuple(None if p[0] is None else torch.cat(p, 2) for p in zip(*parts))

    @torch.no_grad()
    def keep_per_chunk(self, stats, t: int, budget: int) -> tuple[Tensor, tuple]:
        """``chunk_stats`` over all T rows -> keep_c (B, H_kv, nC, T) bool, and the sizes."""
        s, r, h, c = self.sizes(budget)
        mass, uses, last_c = stats
        b, hkv, n_c, _ = mass.shape
        imp = mass.cumsum(2) - mass  # exclusive prefix over chunks: mass from the rows before each chunk
        j = torch.arange(t, device=mass.device)
        if uses is not None:
            freq = (uses.cumsum(2) - uses).double()
            last = torch.cat([torch.zeros_like(last_c[:, :, :1]), last_c.cummax(2).values[:, :, :-1]], 2) - 1
            last = torch.maximum(last.double(), j.double())
        else:  # H2O scores by attention mass alone
            freq = last = imp
        keep = torch.zeros(b, hkv, t, dtype=torch.bool, device=mass.device)
        out = torch.zeros(b, hkv, n_c, t, dtype=torch.bool, device=mass.device)
        for ci in range(1, n_c):
            s0 = ci * c
            cand = (keep | ((j >= s0 - r) & (j < s0 + c - r))) & (j >= s)  # keep ∪ keys leaving the window
            sc = self.score(imp[:, :, ci], freq[:, :, ci], last[:, :, ci], j, s0, cand).masked_fill(~cand, NEG)
            keep = top_n_mask(sc, h, j.double()) if h > 0 else torch.zeros_like(keep)
            out[:, :, ci] = keep
        return out, (s, r, h, c)

    def _mask(self, keep_c: Tensor, sizes: tuple, t: int, device) -> Tensor:
        s, r, _, c = sizes
        i = torch.arange(t, device=device)
        kept = keep_c[:, :, i // c]  # (B, H_kv, T, T)
        return causal_mask(t, device) & ((i[None] < s) | (i[:, None] - i[None] < r) | kept)

    def mask_from_probs(self, a: Tensor, budget: int) -> Tensor:
        """The parallel training mask (B, H_kv, T, T) from dense attention a (B, H_kv, T, T)."""
        t = a.shape[-1]
        keep_c, sizes = self.keep_per_chunk(self.chunk_stats(a, self.sizes(budget)[3]), t, budget)
        return self._mask(keep_c, sizes, t, a.device)

    def mask(self, q, k, ctx, budget):
        t = q.shape[2]
        keep_c, sizes = self.keep_per_chunk(self.stats_from_qk(q, k, self.sizes(budget)[3]), t, budget)
        return self._mask(keep_c, sizes, t, q.device)

    def mask_mod(self, q, k, ctx, budget):
        keep_c, (s, r, _, c) = self.keep_per_chunk(self.stats_from_qk(q, k, self.sizes(budget)[3]), q.shape[2], budget)
        return lambda b, h, qi, ki: (ki < s) | (qi - ki < r) | keep_c[b, h, qi // c, ki]  # T/C x T bits per head

    @torch.no_grad()
    def simulate(self, a: Tensor, budget: int) -> Tensor:
        """Token-by-token reference: real append/evict lists fed by the dense rows of a (B, H_kv, T, T)."""
        b, hkv, t, _ = a.shape
        out = torch.zeros(b, hkv, t, t, dtype=torch.bool)
        used_full = self.used(a)  # in a's own dtype, like chunk_stats (a float32 threshold test can differ)
        for bi in range(b):
            for hi in range(hkv):
                tr = SeqTrack(self, budget, a.device)
                for ti in range(t):
                    tr.step(ti, ti)
                    p = a[bi, hi, ti, tr.pos].double()
                    tr.accumulate(ti, p, used_full[bi, hi, ti, tr.pos])
                    out[bi, hi, ti, tr.pos] = True
        return out
