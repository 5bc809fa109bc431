"""Shared machinery of the scheduling policies: budget resolution, the policy hook, the per-head cache.

A policy is ONE object (an :class:`~pikv_train.models.hooks.AttentionHook`): ``training_mask`` gives the
visibility matrix M[t, j] per kv-head for the training forward, and ``new_cache`` builds the inference
cache that appends, evicts and selects by the same rule. Masks are (B|1, H_kv|1, T, T) bool, True = may
read, causal, diagonal kept. On CUDA the mask is never built densely: ``attend`` runs FlexAttention
with a block mask from the policy's ``mask_mod`` (see :mod:`pikv_train.cache.policies.flex`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pikv_train.cache.config import CacheConfig
from pikv_train.cache.kv_cache import KVCache
from pikv_train.errors import ConfigError
from pikv_train.models.hooks import AttentionContext, AttentionHook


def resolve_budget(budget: float, seq_len: int | None) -> int:
    """Budget in tokens: a fraction (<= 1) of ``seq_len``, or a token count (> 1)."""
    if budget > 1:
        return int(budget)
    if seq_len is None:
        raise ConfigError(
            "a fractional cache.budget needs a reference length: run a forward first, set "
            "cache.reference_len, pass new_cache(n_layer, seq_len=...), or give the budget in tokens"
        )
    return max(1, int(round(budget * seq_len)))


@torch.no_grad()
def dense_probs(q: Tensor, k: Tensor, row0: int = 0, row1: int | None = None) -> Tensor:
    """(B, H_kv, R, T) fp32 causal softmax attention of query rows [row0, row1) (all by default) over
    every key, averaged over each kv-head's query group (no grad). Row blocks bound the memory of the
    scoring passes: R x T per head instead of T x T."""
    b, h, t, d = q.shape
    hkv = k.shape[1]
    row1 = t if row1 is None else row1
    qg = q[:, :, row0:row1].float().reshape(b, hkv, h // hkv, row1 - row0, d) * (1.0 / math.sqrt(d))
    logits = qg @ k.float()[:, :, None].transpose(-1, -2)  # (B, H_kv, g, R, T), fresh: fill in place
    causal = torch.arange(t, device=q.device)[None] <= torch.arange(row0, row1, device=q.device)[:, None]
    return logits.masked_fill_(~causal, float("-inf")).softmax(-1).mean(2)


def top_n_mask(score: Tensor, n: Tensor | int, tiebreak: Tensor) -> Tensor:
    """Bool mask of the n best entries along the last dim (-inf never chosen).

    Exact ties are broken by the larger ``tiebreak`` (e.g. the more recent position), so two
    implementations that compute the same scores choose the same set.
    """
    order = torch.argsort(tiebreak.expand_as(score), dim=-1, descending=True, stable=True)
    s = score.gather(-1, order)
    order = order.gather(-1, torch.argsort(s, dim=-1, descending=True, stable=True))
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(score.shape[-1], device=score.device).expand_as(order))
    n = torch.as_tensor(n, device=score.device)
    while n.dim() < score.dim():
        n = n.unsqueeze(-1)
    return (rank < n) & torch.isfinite(score)


def causal_mask(t: int, device) -> Tensor:
    return torch.ones(t, t, dtype=torch.bool, device=device).tril()


class CachePolicy(AttentionHook):
    """Base of the eight schedulers: budget, stats under ``cache/``, CUDA FlexAttention dispatch.

    Subclasses implement ``mask(q, k, ctx, budget)`` (the CPU training mask) and ``_step`` of their
    cache; ``mask_mod`` gives the FlexAttention form on CUDA.
    """

    evicts = True  # eviction policy (C3 applies) vs selection/placement policy

    def __init__(self, cfg: CacheConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg or CacheConfig()
        if overrides:
            cfg = CacheConfig.from_dict({**{f: getattr(cfg, f) for f in cfg.__dataclass_fields__}, **overrides})
        self.cfg = cfg.validate()
        self.seq_len: int | None = cfg.reference_len
        self.use_flex: bool | None = None  # None: FlexAttention on CUDA, SDPA + bool mask elsewhere

    # ------------------------------------------------------------------ budget
    def budget_tokens(self, seq_len: int | None) -> int:
        return resolve_budget(self.cfg.budget, seq_len)

    # ------------------------------------------------------------------ training
    def mask(self, q: Tensor, k: Tensor, ctx: AttentionContext, budget: int) -> Tensor | None:
        raise NotImplementedError

    def _flex(self, q: Tensor) -> bool:
        return q.is_cuda if self.use_flex is None else self.use_flex

    def training_mask(self, q: Tensor, k: Tensor, ctx: AttentionContext) -> Tensor | None:
        t = q.shape[2]
        if self.cfg.reference_len is None:
            self.seq_len = t  # fractional budgets of the inference cache refer to the last length seen
        if self._flex(q):
            return None  # the mask is built as a FlexAttention block mask in ``attend``
        budget = self.budget_tokens(t)
        m = self.mask(q, k, ctx, budget)
        self.log_stats(ctx, m, budget, k)
        return m

    def attend(self, q, k, v, mask, ctx):
        if not self._flex(q):
            return None
        from pikv_train.cache.policies.flex import flex_attend

        budget = self.budget_tokens(q.shape[2])
        if mask is not None:  # another hook produced a dense mask: AND ours in and use SDPA
            m = self.mask(q, k, ctx, budget)
            return None if m is None else _sdpa(q, k, v, mask & m)
        return flex_attend(q, k, v, self.mask_mod(q, k, ctx, budget))

    def mask_mod(self, q: Tensor, k: Tensor, ctx: AttentionContext, budget: int):
        """FlexAttention form: ``f(b, h_kv, q_idx, kv_idx) -> bool`` (causality is added by the caller).

        Default: index the dense mask (correct, but dense); positional/paged/chunked policies override
        it with compact tensors.
        """
        m = self.mask(q, k, ctx, budget)
        if m is None:
            return None
        return lambda b, h, qi, ki: m[b if m.shape[0] > 1 else 0, h if m.shape[1] > 1 else 0, qi, ki]

    @torch.no_grad()
    def log_stats(self, ctx: AttentionContext, m: Tensor | None, budget: int, k: Tensor) -> None:
        """cache/kept_fraction, budget_use (mean and worst kv-head), evictions, bytes_stored (averaged
        over layers, bytes summed over layers), per sequence."""
        b, hkv, t, hd = k.shape
        causal_n = torch.arange(1, t + 1, device=k.device, dtype=torch.float32)
        if m is None:
            vis = causal_n.expand(b, hkv, t)
        else:
            vis = m.expand(b, hkv, t, t).sum(-1).float()  # (B, H_kv, T)
        full = vis[..., min(budget, t) - 1:]
        per_head_use = (full / budget).mean((0, 2))  # (H_kv,)
        last = vis[..., -1] if self.evicts else causal_n[-1].expand(b, hkv)
        vals = {
            "cache/kept_fraction": (vis / causal_n).mean(),
            "cache/budget_use": per_head_use.mean(),
            "cache/budget_use_max_head": per_head_use.max(),
            "cache/evictions": (t - last).mean() * hkv,
        }
        n = ctx.layer_idx
        for key, v in vals.items():
            prev = ctx.stats.get(key)
            ctx.stats[key] = v if prev is None or n == 0 else (prev * n + v) / (n + 1)
        stored = last.sum(1).mean() * self.bytes_per_token_head(k)
        ctx.stats["cache/bytes_stored"] = stored if n == 0 else ctx.stats.get("cache/bytes_stored", 0) + stored

    def bytes_per_token_head(self, k: Tensor) -> int:
        """Cache bytes of one token's key + value in one kv-head (FlexGen overrides for compression)."""
        return 2 * k.shape[-1] * k.element_size()

    # ------------------------------------------------------------------ inference
    def new_cache(self, n_layer: int, seq_len: int | None = None, sharding=None) -> "PolicyCache":
        """The inference cache driven by this policy (``generate(..., cache_factory=policy.new_cache)``);
        with ``sharding`` (an :class:`~pikv_train.cache.sharding.ExpertShardedKV`) queries read through the
        expert-sharded rule as well (``Decoder.new_cache`` passes the model's)."""
        cache = self.cache_cls(self, n_layer, self.budget_tokens(seq_len or self.seq_len))
        if sharding is not None:
            cache.set_sharding(sharding)
        return cache

    cache_cls: type = None  # set by subclasses


def _sdpa(q, k, v, mask):
    from pikv_train.models.attention import attend

    return attend(q, k, v, mask, q.shape[1] // k.shape[1])


class PolicyCache(KVCache):
    """Inference cache with per-(sequence, kv-head) storage, so per-head budgets really shrink memory.

    ``store[layer][b][h]`` holds ``k``, ``v`` (S_bh, hd) and ``pos`` (S_bh,) plus policy state. ``update``
    hands each (b, h) the stored keys followed by the new ones; the policy's ``_step`` returns which of
    them each new query reads and which stay stored. The returned tensors are padded to the longest
    head for SDPA (padding is masked and not stored).
    """

    def __init__(self, policy: CachePolicy, n_layer: int, budget: int):
        super().__init__(n_layer)
        self.policy, self.budget = policy, budget
        self.store: list[list[list[dict]] | None] = [None] * n_layer

    def __len__(self) -> int:
        return 0 if self.store[0] is None else max(len(s["pos"]) for row in self.store[0] for s in row)

    def bytes_stored(self) -> int:
        return sum(
            s["k"].numel() * s["k"].element_size() + s["v"].numel() * s["v"].element_size()
            for layer in self.store if layer is not None for row in layer for s in row
        )

    def head_lengths(self, layer_idx: int) -> Tensor:
        """(B, H_kv) number of stored keys per sequence and kv-head."""
        return torch.tensor([[len(s["pos"]) for s in row] for row in self.store[layer_idx]])

    def new_state(self, layer_idx: int, h: int, k: Tensor) -> dict:
        hd = k.shape[-1]
        return {"k": k.new_zeros(0, hd), "v": k.new_zeros(0, hd), "pos": torch.zeros(0, dtype=torch.long, device=k.device)}

    def update(self, layer_idx, q, k, v, q_pos):
        b, hkv, tq, hd = k.shape
        g = q.shape[1] // hkv
        if self.store[layer_idx] is None:
            self.store[layer_idx] = [[self.new_state(layer_idx, h, k) for h in range(hkv)] for _ in range(b)]
        keys, vals, masks = [], [], []
        for bi in range(b):
            real = q_pos[bi] >= 0
            sts = self.store[layer_idx][bi]
            n_old = [len(s["pos"]) for s in sts]
            k_all = [torch.cat([s["k"], k[bi, h][real]]) for h, s in enumerate(sts)]
            v_all = [torch.cat([s["v"], v[bi, h][real]]) for h, s in enumerate(sts)]
            p_all = [torch.cat([s["pos"], q_pos[bi][real]]) for s in sts]
            qb = q[bi].view(hkv, g, tq, hd)[:, :, real]  # (H_kv, g, Tr, hd)
            rows, keeps = self._step_b(layer_idx, sts, qb, k_all, p_all, n_old)
            for h, s in enumerate(sts):
                s["k"], s["v"], s["pos"] = k_all[h][keeps[h]], v_all[h][keeps[h]], p_all[h][keeps[h]]
                # Padded queries (position -1) read only their own (unstored) slot.
                pad_rows = (~real).nonzero().flatten()
                n_all = len(p_all[h])
                m = torch.zeros(tq, n_all + len(pad_rows), dtype=torch.bool, device=k.device)
                m[real, :n_all] = rows[h]
                m[pad_rows, n_all + torch.arange(len(pad_rows), device=k.device)] = True
                keys.append(torch.cat([k_all[h], k[bi, h][~real]]))
                vals.append(torch.cat([v_all[h], v[bi, h][~real]]))
                masks.append(m)
        s_max = max(x.shape[0] for x in keys)
        pad = lambda x: torch.nn.functional.pad(x, (0, 0, 0, s_max - x.shape[0]))  # noqa: E731
        kk = torch.stack([pad(x) for x in keys]).view(b, hkv, s_max, hd)
        vv = torch.stack([pad(x) for x in vals]).view(b, hkv, s_max, hd)
        mm = torch.stack([torch.nn.functional.pad(x, (0, s_max - x.shape[1])) for x in masks]).view(b, hkv, tq, s_max)
        return kk, vv, mm

    def _step_b(self, layer_idx, states, qb, k_all, p_all, n_old):
        """One sequence, all kv-heads: default runs ``_step`` per head."""
        rows, keeps = [], []
        for h, st in enumerate(states):
            r, kp = self._step(layer_idx, h, st, qb[h], k_all[h], p_all[h], n_old[h])
            rows.append(r)
            keeps.append(kp)
        return rows, keeps

    def _step(self, layer_idx, h, st, q, k_all, p_all, n_old) -> tuple[Tensor, Tensor]:
        """One (sequence, kv-head). q (g, Tr, hd) new queries; k_all (S, hd) stored + new keys; p_all (S,).

        Returns (Tr, S) bool visibility and (S,) bool keep-after-step.
        """
        raise NotImplementedError
