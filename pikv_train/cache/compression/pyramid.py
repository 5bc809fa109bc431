"""Importance-aware mixed precision, MiKV (Yang et al., 2024, "No Token Left Behind"): nothing is dropped; the
tokens that receive the least attention are kept at lower precision.

Each kept token of a (sequence, kv-head) sits in one of three tiers: full precision, ``pyramid_bits[0]`` (4) and
``pyramid_bits[1]`` (2) bits, quantized per token over groups of ``group_size`` channels (values and keys alike)
with the quantization code of :mod:`pikv_train.cache.quant`. A token enters at full precision. Every
``tier_every`` tokens (MiKV decides at every step: ``tier_every: 1``) the tokens outside the ``recent`` window are
ranked by the attention they have accumulated (H2O's score, from the attention each row really paid over what it
read, tiers included) and re-tiered: the best x of those still at full precision stay there, the best x of the
rest that are not yet at the lowest tier go to (or stay at) the middle tier, the others go to the lowest, with x
the largest count that keeps the bytes of the held tokens within ``byte_budget`` of the full-precision cache
(the recent window counted at full precision). A token is only ever demoted (its precision is gone; as H2O
refills its heavy hitters from the tokens still present); the lowest tier is quantized from the middle tier's values (``Q_lo(DQ_hi(x))``), whichever
tier the token came from, so the stored form does not depend on its path.

Training forward: a no-grad chunk-sequential pass computes the tiers (the same decisions as the cache, from
the same float64 attention), then the rows of each chunk read every key in its tier's form at that chunk: one SDPA with the chunks as batch
entries (straight-through gradient through the rounding).

Deviations from MiKV: its outlier-aware channel balancing and its per-channel key quantization are not done
(per-token groups for both), and the tier split (equal full and middle tiers under the byte budget) is ours; MiKV
has one low-precision tier.

Composition: with full, StreamingLLM and DuoAttention the tiers rank what their deployed (hard-gated) cache
holds; a policy that itself scores from attention (h2o, lru, lru_plus, ada_kv, quest) scores with the keys in
their tiers while the tiers rank what it holds, one joint process that the training forward reproduces by
alternating the two passes to their fixed point (:func:`pikv_train.models.attention.tiered_versions`). Expert
sharding composes, per-shard budgets included (they limit what each row reads, and under ``policy: full``
what the cache holds, which the tiers then rank). Under FlexGen the tiered stores are placed between device and host
(:mod:`pikv_train.cache.policies.flexgen_stores`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pikv_train.cache.compression.base import KVCompressor, Store, Versions
from pikv_train.cache.quant import group_dequantize, group_quantize
from pikv_train.errors import ConfigError

def top_n_mask(score: Tensor, n: Tensor, tiebreak: Tensor | None = None) -> Tensor:
    """The policies' rule (n best along the last dim, exact ties to the more recent position) with the positions
    0..S-1 as the tiebreak: one stable sort of the reversed scores instead of two sorts."""
    if tiebreak is not None:
        from pikv_train.cache.policies.base import top_n_mask as top  # lazy: no import cycle

        return top(score, n, tiebreak)
    s = score.shape[-1]
    order = (s - 1) - torch.argsort(score.flip(-1), dim=-1, descending=True, stable=True)  # most recent first on ties
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(s, device=score.device).expand_as(order))
    return (rank < n.unsqueeze(-1)) & torch.isfinite(score)


def assign_tiers(imp: Tensor, tier: Tensor, cand: Tensor, x: Tensor) -> Tensor:
    """New tiers of the candidates (..., S), S tokens in position order: the x best by accumulated attention among those still at full
    precision stay there, the x best of the rest that can still be at the middle tier go (or stay) there, every
    other candidate goes to the lowest tier. As H2O refills its heavy-hitter set from the tokens still present,
    a demoted token never climbs back. Exact ties go to the more recent token."""
    score = imp.masked_fill(~cand, float("-inf"))
    first = top_n_mask(score.masked_fill(tier > 0, float("-inf")), x)
    second = top_n_mask(score.masked_fill(first | (tier > 1), float("-inf")), x)
    return torch.where(first, 0, torch.where(second, 1, 2))


def _ste(x: Tensor, xq: Tensor) -> Tensor:
    """Forward exactly ``xq`` (the value the cache stores, in any dtype), gradient the identity."""
    return xq + (x - x.detach())


class PyramidCompressor(KVCompressor):
    """MiKV-style tiers (full / 4-bit / 2-bit) chosen by accumulated attention under a byte budget."""

    name = "pyramid"
    versioned = True
    needs_visibility = True  # its versions depend on what each row reads (computed after the hooks' masks)

    def __init__(self, cfg, model_cfg):
        super().__init__(cfg, model_cfg)
        self.hi, self.lo = cfg.pyramid_bits
        self.group = min(cfg.group_size, self.head_dim)
        if self.group * min(self.hi, self.lo) % 8:
            raise ConfigError(f"model.init_args.cache.compressor: groups of {self.group} channels x {self.lo} bits do "
                              "not fill whole bytes; use a head_dim that is a multiple of 4")
        self._check_budget()

    def _check_budget(self) -> None:
        cfg = self.cfg
        full, _, low = self.token_bytes(4)
        if cfg.byte_budget < low / full:
            import warnings

            warnings.warn(f"cache.compressor.byte_budget={cfg.byte_budget} is below the lowest tier's size "
                          f"({low / full:.3f} of full precision): every token outside the recent window goes to the "
                          f"lowest tier and the cache holds more than the budget; raise byte_budget above "
                          f"{low / full:.3f}", stacklevel=2)

    # ------------------------------------------------------------------ forms and sizes
    def forms(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(..., hd) -> middle-tier and lowest-tier values (no gradient): DQ_hi(x), DQ_lo(DQ_hi(x))."""
        mid = group_dequantize(group_quantize(x.detach(), self.hi, self.group))
        return mid, group_dequantize(group_quantize(mid, self.lo, self.group))

    def token_bytes(self, element_size: int) -> tuple[float, float, float]:
        """Bytes of one token's key + value in one kv-head at full / middle / lowest precision."""
        hd, g = self.head_dim, self.group
        n_g = -(-hd // g)
        q = lambda b: 2 * (n_g * g * b / 8 + 2 * n_g * element_size)  # noqa: E731
        return 2 * hd * element_size, q(self.hi), q(self.lo)

    evicts = False
    """A fourth tier, evicted (the PiKV hybrid): candidates that do not fit the byte budget even at the lowest tier."""
    uses_importance = False
    """Tiers rank a per-token importance given by the caller (the PiKV router's) instead of accumulated attention."""

    def allocate(self, n_seen: int, n_held: Tensor, n_recent: Tensor, n_cand: Tensor, element_size: int
                 ) -> tuple[Tensor, Tensor]:
        """(x, n_keep): x candidates at full precision and x at the middle tier, and how many candidates stay
        (MiKV: all of them). ``n_seen``: the positions before the decision."""
        return self.top_count(n_held, n_recent, n_cand, element_size), n_cand

    def top_count(self, n_held: Tensor, n_recent: Tensor, n_cand: Tensor, element_size: int) -> Tensor:
        """x, the number of candidates at full precision and at the middle tier each, under the byte budget."""
        full, mid, low = self.token_bytes(element_size)
        left = self.cfg.byte_budget * n_held * full - n_recent * full - n_cand * low
        x = torch.floor(left.double() / (full + mid - 2 * low)).clamp_min(0)
        return torch.minimum(x, torch.div(n_cand, 2, rounding_mode="floor").double()).long()

    def bytes_per_token_head(self, element_size, context):
        """Bytes per token of a ``context``-token stream just before a decision, in closed form: the byte budget
        (or, below it, the floor of every candidate at the lowest tier and the recent window at full precision)
        for the tokens decided at the last decision, the up to ``tier_every`` tokens since then at full
        precision, and per token its float64 importance and int8 tier."""
        full, _, low = self.token_bytes(element_size)
        n, c, r = context, min(self.cfg.tier_every, context), min(self.cfg.recent, context)
        decided = n - c
        floor = (min(r, decided) * full + max(0, decided - r) * low) / max(decided, 1)
        kv = decided * max(self.cfg.byte_budget * full, floor) + c * full
        return kv / n + 8 + 1

    # ------------------------------------------------------------------ training
    @torch.no_grad()
    def tiers(self, q: Tensor, k: Tensor, vis: Tensor, held: Tensor, forms: list[Tensor],
              importance: Tensor | None = None) -> tuple[Tensor, Tensor, list[int]]:
        """The chunk-sequential pass: tier_c (B, H_kv, nC, T) of every key at each chunk, evicted_c (same shape,
        bool; never set without ``evicts``), and the chunk starts.

        q (B, H, T, hd); k (B, H_kv, T, hd); vis (B|1, 1|H_kv, T, T) what each row reads; held (same shape): the
        keys the cache holds when row t arrives (j < t); forms: the three key forms; importance (B, T): a static
        per-token score to rank by (None: the attention each key has received, accumulated).
        """
        b, h, t, hd = q.shape
        hkv = k.shape[1]
        c, recent = self.cfg.tier_every, self.cfg.recent
        es = k.element_size()
        qd = q.double().view(b, hkv, h // hkv, t, hd) / math.sqrt(hd)
        kd = [f.double()[:, :, None] for f in forms]  # (B, H_kv, 1, T, hd)
        j = torch.arange(t, device=q.device)
        starts = list(range(0, t, c))
        tier = torch.zeros(b, hkv, t, dtype=torch.long, device=q.device)
        imp = torch.zeros(b, hkv, t, dtype=torch.float64, device=q.device)
        out = torch.zeros(b, hkv, len(starts), t, dtype=torch.long, device=q.device)
        evicted = torch.zeros(b, hkv, t, dtype=torch.bool, device=q.device)
        out_ev = torch.zeros(b, hkv, len(starts), t, dtype=torch.bool, device=q.device)
        vis, held = vis.expand(b, hkv, t, t), held.expand(b, hkv, t, t)
        if importance is not None:
            imp = importance.double()[:, None, :].expand(b, hkv, t)
        for ci, s0 in enumerate(starts):
            e = min(s0 + c, t)
            if s0 > 0:
                hold = held[:, :, s0] & (j < s0) & ~evicted  # (B, H_kv, T)
                cand = hold & (s0 - j > recent)
                x, n_keep = self.allocate(s0, hold.sum(-1), (hold & ~cand).sum(-1), cand.sum(-1), es)
                tier = torch.where(cand, assign_tiers(imp, tier, cand, x), tier)
                if self.evicts:  # the least important candidates beyond the n_keep that fit leave for good
                    evicted |= cand & ~top_n_mask(imp.masked_fill(~cand, float("-inf")), n_keep)
            out[:, :, ci] = tier
            out_ev[:, :, ci] = evicted
            if importance is not None:
                continue
            # The keys as the chunk's rows read them (each in its tier's form): one matmul, not one per tier.
            # Causal: the chunk's rows read keys j < e only.
            te = tier[:, :, None, :e, None]
            kt = torch.where(te == 0, kd[0][..., :e, :], torch.where(te == 1, kd[1][..., :e, :], kd[2][..., :e, :]))
            logits = qd[:, :, :, s0:e] @ kt.transpose(-1, -2)  # (B, H_kv, G, C, e)
            readable = vis[:, :, None, s0:e, :e] & ~evicted[:, :, None, None, :e]
            p = logits.masked_fill(~readable, float("-inf")).softmax(-1).mean(2)  # (B, H_kv, C, e)
            imp[..., :e] += p.nan_to_num(0.0).sum(2)
        return out, out_ev, starts

    def versions(self, layer_idx, k, v, q=None, vis=None, held=None, importance=None):
        t = k.shape[2]
        causal = torch.ones(t, t, dtype=torch.bool, device=k.device).tril()[None, None]
        vis = causal if vis is None else vis & causal
        held = causal if held is None else held
        k1, k2 = self.forms(k)
        v1, v2 = self.forms(v)
        tier_c, ev_c, starts = self.tiers(q, k, vis, held, [k, k1, k2], importance)
        row_chunk = torch.div(torch.arange(t, device=k.device), self.cfg.tier_every, rounding_mode="floor")
        index = tier_c.to(torch.int8)[:, :, row_chunk]  # (B, H_kv, T, T): the tier row t reads key j in
        return Versions(keys=[k, _ste(k, k1), _ste(k, k2)], values=[v, _ste(v, v1), _ste(v, v2)], select=[],
                        key_index=index, chunk=self.cfg.tier_every, chunk_tier=tier_c,
                        chunk_evicted=ev_c if self.evicts else None)

    def new_store(self, layer_idx, head, like):
        return PyramidStore(self, like)


class PyramidStore(Store):
    """One (sequence, kv-head): each held token's tier, its full-precision or quantized key and value, and its
    accumulated attention (float64)."""

    def __init__(self, comp: PyramidCompressor, like: Tensor):
        self.comp = comp  # shared, never copied
        hd = comp.head_dim
        self.tier = torch.zeros(0, dtype=torch.int8, device=like.device)
        self.full_k, self.full_v = like.new_zeros(0, hd), like.new_zeros(0, hd)  # tier-0 tokens, in order
        self.q = {i: None for i in (1, 2)}  # tier i: (GroupQuantized keys, GroupQuantized values), in order
        self.imp = torch.zeros(0, dtype=torch.float64, device=like.device)
        self._pending = None
        self.hd, self.dtype = hd, like.dtype

    def _tier_rows(self, i: int) -> tuple[Tensor, Tensor]:
        got = self.q[i]
        if got is None:
            z = torch.zeros(0, self.hd, dtype=self.dtype, device=self.tier.device)
            return z, z
        return group_dequantize(got[0])[:, : self.hd], group_dequantize(got[1])[:, : self.hd]

    def _decode(self) -> tuple[Tensor, Tensor]:
        k = self.full_k.new_zeros(len(self.tier), self.hd)
        v = torch.zeros_like(k)
        k[self.tier == 0], v[self.tier == 0] = self.full_k, self.full_v
        for i in (1, 2):
            k[self.tier == i], v[self.tier == i] = self._tier_rows(i)
        return k, v

    dropped: Tensor | None = None
    """Set by a retiering that evicts (PiKV): (S,) bool over the tokens held before it, those that left; the policy
    cache drops their positions (``PolicyCache.update``) and clears it."""

    def _retier(self, t: int, pos: Tensor) -> None:
        comp = self.comp
        cand = t - pos > comp.cfg.recent
        x, n_keep = comp.allocate(t, torch.tensor(len(pos)), (~cand).sum(), cand.sum(), self.full_k.element_size())
        new = torch.where(cand, assign_tiers(self.imp, self.tier.long(), cand, x).to(torch.int8), self.tier)
        ev = torch.zeros_like(cand)
        if comp.evicts:
            ev = cand & ~top_n_mask(self.imp.masked_fill(~cand, float("-inf")), n_keep)
            new = torch.where(ev, torch.full_like(new, 3), new)  # in no tier's payload below
        if torch.equal(new, self.tier):
            return
        old = self.tier
        k, v = self._decode()
        to1, to2 = (new == 1) & (old == 0), (new == 2) & (old < 2)
        # The lowest tier quantizes the middle tier's values: from a full-precision token DQ_hi(Q_hi(x)), from a
        # middle-tier token its stored values (the same numbers), so the stored form does not depend on the path.
        mid_k = torch.where((old == 1)[:, None], k, comp.forms(k)[0])
        mid_v = torch.where((old == 1)[:, None], v, comp.forms(v)[0])
        q1 = _assemble(new == 1, [((old == 1) & (new == 1), self.q[1], old == 1)], (to1, k, v, comp.hi, comp.group))
        q2 = _assemble(new == 2, [((old == 2) & (new == 2), self.q[2], old == 2)], (to2, mid_k, mid_v, comp.lo, comp.group))
        self.full_k, self.full_v = k[new == 0], v[new == 0]
        self.q = {1: q1, 2: q2}
        self.tier = new
        if bool(ev.any()):
            self.tier, self.imp, self.dropped = new[~ev], self.imp[~ev], ev

    def read(self, t, pos):
        if t is not None and t > 0 and t % self.comp.cfg.tier_every == 0 and len(self.tier):
            self._retier(t, pos)
        if not len(self.tier):
            return None
        return self._decode()

    def observe(self, q: Tensor, k_all: Tensor, vis: Tensor) -> None:
        """The new rows' attention over (stored + new) keys as read: q (g, Tr, hd), k_all (S, hd), vis (Tr, S)."""
        logits = (q.double() / math.sqrt(q.shape[-1])) @ k_all.double().t()  # (g, Tr, S)
        p = logits.masked_fill(~vis[None], float("-inf")).softmax(-1).mean(0).nan_to_num(0.0)
        self._pending = p.sum(0)

    def commit(self, codes, pos_all, keep):
        k_new, v_new = codes["k"], codes["v"]
        n_new = len(k_new)
        if "importance" in codes:  # a static per-token score (the PiKV router's), not accumulated attention
            imp = torch.cat([self.imp, codes["importance"].to(self.imp)])
            self._pending = None
        else:
            imp = torch.cat([self.imp, self.imp.new_zeros(n_new)])
        if self._pending is not None:
            imp = imp + self._pending
            self._pending = None
        tier = torch.cat([self.tier, self.tier.new_zeros(n_new)])
        k_old, v_old = self._decode()
        k_all, v_all = torch.cat([k_old, k_new]), torch.cat([v_old, v_new])
        self.tier, self.imp = tier[keep], imp[keep]
        k_all, v_all = k_all[keep], v_all[keep]
        self.full_k, self.full_v = k_all[self.tier == 0], v_all[self.tier == 0]
        for i in (1, 2):
            if self.q[i] is not None:
                sel_old = (tier[: len(tier) - n_new] == i)
                kept_old = keep[: len(tier) - n_new][sel_old]
                gk, gv = self.q[i]
                self.q[i] = None if not bool(kept_old.any()) else (_select(gk, kept_old), _select(gv, kept_old))

    def placed_rows(self, pos):
        out = [(self, "full_k", pos[self.tier == 0]), (self, "full_v", pos[self.tier == 0])]
        for i in (1, 2):
            for qt in self.q[i] or ():
                out += [(qt, f, pos[self.tier == i]) for f in ("codes", "mn", "scale")]
        return out

    def nbytes(self) -> int:
        from pikv_train.cache.policies.base import tensor_bytes

        return (tensor_bytes([self.tier, self.full_k, self.full_v, self.imp])
                + sum(x.nbytes() for pair in self.q.values() if pair is not None for x in pair))


def _assemble(total: Tensor, kept: list, fresh: tuple):
    """The (keys, values) codes of the tokens in ``total`` (S,) bool, in position order: rows of earlier codes
    for the tokens that stay (``(stay mask, (qk, qv) or None, tokens those codes cover)``) and new codes for
    ``fresh = (mask, k, v, bits, group)``."""
    from pikv_train.cache.quant import GroupQuantized

    if not bool(total.any()):
        return None
    slot = torch.cumsum(total.long(), 0) - 1  # row of each token in the assembled codes
    parts = []
    for stay, pair, covered in kept:
        if pair is not None and bool(stay.any()):
            rows = (torch.cumsum(covered.long(), 0) - 1)[stay]  # their rows in the earlier codes
            parts.append((slot[stay], [_select(x, rows) for x in pair]))
    mask, k, v, bits, group = fresh
    if bool(mask.any()):
        parts.append((slot[mask], [group_quantize(k[mask], bits, group), group_quantize(v[mask], bits, group)]))
    n = int(total.sum())
    out = []
    for m in range(2):
        ref = parts[0][1][m]
        fields = {f: getattr(ref, f).new_zeros(n, *getattr(ref, f).shape[1:]) for f in ("codes", "mn", "scale")}
        for where, qts in parts:
            for f in fields:
                fields[f][where] = getattr(qts[m], f)
        out.append(GroupQuantized(fields["codes"], fields["mn"], fields["scale"], ref.bits, ref.group_size, ref.dim))
    return tuple(out)


def _select(qt, rows: Tensor):
    from pikv_train.cache.quant import GroupQuantized

    return GroupQuantized(qt.codes[rows], qt.mn[rows], qt.scale[rows], qt.bits, qt.group_size, qt.dim)
