"""FlexGen (Sheng et al., 2023): KV placement between device and host, 4-bit KV compression, sparse values.

Placement: the budget is the part of the KV cache kept in device memory; the most recent ``budget``
tokens of every layer stay on the compute device and older ones are moved to ``offload_device`` (host
memory), from where attention reads them back at each step. Nothing is evicted. Two deviations from
FlexGen: (a) FlexGen splits the cache by (batch x head) segments (``cache_gpu_percent``); here the split
is by token age, so the budget means tokens as in the other policies and the hot recent tokens stay on
the device; (b) the host part is copied back inside the layer's own ``update`` (``non_blocking`` from
pinned memory, but on the current stream and re-concatenated each step), not prefetched for the next
layer on a side stream by FlexGen's overlapped zig-zag schedule. This is the reference placement that
the tests hold to the dense output and byte counts, not FlexGen's I/O-optimised engine.

Compression (``kv_bits: 4``, FlexGen's ``compress_cache``): stored keys and values are quantized
group-wise along the head dimension (``kv_group_size`` 64, asymmetric min/max, two codes per byte;
:mod:`pikv_train.cache.quant`), so the cache really holds codes + per-group min and scale. As in
FlexGen's decode step, a query reads the *dequantized* keys/values of earlier tokens and its own key
and value exact. The training forward computes exactly that with a straight-through gradient: keys
``[Q(k) ; k]`` (2T), row t reading ``Q(k)_j`` for j < t and ``k_t`` (so the backward trains the model
for the quantization it will decode with). FlexGen's prefill reads the prompt uncompressed; here every
prompt row follows the decode rule too, so training, prefill and token-by-token decoding agree exactly.

Sparse attention (``attn_sparsity`` s < 1, FlexGen's ``attn_sparsity``): after the softmax over all
visible keys, a query keeps the weights of its top ``int(s * n_past)`` earlier keys plus its own key and
drops the rest without renormalising (FlexGen's ``_sparse_attention_value``, which reads only those
values from host memory). Training forward and inference cache use the same function, on every row:
FlexGen applies it at decode steps only and runs the prompt dense, so prefill rows differ from FlexGen's
(and match the training forward and token-by-token decoding exactly).

With a storage compressor (``cache.compressor``; ``kv_bits`` must then be 0) the parts hold its codes; a
versioned one (KIVI, MiKV), whose stored form of a token depends on the reading position, keeps per-(sequence,
kv-head) stores that FlexGen places between device and host (:mod:`pikv_train.cache.policies.flexgen_stores`),
and sparse values are taken over the keys as each row reads them (:func:`sparse_attention_versions`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pikv_train.cache.kv_cache import KVCache, causal_position_mask
from pikv_train.cache.policies.base import CachePolicy, _sdpa, causal_mask
from pikv_train.cache.quant import GroupQuantized, bytes_per_vector, fake_quantize, group_dequantize, group_quantize
from pikv_train.errors import RollbackError


def sparse_keep(p: Tensor, vis: Tensor, own: Tensor, sparsity: float) -> Tensor:
    """FlexGen's kept weights: own key + the top ``int(s * n_past)`` past keys of each row by weight ``p``.

    p (B, H, Tq, S) softmax weights; vis, own (B|1, H|1, Tq, S) bool. Returns (B, H, Tq, S) bool (no gradient).
    """
    with torch.no_grad():
        past = vis & ~own
        # FlexGen: int(attn_sparsity * (src_s - 1)) in Python doubles; fp32 would round 0.7 * 90 to 63, not 62.
        n_keep = (past.sum(-1, keepdim=True).double() * sparsity).floor()
        order = p.masked_fill(~past, -1.0).argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(p.shape[-1], device=p.device).expand_as(order))
        return (past & (rank < n_keep)) | (own & vis)


def _rep(m: Tensor, g: int) -> Tensor:
    """(B|1, H_kv|1, ...) -> per query head (kv-head masks repeated ``g`` times)."""
    return m.repeat_interleave(g, 1) if m.shape[1] > 1 and g > 1 else m


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, vis: Tensor, own: Tensor, sparsity: float) -> Tensor:
    """FlexGen sparse attention: softmax over ``vis``, keep own key + top ``int(s * n_past)`` past keys.

    Args:
        q (B, H, Tq, hd); k, v (B, H_kv, S, hd); vis (B|1, 1|H_kv, Tq, S) bool readable keys;
        own (B|1, 1|H_kv, Tq, S) bool the query's own key (always kept, not counted as past).
    Returns (B, H, Tq, hd); the kept weights are not renormalised.
    """
    b, h, tq, d = q.shape
    g = h // k.shape[1]
    vis, own = _rep(vis, g), _rep(own, g)
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    p = (q @ kk.transpose(-1, -2) / math.sqrt(d)).masked_fill(~vis, float("-inf")).softmax(-1)  # (B, H, Tq, S)
    return (p * sparse_keep(p, vis, own, sparsity)) @ vv


def sparse_attention_versions(q: Tensor, versions, vis: Tensor, sparsity: float) -> Tensor:
    """:func:`sparse_attention` when row t reads key/value j in a stored form that depends on (t, j) (a versioned
    compressor's :class:`~pikv_train.cache.compression.Versions`: KIVI's residual, MiKV's tiers). The weights
    come from the logits over the keys as each row reads them and multiply the values as it reads them, which is
    what the cache computes over the decoded stored forms. q (B, H, T, hd); vis (B|1, 1|H_kv, T, T) bool causal."""
    b, h, t, d = q.shape
    g = h // versions.keys[0].shape[1]
    to4 = lambda m: m.view((1,) * (4 - m.dim()) + tuple(m.shape))  # noqa: E731  (T, T) selects: every head
    blocks = [(k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), _rep(to4(sel), g)) for k, v, sel in versions.blocks()]
    logits = q.new_zeros(b, h, t, t)
    for k, _, sel in blocks:  # the selects partition the causal pairs
        logits = torch.where(sel, q @ k.transpose(-1, -2) / math.sqrt(d), logits)
    vis = _rep(vis, g)
    own = torch.eye(t, dtype=torch.bool, device=q.device) & vis
    p = logits.masked_fill(~vis, float("-inf")).softmax(-1)  # (B, H, T, T)
    w = p * sparse_keep(p, vis, own, sparsity)
    return sum((w * sel) @ v for _, v, sel in blocks)


class FlexGenCache(KVCache):
    """Full cache split between device (recent ``budget`` tokens) and host memory (the rest), stored
    raw or as 4/8-bit group-quantized codes."""

    def __init__(self, policy, n_layer: int, budget: int):
        super().__init__(n_layer)
        self.policy, self.budget = policy, budget
        cfg = policy.cfg
        self.bits, self.group, self.sparsity = cfg.kv_bits, cfg.kv_group_size, cfg.attn_sparsity
        # Per layer: {"k": Tensor | GroupQuantized, "v": ..., "pos": (B, S)} on the device and on the host.
        self.device_part: list[dict | None] = [None] * n_layer
        self.host_part: list[dict | None] = [None] * n_layer
        self._own: Tensor | None = None
        self.compressor = None  # a per-token KV compressor: the parts hold its codes (``code.<name>``)
        self.sharding = None
        self._routing: dict = {}
        self.shard_state: list[dict] = [{} for _ in range(n_layer)]  # membership (B, S, n_shards), by_score sums

    _shared_attrs = ("policy", "sharding", "compressor")

    def set_compressor(self, compressor) -> None:
        """Store each token as ``compressor`` does (per-token compressors; a versioned one gets
        :class:`~pikv_train.cache.policies.flexgen_stores.FlexGenStoreCache` from ``FlexGenScheduler.new_cache``)."""
        if getattr(compressor, "versioned", False):
            raise TypeError(f"FlexGenCache stores batched per-token codes; {compressor.name} is versioned: build the "
                            "cache with FlexGenScheduler.new_cache (a FlexGenStoreCache)")
        self.compressor = compressor

    def set_sharding(self, sharding) -> None:
        """Read through expert-sharded placement (each key stored once, with its shard membership)."""
        self.sharding = sharding

    def record_routing(self, layer_idx: int, routing) -> None:
        self._routing[layer_idx] = routing

    def _shard_allow(self, layer_idx, q, k, q_pos, kp) -> Tensor | None:
        """(B, 1 | H_kv, Tq, S) sharding visibility of the new queries over every stored key, or None."""
        prev = self._routing.get(layer_idx - 1) if self.sharding is not None else None
        if prev is None:
            return None
        from pikv_train.cache.sharding import batched_reads, shard_freshness, shard_membership, shard_visibility

        sh, st = self.sharding, self.shard_state[layer_idx]
        b, _, tq, _ = k.shape
        member = shard_membership(prev.ids, prev.valid, sh.n_shards).view(b, tq, -1) & (q_pos >= 0)[..., None]
        st["mem"] = member if "mem" not in st else torch.cat([st["mem"], member], 1)
        reads = batched_reads(sh, q, k, member, st)
        fresh = None
        if sh.cfg.shard_budget is not None:  # per-shard budgets: member counts at each key's position
            cnt = (st["scnt"][:, None] if "scnt" in st else 0) + member.long().cumsum(1)  # (B, Tq, S)
            st["midx"] = cnt if "midx" not in st else torch.cat([st["midx"], cnt], 1)
            st["scnt"] = cnt[:, -1]
            fresh = shard_freshness(cnt, st["midx"], sh.cfg.shard_budget)[:, None]  # (B, 1, Tq, S_all, n_shards)
        return shard_visibility(q_pos[:, None], kp[:, None], st["mem"][:, None], reads, sh.cfg.n_sink, sh.cfg.window,
                                fresh)

    def __len__(self) -> int:
        return sum(0 if p[0] is None else p[0]["pos"].shape[1] for p in (self.device_part, self.host_part))

    @staticmethod
    def _nbytes(part: dict | None) -> int:
        if part is None:
            return 0
        return sum(x.nbytes() if isinstance(x, GroupQuantized) else x.numel() * x.element_size()
                   for name, x in part.items() if name != "pos")

    def bytes_on_device(self) -> int:
        return sum(self._nbytes(p) for p in self.device_part)

    def bytes_on_host(self) -> int:
        return sum(self._nbytes(p) for p in self.host_part)

    def bytes_stored(self) -> int:
        """Keys and values (codes, mins, scales when quantized), positions and shard state, both memories."""
        pos = sum(p["pos"].numel() * p["pos"].element_size() for parts in (self.device_part, self.host_part)
                  for p in parts if p is not None)
        from pikv_train.cache.policies.base import tensor_bytes

        return self.bytes_on_device() + self.bytes_on_host() + pos + tensor_bytes(self.shard_state) + tensor_bytes(self.extra)

    # -- storage helpers: every tensor has its token axis at dim 2 (positions: dim 1)
    def _pack(self, k: Tensor, v: Tensor, pos: Tensor, codes: dict | None = None) -> dict:
        if self.compressor is not None:
            return {**{"code." + n: c for n, c in codes.items()}, "pos": pos}
        if self.bits:
            return {"k": group_quantize(k, self.bits, self.group), "v": group_quantize(v, self.bits, self.group), "pos": pos}
        return {"k": k, "v": v, "pos": pos}

    @staticmethod
    def _map(fn, *parts: dict) -> dict:
        """Combine stored parts field by field: ``fn([tensors], token_dim)`` (quantized fields per member)."""
        out = {}
        for name, x in parts[0].items():
            xs = [p[name] for p in parts]
            if isinstance(x, GroupQuantized):
                members = (fn([getattr(y, f) for y in xs], 2) for f in ("codes", "mn", "scale"))
                out[name] = GroupQuantized(*members, x.bits, x.group_size, x.dim)
            else:
                out[name] = fn(xs, 1 if name == "pos" else 2)
        return out

    @staticmethod
    def _cat(a: dict | None, b: dict) -> dict:
        return b if a is None else FlexGenCache._map(lambda ts, d: torch.cat(ts, d), a, b)

    def _read(self, x) -> Tensor:
        return group_dequantize(x) if isinstance(x, GroupQuantized) else x

    def _read_kv(self, layer_idx: int, full: dict) -> tuple[Tensor, Tensor]:
        if self.compressor is None:
            return self._read(full["k"]), self._read(full["v"])
        codes = {n[5:]: c for n, c in full.items() if n.startswith("code.")}
        return self.compressor.decode_batched(layer_idx, codes, full["pos"])

    def update(self, layer_idx, q, k, v, q_pos, codes: dict | None = None):
        dev = self._cat(self.device_part[layer_idx], self._pack(k, v, q_pos, codes))
        host = self.host_part[layer_idx]
        # Read the host part back (overlaps compute on CUDA: non_blocking from pinned memory).
        full = dev if host is None else self._cat(self._map(lambda ts, d: ts[0].to(k.device, non_blocking=True), host), dev)
        (keys, values), kp = self._read_kv(layer_idx, full), full["pos"]
        tq = q_pos.shape[1]
        eye = torch.eye(tq, dtype=torch.bool, device=k.device).expand(q_pos.shape[0], 1, tq, tq)
        if self.bits:  # earlier tokens dequantized, the query's own key/value exact: keys [Q(all) ; new]
            past = (kp[:, None, None, :] >= 0) & (kp[:, None, None, :] < q_pos[:, None, :, None])
            keys, values = torch.cat([keys, k], 2), torch.cat([values, v], 2)
            allow = self._shard_allow(layer_idx, q, k, q_pos, kp)
            past = past if allow is None else past & allow
            mask = torch.cat([past, eye.expand(-1, past.shape[1], -1, -1)], -1)
            self._own = torch.cat([torch.zeros_like(past), eye.expand(-1, past.shape[1], -1, -1)], -1)
        else:
            mask = causal_position_mask(q_pos, kp)
            allow = self._shard_allow(layer_idx, q, k, q_pos, kp)
            if allow is not None:
                mask = mask & allow | (q_pos < 0)[:, None, :, None] & mask  # padded queries keep their one slot
            self._own = (kp[:, None, None, :] == q_pos[:, None, :, None]) & (q_pos >= 0)[:, None, :, None]
        over = dev["pos"].shape[1] - self.budget
        if over > 0:  # move the oldest device tokens to the host
            target = torch.device(self.policy.cfg.offload_device)
            pin = torch.cuda.is_available() and target.type == "cpu"
            moved = self._map(lambda ts, d: ts[0].narrow(d, 0, over).to(target), dev)
            host = self._cat(host, moved)
            if pin:  # torch.cat returns pageable memory: pin the grown host part again
                host = self._map(lambda ts, d: ts[0].pin_memory(), host)
            self.host_part[layer_idx] = host
            dev = self._map(lambda ts, d: ts[0].narrow(d, over, ts[0].shape[d] - over), dev)
        self.device_part[layer_idx] = dev
        return keys, values, mask

    def rollback(self, keep_until: Tensor) -> None:
        if self.sharding is not None:
            raise RollbackError(
                "FlexGenCache with expert sharding cannot roll back by hiding positions (the shard summaries "
                "include the discarded keys); take cache.snapshot() before the speculative tokens and restore() it"
            )
        for parts in (self.device_part, self.host_part):
            for p in parts:
                if p is not None:
                    kp = p["pos"]
                    p["pos"] = torch.where(kp > keep_until.to(kp.device)[:, None], torch.full_like(kp, -1), kp)

    def attend(self, q, k, v, mask):
        if self.sparsity >= 1:
            return None
        return sparse_attention(q, k, v, mask, self._own, self.sparsity)


class FlexGenScheduler(CachePolicy):
    """Device/host placement of the KV cache, optional 4-bit KV compression and sparse values."""

    evicts = False
    skips_when_budget_covers = False  # the budget places memory; compression and sparsity still apply

    @property
    def cache_cls(self):
        """The batched device/host cache; per-(sequence, kv-head) stores under a versioned compressor (KIVI,
        MiKV), whose stored forms change with the reading position."""
        if getattr(self.compressor, "versioned", False):
            from pikv_train.cache.policies.flexgen_stores import FlexGenStoreCache

            return FlexGenStoreCache
        return FlexGenCache

    def mask(self, q, k, ctx, budget):
        return None  # placement and compression do not change which keys are read

    def mask_mod(self, q, k, ctx, budget):
        return None

    def bytes_per_token_head(self, k: Tensor) -> float:
        hd, es = k.shape[-1], k.element_size()
        if self.compressor is not None:
            return super().bytes_per_token_head(k)
        if self.cfg.kv_bits:
            return 2 * bytes_per_vector(hd, self.cfg.kv_bits, self.cfg.kv_group_size, es)
        return 2 * hd * es

    def log_stats(self, ctx, m, budget, k):
        super().log_stats(ctx, m, budget, k)
        t = k.shape[2]
        ctx.stats["cache/device_fraction"] = torch.tensor(min(budget, t) / t)

    def attend(self, q, k, v, mask, ctx):
        cfg = self.cfg
        if not cfg.kv_bits and cfg.attn_sparsity >= 1:
            return super().attend(q, k, v, mask, ctx)
        t = q.shape[2]
        vis = causal_mask(t, q.device)[None, None] if mask is None else mask
        if getattr(ctx, "versions", None) is not None:  # a versioned compressor (kv_bits is refused beside it)
            return sparse_attention_versions(q, ctx.versions, vis, cfg.attn_sparsity)
        eye = torch.eye(t, dtype=torch.bool, device=q.device).expand_as(vis)
        if cfg.kv_bits:  # keys [Q(k) ; k]: earlier tokens quantized (straight-through), own key exact
            keys = torch.cat([fake_quantize(k, cfg.kv_bits, cfg.kv_group_size), k], 2)
            values = torch.cat([fake_quantize(v, cfg.kv_bits, cfg.kv_group_size), v], 2)
            vis, own = torch.cat([vis & ~eye, eye], -1), torch.cat([torch.zeros_like(eye), eye], -1)
        else:
            keys, values, own = k, v, eye
        if cfg.attn_sparsity < 1:
            return sparse_attention(q, keys, values, vis, own, cfg.attn_sparsity)
        if self._flex(q) and mask is None:
            from pikv_train.cache.policies.flex import flex_attend

            mm = lambda b, h, qi, ki: (ki < qi) | (ki - t == qi)  # noqa: E731
            return flex_attend(q, keys, values, mm, causal=False)
        return _sdpa(q, keys, values, vis)
