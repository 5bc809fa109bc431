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

Training scores come from a dense no-grad attention pass (``dense_probs``): deviation (a) from the
published algorithms, whose scores come from attention renormalised over the kept set (so a row's mass,
and for LRU/LRU+ which keys count as "used" by the threshold / top-m rule, also reflect keys already
evicted); decisions every C tokens is deviation (b). ``simulate`` is a token-by-token simulator with real append/evict lists fed
by the same dense rows; it agrees exactly with the parallel mask for the same C (tested). The
inference cache runs the same per-token loop on its own (budgeted) attention, i.e. the real algorithm.
Measured agreement of C = 32 with per-token (C = 1) decisions, budget 0.25, T = 256 (IoU of visible sets /
identical rows): H2O 0.946 / 29.3%, LRU 0.801 / 23.8%, LRU+ 0.904 / 23.7% (benchmarks/cache_policy_eval.py
--agreement).
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

    @torch.no_grad()
    def keep_per_chunk(self, a: Tensor, budget: int) -> tuple[Tensor, tuple]:
        """a (B, H_kv, T, T) dense causal attention -> keep_c (B, H_kv, nC, T) bool, and the sizes."""
        b, hkv, t, _ = a.shape
        s, r, h, c = self.sizes(budget)
        n_c = -(-t // c)
        used = self.used(a) if self.uses_use_signal else None  # before the upcast: same decisions, cheaper
        a = a.double()
        pad = n_c * c - t
        rows = (torch.nn.functional.pad(a, (0, 0, 0, pad)) if pad else a).view(b, hkv, n_c, c, t)
        per_chunk = rows.sum(3)  # (B, H_kv, nC, T) attention each key receives from each chunk's rows
        imp = per_chunk.cumsum(2) - per_chunk  # exclusive prefix over chunks
        j = torch.arange(t, device=a.device)
        if self.uses_use_signal:  # integer counts and row indices: exact, no (T, T) float64 copies
            used = (torch.nn.functional.pad(used, (0, 0, 0, pad)) if pad else used).view(b, hkv, n_c, c, t)
            uses = used.sum(3)  # (B, H_kv, nC, T) uses of each key by each chunk's rows
            freq = (uses.cumsum(2) - uses).double()
            srow = torch.arange(n_c * c, device=a.device).view(n_c, c)[..., None]
            last_c = torch.where(used, srow + 1, 0).amax(3)  # (B, H_kv, nC, T): last user + 1 per chunk (0 = none)
            last = torch.cat([torch.zeros_like(last_c[:, :, :1]), last_c.cummax(2).values[:, :, :-1]], 2) - 1
            last = torch.maximum(last.double(), j.double())
        else:  # H2O scores by attention mass alone
            freq = last = imp
        keep = torch.zeros(b, hkv, t, dtype=torch.bool, device=a.device)
        out = torch.zeros(b, hkv, n_c, t, dtype=torch.bool, device=a.device)
        for ci in range(1, n_c):
            s0 = ci * c
            cand = (keep | ((j >= s0 - r) & (j < s0 + c - r))) & (j >= s)  # keep ∪ keys leaving the window
            sc = self.score(imp[:, :, ci], freq[:, :, ci], last[:, :, ci], j, s0, cand).masked_fill(~cand, NEG)
            keep = top_n_mask(sc, h, j.double()) if h > 0 else torch.zeros_like(keep)
            out[:, :, ci] = keep
        return out, (s, r, h, c)

    def mask_from_probs(self, a: Tensor, budget: int) -> Tensor:
        """The parallel training mask (B, H_kv, T, T) from dense attention a."""
        t = a.shape[-1]
        keep_c, (s, r, _, c) = self.keep_per_chunk(a, budget)
        i = torch.arange(t, device=a.device)
        kept = keep_c[:, :, i // c]  # (B, H_kv, T, T)
        return causal_mask(t, a.device) & ((i[None] < s) | (i[:, None] - i[None] < r) | kept)

    def mask(self, q, k, ctx, budget):
        return self.mask_from_probs(dense_probs(q, k), budget)

    def mask_mod(self, q, k, ctx, budget):
        keep_c, (s, r, _, c) = self.keep_per_chunk(dense_probs(q, k), budget)  # T/C x T bits per head
        return lambda b, h, qi, ki: (ki < s) | (qi - ki < r) | keep_c[b, h, qi // c, ki]

    @torch.no_grad()
    def simulate(self, a: Tensor, budget: int) -> Tensor:
        """Token-by-token reference: real append/evict lists fed by the dense rows of a (B, H_kv, T, T)."""
        b, hkv, t, _ = a.shape
        out = torch.zeros(b, hkv, t, t, dtype=torch.bool)
        used_full = self.used(a.double())
        for bi in range(b):
            for hi in range(hkv):
                tr = SeqTrack(self, budget, a.device)
                for ti in range(t):
                    tr.step(ti, ti)
                    p = a[bi, hi, ti, tr.pos].double()
                    tr.accumulate(ti, p, used_full[bi, hi, ti, tr.pos])
                    out[bi, hi, ti, tr.pos] = True
        return out
