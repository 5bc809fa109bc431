"""Inference cache with real per-shard storage for expert-sharded KV (SPEC §3): the physical layout.

This is the layout for placing shards on expert-parallel devices: a key is copied into each shard of
its experts. The deployed cache (``Decoder.new_cache()``, :mod:`pikv_train.cache.compose`) instead stores
each key once per (sequence, kv-head) with its shard membership and composes with every cache policy;
both read exactly what the training mask shows.

Per sharded layer l (l >= 1, the previous layer being MoE) the cache holds:

* ``n_shards`` shard stores: token j (position >= n_sink) is appended to every shard of ``S_j`` (its
  layer l-1 experts), with its membership vector so that a query reading several of j's shards counts
  j once (read from the lowest shard of ``S_j ∩ R_t``);
* a sink store of the first ``n_sink`` positions (indexed by position) and a window store of the
  ``window`` (+ ``rollback_slack``) most recent tokens (truncated after each step);
* for ``read_mode="by_score"``, per-shard running key sums and counts (the shard summaries of MoBA).

A query reads the sink store, the window store and only the shards of ``R_t`` (for a batch, the union of
the rows' shards is gathered and masked per row). Layer 0 is a plain full cache (:class:`KVCache`).

The cache needs layer l-1's routing of the *current* tokens: the decoder calls
:meth:`ShardedKVCache.record_routing` after each MoE layer when a cache with that method is passed, so
the training forward stays stateless. Decoding token by token gives the masked parallel forward's
logits (tests/cache/test_sharding.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pikv_train.cache.kv_cache import KVCache
from pikv_train.cache.sharding import (
    ShardingConfig,
    _check,
    group_queries,
    shard_membership,
    shard_scores,
    top_shards,
)


class _LayerStore:
    """Storage of one sharded layer (tensors are (B, H_kv, n, hd); positions (B, n), -1 = empty)."""

    def __init__(self, b: int, h: int, hd: int, n_shards: int, n_sink: int, dtype, device):
        z = lambda n: torch.zeros(b, h, n, hd, dtype=dtype, device=device)  # noqa: E731
        self.sink_k, self.sink_v = z(n_sink), z(n_sink)
        self.sink_pos = torch.full((b, n_sink), -1, dtype=torch.long, device=device)
        self.sink_mem = torch.zeros(b, n_sink, n_shards, dtype=torch.bool, device=device)
        self.win_k, self.win_v = z(0), z(0)
        self.win_pos = torch.full((b, 0), -1, dtype=torch.long, device=device)
        self.shard_k = [z(0) for _ in range(n_shards)]
        self.shard_v = [z(0) for _ in range(n_shards)]
        self.shard_pos = [torch.full((b, 0), -1, dtype=torch.long, device=device) for _ in range(n_shards)]
        self.shard_mem = [torch.zeros(b, 0, n_shards, dtype=torch.bool, device=device) for _ in range(n_shards)]
        self.key_sum = torch.zeros(b, h, n_shards, hd, dtype=torch.float64, device=device)
        self.key_cnt = torch.zeros(b, n_shards, dtype=torch.long, device=device)

    def entries(self) -> tuple[int, int]:
        """(real K/V entries stored, allocated entries) per kv-head."""
        pos = [self.sink_pos, self.win_pos, *self.shard_pos]
        return sum(int((p >= 0).sum()) for p in pos), sum(p.numel() for p in pos)


class ShardedKVCache(KVCache):
    """Expert-sharded inference cache (see module docstring).

    Args:
        n_layer: decoder layers.
        cfg: the sharding settings (same object as the training hook's).
        n_experts: experts per MoE layer.
        n_read: by_score shards read per query (default: ``cfg.read_shards`` or 1).
        rollback_slack: extra recent tokens the window store keeps so that :meth:`rollback` of up to this
            many tokens stays exact (speculative decoding).
    """

    def __init__(self, n_layer: int, cfg: ShardingConfig, n_experts: int, n_read: int | None = None,
                 rollback_slack: int = 8):
        super().__init__(n_layer)
        self.cfg = cfg
        self.rollback_slack = rollback_slack
        self.n_shards = _check(cfg, n_experts)
        self.n_read = n_read or cfg.read_shards or 1
        self._routing: dict[int, object] = {}
        self._stores: dict[int, _LayerStore] = {}
        self._tokens = 0  # real tokens appended (summed over rows)
        self._read_sum = 0.0
        self._read_n = 0
        self._bytes_per_entry = 0  # K+V bytes of one token for one layer

    # ------------------------------------------------------------------ routing
    def record_routing(self, layer_idx: int, routing) -> None:
        """Called by the decoder after MoE layer ``layer_idx`` with the RouterOutput of the current tokens."""
        self._routing[layer_idx] = routing

    # ------------------------------------------------------------------- update
    def update(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, h, tq, hd = k.shape
        self._bytes_per_entry = 2 * h * hd * k.element_size()
        if layer_idx == 0:
            self._tokens += int((q_pos >= 0).sum())
        prev = self._routing.get(layer_idx - 1)
        if prev is None:
            return super().update(layer_idx, q, k, v, q_pos)
        cfg, n_s = self.cfg, self.n_shards
        st = self._stores.get(layer_idx)
        if st is None:
            st = self._stores[layer_idx] = _LayerStore(b, h, hd, n_s, cfg.n_sink, k.dtype, k.device)
        real = q_pos >= 0  # (B, Tq)
        member = shard_membership(prev.ids, prev.valid, n_s).view(b, tq, n_s) & real[..., None]

        # Sinks: written at their position.
        is_sink = real & (q_pos < cfg.n_sink)
        if bool(is_sink.any()):
            bi, ti = is_sink.nonzero(as_tuple=True)
            pi = q_pos[bi, ti]
            st.sink_k[bi, :, pi] = k[bi, :, ti]
            st.sink_v[bi, :, pi] = v[bi, :, ti]
            st.sink_pos[bi, pi] = pi
            st.sink_mem[bi, pi] = member[bi, ti]

        # Shards: every non-sink token goes to the shards of its experts (compacted per row).
        for s in range(n_s):
            m = member[:, :, s] & ~is_sink & real
            n_new = int(m.sum(1).max())
            if n_new == 0:
                continue
            order = torch.argsort((~m).to(torch.int8), dim=1, stable=True)[:, :n_new]  # members first, in order
            keep = m.gather(1, order)
            idx = order[:, None, :, None].expand(b, h, n_new, hd)
            st.shard_k[s] = torch.cat([st.shard_k[s], k.gather(2, idx)], 2)
            st.shard_v[s] = torch.cat([st.shard_v[s], v.gather(2, idx)], 2)
            st.shard_pos[s] = torch.cat([st.shard_pos[s], torch.where(keep, q_pos.gather(1, order), -1)], 1)
            st.shard_mem[s] = torch.cat([st.shard_mem[s], member.gather(1, order[..., None].expand(b, n_new, n_s))], 1)

        # Window: append everything now, truncate to the last `window` columns after reading.
        st.win_k, st.win_v = torch.cat([st.win_k, k], 2), torch.cat([st.win_v, v], 2)
        st.win_pos = torch.cat([st.win_pos, q_pos], 1)

        # R_t: which shards each query reads, (B, 1 | H_kv, Tq, S).
        if cfg.read_mode == "by_routing":
            reads = member[:, None]
        else:
            mf = member.double()
            key_sum = st.key_sum[:, :, None] + torch.einsum("bts,bhtd->bhtsd", mf, k.double()).cumsum(2)
            key_cnt = st.key_cnt[:, None] + member.long().cumsum(1)
            reads = top_shards(shard_scores(group_queries(q, h), key_sum, key_cnt), self.n_read)
            st.key_sum, st.key_cnt = key_sum[:, :, -1], key_cnt[:, -1]

        qp = q_pos[:, None, :, None]  # (B, 1, Tq, 1)

        def causal(pos: Tensor) -> Tensor:
            kp = pos[:, None, None, :]
            return (kp >= 0) & (kp <= qp)

        win_kp = st.win_pos[:, None, None, :]
        keys, vals = [st.win_k, st.sink_k], [st.win_v, st.sink_v]
        masks = [causal(st.win_pos) & (win_kp >= cfg.n_sink) & (qp - win_kp < cfg.window), causal(st.sink_pos)]
        read_any = reads.flatten(0, 2).any(0)  # (S,) shards some query of the batch reads
        for s in range(n_s):
            if not bool(read_any[s]) or st.shard_pos[s].shape[1] == 0:
                continue  # a shard nobody reads is never touched
            pos, mem = st.shard_pos[s], st.shard_mem[s]
            kp = pos[:, None, None, :]
            # Entry j is read from shard s iff s is the lowest shard of S_j ∩ R_t (so j counts once).
            lower = torch.einsum("bhts,bns->bhtn", reads[..., :s].float(), mem[..., :s].float()) > 0
            m = causal(pos) & (qp - kp >= cfg.window) & reads[..., s : s + 1] & ~lower
            keys.append(st.shard_k[s])
            vals.append(st.shard_v[s])
            masks.append(m)
        hm = max(m.shape[1] for m in masks)
        mask = torch.cat([m.expand(b, hm, tq, m.shape[-1]) for m in masks], -1)
        # Padded queries read one (harmless) slot so no softmax row is empty.
        pad = ~real[:, None, :, None]
        if bool(pad.any()):
            first = torch.zeros_like(mask)
            first[..., 0] = True
            mask = torch.where(pad, first, mask)
        # Read statistics: visible keys / causal keys per real query (and head).
        n_vis = mask.sum(-1).float()  # (B, hm, Tq)
        frac = n_vis / (q_pos + 1).clamp_min(1)[:, None].float()
        sel = real[:, None].expand_as(frac)
        self._read_sum += float(frac[sel].sum())
        self._read_n += int(sel.sum())

        out_k, out_v = torch.cat(keys, 2), torch.cat(vals, 2)
        keep_w = cfg.window + self.rollback_slack
        if st.win_pos.shape[1] > keep_w:
            st.win_k, st.win_v = st.win_k[:, :, -keep_w:], st.win_v[:, :, -keep_w:]
            st.win_pos = st.win_pos[:, -keep_w:]
        return out_k, out_v, mask

    def rollback(self, keep_until: Tensor) -> None:
        """Forget every cached key beyond position ``keep_until`` (B,) in its row (speculative decoding)."""
        super().rollback(keep_until)
        keep = keep_until[:, None]
        for st in self._stores.values():
            # by_score summaries: take the dropped keys back out of their shards' running sums.
            for k, pos, mem in [(st.sink_k, st.sink_pos, st.sink_mem)] + [
                (st.shard_k[s], st.shard_pos[s], st.shard_mem[s] & (torch.arange(self.n_shards) == s).to(pos.device))
                for s, pos in enumerate(st.shard_pos)
            ]:
                gone = (pos > keep) & (pos >= 0)  # (B, n)
                if not bool(gone.any()):
                    continue
                m = (mem & gone[..., None]).double()  # (B, n, S)
                st.key_sum -= torch.einsum("bns,bhnd->bhsd", m, k.double())
                st.key_cnt -= m.sum(1).long()
            st.sink_pos = torch.where(st.sink_pos > keep, -1, st.sink_pos)
            st.win_pos = torch.where(st.win_pos > keep, -1, st.win_pos)
            # Move dead window slots to the old end so truncation keeps the live recent tokens.
            order = torch.argsort((st.win_pos >= 0).to(torch.int8), dim=1, stable=True)
            idx = order[:, None, :, None].expand_as(st.win_k)
            st.win_k, st.win_v, st.win_pos = st.win_k.gather(2, idx), st.win_v.gather(2, idx), st.win_pos.gather(1, order)
            st.shard_pos = [torch.where(p > keep, -1, p) for p in st.shard_pos]

    # -------------------------------------------------------------------- stats
    def read_fraction(self) -> float:
        """Mean over sharded layers' queries (and kv-heads for by_score) of visible / causal keys."""
        return self._read_sum / max(self._read_n, 1)

    def bytes_stored(self) -> int:
        """Every real (non-padding) entry's K/V payload plus its position (int64) and shard membership
        (one bool per shard), the by_score running sums, and the unsharded layers' positions."""
        full = sum(int((p >= 0).sum()) for i, p in enumerate(self.key_pos) if p is not None and i not in self._stores)
        sharded = sum(s.entries()[0] for s in self._stores.values())
        meta = sharded * (8 + self.n_shards) + full * 8
        sums = sum(s.key_sum.numel() * s.key_sum.element_size() + s.key_cnt.numel() * s.key_cnt.element_size()
                   for s in self._stores.values()) if self.cfg.read_mode == "by_score" else 0
        return (full + sharded) * self._bytes_per_entry + meta + sums

    def bytes_allocated(self) -> int:
        """K/V bytes including the padding of ragged per-row shard stores."""
        return KVCache.bytes_stored(self) + sum(s.entries()[1] for s in self._stores.values()) * (self._bytes_per_entry + 8 + self.n_shards)

    def bytes_per_token(self) -> float:
        """Bytes per cached token (all layers, payload and metadata); a full cache's payload is
        n_layer * 2 * H_kv * hd * elem."""
        return self.bytes_stored() / max(self._tokens, 1)

    def stats(self) -> dict[str, float]:
        return {"router/kv_read_fraction": self.read_fraction(), "cache/bytes_per_token": self.bytes_per_token()}
