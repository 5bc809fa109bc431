"""Token compressors (SPEC §6): which tokens stay, chosen from observation-window attention (SnapKV's score),
decided causally in training and in the cache alike.

The published methods (FastV, PyramidKV, ChunkKV) compress a prompt once, after its prefill, from the attention
of its last ``w`` queries (the observation window). Trained and decoded here, a decision may only use earlier
rows, so they run as a sequential process: at boundaries every C rows (C = ``cache.chunk_size`` capped at w),
the last ``w`` rows before the boundary s0 (rows [s0 - w, s0)) attend over the keys the layer holds at s0 (softmax
over those they can see, mean over the query heads of a kv-head, summed over the window rows) and the scores of
the keys that can leave the window during the coming block are pooled over key positions (SnapKV pools the prefix
before its window: the keys that stay in the window are zero here). The candidates are the previous selection plus the keys that leave the recent window
during the coming block (``s0 - w <= j < e - w``, e the next boundary); each method's ``select`` keeps some of them.
A key outside the window that is not selected leaves and never returns; the ``w`` most recent keys are always
read. The cache (:class:`TokenSelectCache`) keeps the last ``w`` queries (KV-Distill: the learned scores instead)
and takes the same decisions from the keys it really holds, in float64 as the training pass, so decoding equals
the masked training forward (tests/cache/test_contract.py).

Cross-layer decisions (ChunkKV's index reuse, FastV's layer K choosing for the later layers): layer l applies
the selection of its source layer ``source(l)`` (itself, an earlier layer, or None: every key). In training the
source layer's per-block selections are kept on the policy for the layers after it in the same forward; in the
cache the source layer records its selection per row for the later layers of the same step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from pikv_train.cache.policies.base import CachePolicy, PolicyCache, causal_mask

NEG = float("-inf")


def pool_scores(x: Tensor, kernel: int, mode: str) -> Tensor:
    """Centred pooling of window scores (..., S) over key positions (SnapKV / PyramidKV: stride 1, padding
    kernel // 2; avgpool divides by the kernel, padding included, as ``F.avg_pool1d``'s default)."""
    if kernel <= 1:
        return x
    y = x.reshape(-1, 1, x.shape[-1])
    fn = F.avg_pool1d if mode == "avgpool" else F.max_pool1d
    return fn(y, kernel, stride=1, padding=kernel // 2)[..., : x.shape[-1]].reshape(x.shape)


class TokenSelectPolicy(CachePolicy):
    """Base of the token compressors: the causal observation-window process of the module docstring.

    Subclasses set ``source`` (which layer's selection a layer applies), ``n_select`` (how many candidates a
    source layer keeps) and may override ``select`` (per kv-head top-n by default)."""

    cache_cls = None  # set below (TokenSelectCache)
    skips_when_budget_covers = False  # per-layer budgets / whole chunks / a ratio: the budget alone does not make it inert
    stores_selection_at_source = True
    """Whether a source layer itself keeps only its selection (PyramidKV, ChunkKV) or every key (FastV's layer K)."""
    pools = True

    def __init__(self, cfg=None, model_cfg=None, **overrides):
        super().__init__(cfg, model_cfg, **overrides)
        self.ccfg = self.cfg.compressor  # the token compressor's own settings
        self.n_layer = getattr(model_cfg, "n_layer", None)
        self._stash: dict[int, Tensor] = {}  # training: layer -> (B, H_kv|1, nC, T) selection per block

    def bind(self, model_cfg) -> None:
        super().bind(model_cfg)
        self.n_layer = self.n_layer or model_cfg.n_layer

    # ------------------------------------------------------------------ the method's knobs
    def window(self, budget: int) -> int:
        """Observation / recent window w."""
        return max(1, min(self.ccfg.obs_window, budget // 2))

    def source(self, layer: int) -> int | None:
        """The layer whose selection layer ``layer`` applies (None: it keeps every key)."""
        return layer

    def n_select(self, layer: int, budget: int, n_decided: int) -> int:
        """Candidates a source layer keeps at a boundary where ``n_decided`` keys have left the window."""
        return budget - self.window(budget)

    def select(self, score: Tensor, cand: Tensor, n: int) -> Tensor:
        """score (B, H_kv, S) float64 pooled window scores (0 where nothing was read), cand (B, H_kv, S) bool
        -> keep (B, H_kv, S) bool: the n best candidates per kv-head, exact ties to the more recent key."""
        from pikv_train.cache.policies.base import top_n_mask

        s = score.shape[-1]
        return top_n_mask(score.masked_fill(~cand, NEG), n, torch.arange(s, device=score.device, dtype=torch.float64))

    def scores(self, p: Tensor, limit: int) -> Tensor:
        """(B, H_kv, S) summed window attention -> the scores ``select`` ranks: pooled over the keys before
        ``limit`` only (the keys that stay in the window through the block are zero, as SnapKV pools the prefix
        before its observation window), positions from ``limit`` on zero."""
        j = torch.arange(p.shape[-1], device=p.device)
        p = p.masked_fill(j >= limit, 0.0)
        return pool_scores(p, self.ccfg.pool_kernel, self.ccfg.pooling).masked_fill(j >= limit, 0.0) if self.pools else p

    # ------------------------------------------------------------------ training
    def is_source(self, layer: int) -> bool:
        return self.source(layer) == layer

    @torch.no_grad()
    def keep_per_block(self, q: Tensor, k: Tensor, layer: int, budget: int) -> Tensor:
        """The sequential process of source layer ``layer``: (B, H_kv, nC, T) bool selection of each block.

        q (B, H, T, hd), k (B, H_kv, T, hd) rotated."""
        b, hkv, t, hd = k.shape
        w = self.window(budget)
        c = self.capped_chunk(w)
        starts = self.chunk_starts(t, c)
        qg = q.double().view(b, hkv, q.shape[1] // hkv, t, hd) / math.sqrt(hd)
        kd = k.double()[:, :, None]  # (B, H_kv, 1, T, hd)
        j = torch.arange(t, device=q.device)
        keep = torch.zeros(b, hkv, t, dtype=torch.bool, device=q.device)
        out = torch.zeros(b, hkv, len(starts), t, dtype=torch.bool, device=q.device)
        for ci in range(1, len(starts)):
            s0 = starts[ci]
            end = self.chunk_end(s0, c)
            cand = keep | ((j >= s0 - w) & (j < end - w))
            sc = self.block_scores(qg, kd, keep, j, s0, end, w, layer)
            keep = self.select(sc, cand, self.n_select(layer, budget, max(0, end - w)))
            out[:, :, ci] = keep
        return out

    def block_scores(self, qg: Tensor, kd: Tensor, keep: Tensor, j: Tensor, s0: int, end: int, w: int,
                     layer: int) -> Tensor:
        """(B, H_kv, T) what ``select`` ranks at boundary s0: the window rows' attention over the keys the layer
        holds (qg (B, H_kv, g, T, hd) scaled queries, kd (B, H_kv, 1, T, hd) keys, keep the previous selection),
        pooled over the candidates' region (nothing at or past the boundary exists yet)."""
        held = (keep | (j >= s0 - w)) if self.stores_selection_at_source else torch.ones_like(keep)
        held = held & (j < s0)
        wr = j[max(0, s0 - w): s0]
        logits = qg[:, :, :, wr] @ kd.transpose(-1, -2)  # (B, H_kv, g, nw, T)
        vis = held[:, :, None, None, :] & (j[None] <= wr[:, None])
        p = logits.masked_fill(~vis, NEG).softmax(-1).mean(2).sum(2)  # (B, H_kv, T)
        return self.scores(p, end - w)

    def mask(self, q, k, ctx, budget):
        layer, t = ctx.layer_idx, q.shape[2]
        src = self.source(layer)
        if layer == 0:
            self._stash.clear()
        if self.is_source(layer) or any(self.source(m) == layer for m in range(layer + 1, self.n_layer or 0)):
            self._stash[layer] = self.keep_per_block(q, k, layer, budget)
        if src is None:
            return None
        if src not in self._stash:
            raise RuntimeError(f"{type(self).__name__}: layer {layer} applies layer {src}'s selection, which this "
                               "forward has not computed (layers must run in order)")
        w = self.window(budget)
        keep_c = self._stash[src]
        i = torch.arange(t, device=q.device)
        kept = keep_c[:, :, self.row_chunks(t, self.capped_chunk(w), q.device)]  # (B, H_kv, T, T)
        return causal_mask(t, q.device) & ((i[:, None] - i[None] < w) | kept)

    def mask_mod(self, q, k, ctx, budget):  # dense mask indexed (FlexAttention on CUDA)
        m = self.mask(q, k, ctx, budget)
        if m is None:
            return None
        return lambda b, h, qi, ki: m[b, h if m.shape[1] > 1 else 0, qi, ki]


class TokenSelectCache(PolicyCache):
    """The inference cache of a token compressor: per (sequence, kv-head) the held keys, the last ``w`` queries
    of source layers, and the current selection; the same decisions as ``keep_per_block`` on the keys held."""

    def new_state(self, layer_idx, h, k):
        st = super().new_state(layer_idx, h, k)
        st.update(sel=torch.zeros(0, dtype=torch.long, device=k.device), qwin=None)
        return st

    # Within a step, the selection after each new row of a source layer, for the layers that apply it later in
    # the same step: {(layer, sequence): {t: [per kv-head positions]}}. Scratch of the step being computed
    # (replaced at the source layer's next step), not cache state: bytes_stored() counts ``sel`` and ``qwin``.
    _sel_at: dict | None = None

    def _source_step(self, layer_idx, bi, states, qb, k_all, p_all, n_old, held):
        """Run the selection of a source layer over this step's rows; records the selected positions after each
        row t in ``_sel_at[(layer, bi)][t]`` and updates the held-key index lists."""
        pol = self.policy
        w = pol.window(self.budget)
        c = pol.capped_chunk(w)
        dev = qb.device
        hkv = len(states)
        if self._sel_at is None:
            self._sel_at = {}
        sel_at = self._sel_at[(layer_idx, bi)] = {}
        for r in range(qb.shape[2]):
            t = int(p_all[0][n_old[0] + r])
            if t > 0 and pol.is_boundary(t, c, self.ref_len):
                end = pol.chunk_end(t, c, self.ref_len)
                p = torch.zeros(hkv, t, dtype=torch.float64, device=dev)
                cand = torch.zeros(hkv, t, dtype=torch.bool, device=dev)
                for h, st in enumerate(states):
                    p[h].index_copy_(0, p_all[h][held[h]], self._held_scores(st, k_all[h][held[h]], p_all[h][held[h]],
                                                                             held[h]))
                    cand[h, st["sel"]] = True
                    cand[h] |= (torch.arange(t, device=dev) >= t - w) & (torch.arange(t, device=dev) < end - w)
                keep = pol.select(pol.scores(p[None], end - w), cand[None],
                                  pol.n_select(layer_idx, self.budget, max(0, end - w)))[0]
                for h, st in enumerate(states):
                    st["sel"] = keep[h].nonzero().flatten()
            sel_at[t] = [st["sel"] for st in states]
            for h, st in enumerate(states):
                qn, pn = qb[h][:, r: r + 1], torch.tensor([t], device=dev)
                if not self.keeps_queries:
                    pass
                elif st["qwin"] is None:
                    st["qwin"] = (qn, pn)
                else:
                    st["qwin"] = (torch.cat([st["qwin"][0], qn], 1)[:, -w:], torch.cat([st["qwin"][1], pn])[-w:])
                new = torch.tensor([n_old[h] + r], device=dev)
                held[h] = torch.cat([held[h], new])
                if pol.stores_selection_at_source:
                    held[h] = self._apply(held[h], p_all[h], st["sel"], t, w)
        return held

    keeps_queries = True
    """Whether source layers keep their last ``w`` queries (the window attention scores the held keys)."""

    def _held_scores(self, st: dict, keys: Tensor, pos: Tensor, idx: Tensor) -> Tensor:
        """(S,) float64 score of each held key (keys (S, hd), positions (S,), index ``idx`` into the stored tokens):
        the window rows' attention over them, softmax over what each row can see, mean over the query heads of the
        kv-head, summed over the rows."""
        qw, qpos = st["qwin"]
        logits = qw.double() @ keys.double().t() / math.sqrt(qw.shape[-1])  # (g, nw, S)
        return logits.masked_fill(pos[None] > qpos[:, None], NEG).softmax(-1).mean(0).sum(0)

    @staticmethod
    def _apply(idx: Tensor, pos_all: Tensor, sel: Tensor, t: int, w: int) -> Tensor:
        """The held index list after row t: the window and the selected positions."""
        pos = pos_all[idx]
        return idx[(t - pos < w) | torch.isin(pos, sel)]

    def _step_b(self, layer_idx, states, qb, k_all, p_all, n_old):
        pol = self.policy
        dev = qb.device
        n_new = qb.shape[2]
        held = [torch.arange(n, device=dev) for n in n_old]
        rows = [torch.zeros(n_new, len(p), dtype=torch.bool, device=dev) for p in p_all]
        src = pol.source(layer_idx)
        bi = next(i for i, row in enumerate(self.store[layer_idx]) if row is states)
        feeds = any(pol.source(m) == layer_idx for m in range(layer_idx, pol.n_layer or 0))
        if feeds:  # this layer decides (for itself and / or later layers)
            self._source_step(layer_idx, bi, states, qb, k_all, p_all, n_old, [h.clone() for h in held])
        if src is None:  # every key
            for h in range(len(states)):
                rows[h] = p_all[h][None] <= p_all[h][n_old[h]:][:, None]
            return rows, [torch.ones(len(p), dtype=torch.bool, device=dev) for p in p_all]
        sel_at = self._sel_at[(src, bi)]  # the source layer ran earlier in this step (or is this layer)
        if layer_idx == max(m for m in range(pol.n_layer or layer_idx + 1) if pol.source(m) == src):
            del self._sel_at[(src, bi)]  # the step's last reader: not held between steps
        w = pol.window(self.budget)
        keeps = []
        for h in range(len(states)):
            idx = held[h]
            for r in range(n_new):
                t = int(p_all[h][n_old[h] + r])
                idx = self._apply(torch.cat([idx, torch.tensor([n_old[h] + r], device=dev)]), p_all[h],
                                  sel_at[t][h], t, w)
                rows[h][r, idx] = True
            kp = torch.zeros(len(p_all[h]), dtype=torch.bool, device=dev)
            kp[idx] = True
            keeps.append(kp)
        return rows, keeps


TokenSelectPolicy.cache_cls = TokenSelectCache
