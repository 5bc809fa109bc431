"""Expert-sharded KV placement (SPEC §3): settings, the shared visibility rule and the training hook.

Each sharded layer's KV cache is split into ``n_shards`` shards (default one per expert; expert ``e``
lives in shard ``e % n_shards``). Token j's key/value is placed in the shards ``S_j`` of the experts it was
routed to by the MoE router of the **previous** layer (attention of layer l runs before layer l's MoE, so
layer l's own routing of token j does not exist yet when its key is written). Layer 0 has no previous
router and is never sharded. Query t reads the shards ``R_t`` plus the first ``n_sink`` positions and a
local window of the ``window`` most recent positions (itself included):

    visible[t, j] = (j <= t) and (S_j ∩ R_t != ∅  or  j < n_sink  or  t - j < window)

``S_j`` uses the *valid* (not capacity-dropped) expert ids of layer l-1, so with PiKVRouter or
AdaptiveRouter a token with a smaller k occupies fewer shards. ``R_t`` (``read_mode``):

* ``by_routing``: the query's own valid expert ids from layer l-1 (the same shards it is written to).
  One mask per sequence, shared by every kv-head.
* ``by_score`` (MoBA-style): per kv-head, the ``read_shards`` shards with the largest
  ``q̄_t · mean{k_j : j <= t, shard in S_j}``, where ``q̄_t`` is the sum of the group's query heads
  (GQA) for token t, and the mean key runs over all keys of the shard up to and including t (causal).
  Empty shards score -inf. Ties go to the lower shard index.

Both are causal: row t depends on routing / keys of positions <= t only.

The inference side: the deployed cache (``Decoder.new_cache()``) stores each key once with its membership
and composes with the cache policy (:mod:`pikv_train.cache.compose`, ``PolicyCache``);
:class:`pikv_train.cache.sharded_cache.ShardedKVCache` is the per-shard physical layout (a copy per shard).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from pikv_train.errors import ConfigError
from pikv_train.models.hooks import AttentionContext, AttentionHook


@dataclass
class ShardingConfig:
    """Expert-sharded KV placement: each key lives in the shards of its routed experts (SPEC §3)."""

    enabled: bool = False
    """Turn sharded KV placement on (MoE students only)."""
    n_shards: int | None = None
    """Shards per layer; None = one per expert. Expert e is stored in shard e % n_shards."""
    n_sink: int = 4
    """The first n_sink positions are always readable (attention sinks)."""
    window: int = 16
    """Local window w: keys with t - j < w are always readable (w >= 1 keeps the diagonal)."""
    read_mode: Literal["by_routing", "by_score"] = "by_routing"
    """How a query picks its shards R_t: its own layer l-1 experts (by_routing) or the top shards by
    q_t · mean key of the shard over keys <= t (by_score, MoBA-style)."""
    read_shards: int | None = None
    """by_score only: shards read per query; None = the router's top_k."""
    shard_budget: int | None = None
    """Per-shard budget (SPEC §3): each shard keeps only its ``shard_budget`` most recent member keys; an
    older key is no longer read through that shard (sinks and the local window stay readable). Without a
    cache policy the deployed cache drops a key once no shard, sink or window shows it; with a policy the
    policy's budget bounds storage. None = unbounded shards."""


def _check(cfg: ShardingConfig, n_experts: int) -> int:
    n_shards = cfg.n_shards or n_experts
    if not 1 <= n_shards <= n_experts:
        raise ConfigError(f"model.init_args.kv_sharding.n_shards={cfg.n_shards} must be between 1 and n_experts={n_experts}; "
                          "set it in that range, or null for one shard per expert")
    if cfg.window < 1:
        raise ConfigError(f"model.init_args.kv_sharding.window={cfg.window} must be >= 1 (a query must see itself)")
    if cfg.n_sink < 0:
        raise ConfigError(f"model.init_args.kv_sharding.n_sink={cfg.n_sink} must be >= 0")
    if cfg.read_mode not in ("by_routing", "by_score"):
        raise ConfigError(f"model.init_args.kv_sharding.read_mode must be 'by_routing' or 'by_score', got {cfg.read_mode!r}")
    if cfg.shard_budget is not None and cfg.shard_budget < 1:
        raise ConfigError(f"model.init_args.kv_sharding.shard_budget={cfg.shard_budget} must be >= 1 (or null: unbounded shards)")
    if cfg.read_shards is not None and not 1 <= cfg.read_shards <= n_shards:
        raise ConfigError(f"model.init_args.kv_sharding.read_shards={cfg.read_shards} must be between 1 and n_shards={n_shards}")
    return n_shards


def shard_membership(ids: Tensor, valid: Tensor, n_shards: int) -> Tensor:
    """Shards each token is stored in: (..., K) expert ids + validity -> (..., n_shards) bool."""
    shard = ids % n_shards
    # One extra "trash" column absorbs invalid slots, then is dropped.
    tgt = torch.where(valid, shard, torch.full_like(shard, n_shards))
    member = torch.zeros(*shard.shape[:-1], n_shards + 1, dtype=torch.bool, device=shard.device)
    member.scatter_(-1, tgt, True)
    return member[..., :n_shards]


def top_shards(scores: Tensor, n_read: int) -> Tensor:
    """(..., S) shard scores -> (..., S) bool, True on the ``n_read`` best (ties to the lower index)."""
    s = scores.shape[-1]
    # A stable descending sort keeps equal scores in index order: ties go to the lower index.
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    return chosen.scatter_(-1, order[..., :n_read], True) if n_read < s else torch.ones_like(chosen)


def shard_scores(q_group: Tensor, key_sum: Tensor, key_cnt: Tensor) -> Tensor:
    """MoBA-style shard scores ``q̄ · (key_sum / count)``; empty shards get -inf.

    Args:
        q_group: (B, H_kv, T, hd) group-summed queries.
        key_sum: (B, H_kv, T, S, hd) causal per-shard key sums (keys <= t), float64.
        key_cnt: (B, T, S) causal per-shard key counts.
    Returns:
        (B, H_kv, T, S) float64 scores (summaries and scores in float64 so that the training mask's cumulative
        sums and the caches' running sums choose the same shards).
    """
    mean = key_sum / key_cnt.clamp_min(1)[:, None, :, :, None].to(key_sum.dtype)
    sc = torch.einsum("bhtd,bhtsd->bhts", q_group.double(), mean.double())
    return sc.masked_fill((key_cnt == 0)[:, None], float("-inf"))


def shard_visibility(q_pos: Tensor, k_pos: Tensor, k_mem: Tensor, reads: Tensor, n_sink: int, window: int,
                     fresh: Tensor | None = None) -> Tensor:
    """SPEC §3's rule, the one source for the training mask and every inference cache.

    Args:
        q_pos: (..., Tq) query positions; k_pos: (..., N) key positions (-1 = padding).
        k_mem: (..., N, S) bool shards each key is stored in; reads: (..., Tq, S) bool shards each query reads.
        fresh: (..., Tq, N, S) bool, with a per-shard budget: key j is still among shard s's most recent
            ``shard_budget`` members at query t (see :func:`shard_freshness`); None = unbounded shards.
    Returns:
        (..., Tq, N) bool: ``j <= t`` and (a shard in common that still holds j, or a sink, or inside the
        local window).
    """
    qp, kp = q_pos[..., :, None], k_pos[..., None, :]
    if fresh is None:
        hit = (reads.float() @ k_mem.float().transpose(-1, -2)) > 0
    else:
        hit = (reads[..., :, None, :] & k_mem[..., None, :, :] & fresh).any(-1)
    return (kp <= qp) & (kp >= 0) & (hit | (kp < n_sink) | (qp - kp < window))


def shard_freshness(q_count: Tensor, k_count: Tensor, shard_budget: int) -> Tensor:
    """(..., Tq, N, S) bool: fewer than ``shard_budget`` members of shard s arrived after key j, up to query t.

    Args:
        q_count: (..., Tq, S) members of each shard at positions <= t (all keys ever placed, kept or not).
        k_count: (..., N, S) the same count at key j's own position (j included).
    """
    return (q_count[..., :, None, :] - k_count[..., None, :, :]) < shard_budget


def group_queries(q: Tensor, n_kv_head: int) -> Tensor:
    """(B, H, T, hd) -> (B, H_kv, T, hd): sum of the query heads that share each kv-head."""
    b, h, t, hd = q.shape
    return q.double().view(b, n_kv_head, h // n_kv_head, t, hd).sum(2)


def batched_reads(sharding: "ExpertShardedKV", q: Tensor, k: Tensor, member: Tensor, state: dict) -> Tensor:
    """R_t of new queries in a batched cache: (B, 1 | H_kv, Tq, S) bool.

    Args:
        q: (B, H, Tq, hd) queries; k: (B, H_kv, Tq, hd) keys; member: (B, Tq, S) shards of the new tokens.
        state: the layer's running by_score summaries (``key_sum`` (B, H_kv, S, hd), ``key_cnt`` (B, S)),
            created and updated in place.
    """
    if sharding.cfg.read_mode == "by_routing":
        return member[:, None]
    b, h, tq, hd = k.shape
    if "key_sum" not in state:
        state["key_sum"] = torch.zeros(b, h, sharding.n_shards, hd, dtype=torch.float64, device=k.device)
        state["key_cnt"] = torch.zeros(b, sharding.n_shards, dtype=torch.long, device=k.device)
    key_sum = state["key_sum"][:, :, None] + torch.einsum("bts,bhtd->bhtsd", member.double(), k.double()).cumsum(2)
    key_cnt = state["key_cnt"][:, None] + member.long().cumsum(1)
    state["key_sum"], state["key_cnt"] = key_sum[:, :, -1], key_cnt[:, -1]
    return top_shards(shard_scores(group_queries(q, h), key_sum, key_cnt), sharding.n_read)


class ExpertShardedKV(AttentionHook):
    """Training-forward hook: the SPEC §3 visibility mask from layer l-1 routing (see module docstring).

    Adds to ``ctx.stats``: ``router/kv_read_fraction`` (mean over sharded layers, queries and kv-heads of
    visible keys / causal keys) and ``router/kv_bytes_per_token`` (K/V bytes the deployed cache stores per
    token over all layers: one copy of the key and value, plus one membership flag per shard and kv-head
    on sharded layers).
    """

    def __init__(self, cfg: ShardingConfig, n_experts: int, top_k: int, n_kv_head: int, head_dim: int):
        super().__init__()
        self.cfg = cfg
        self.n_experts = n_experts
        self.n_shards = _check(cfg, n_experts)
        self.n_read = cfg.read_shards or min(top_k, self.n_shards)
        self.n_kv_head = n_kv_head
        self.head_dim = head_dim

    def new_cache(self, n_layer: int):
        """An inference cache implementing the same rule with per-shard storage (a copy of a key in each of
        its shards: the expert-parallel layout). ``Decoder.new_cache()`` deploys the single-copy cache."""
        from pikv_train.cache.sharded_cache import ShardedKVCache

        if self.cfg.shard_budget is not None:
            raise ValueError("the per-shard layout (ShardedKVCache) does not implement kv_sharding.shard_budget; "
                             "decode with model.new_cache() (the deployed cache implements it)")

        return ShardedKVCache(n_layer, self.cfg, self.n_experts, self.n_read)

    def cache_factory(self):
        """``generate(..., cache_factory=hook.cache_factory())``."""
        return self.new_cache

    def _bytes_per_layer(self, k: Tensor) -> float:
        return 2.0 * k.shape[1] * k.shape[-1] * k.element_size()

    def _held(self, pos: Tensor, causal: Tensor, member: Tensor, fresh: Tensor) -> Tensor:
        """(B, 1, T, T) keys a cache without its own eviction (``policy: full``) still holds when row t arrives,
        under per-shard budgets: it drops key j after row t - 1 once no shard holds it (every shard of j has had
        ``shard_budget`` newer members) and it is neither a sink nor in the window (``FullCache._step``)."""
        alive = (fresh & member[:, None]).any(-1)  # (B, T, T): row t, key j still held by one of its shards
        sink = pos[:, None, :] < self.cfg.n_sink
        window = pos[:, :, None] + 1 - pos[:, None, :] < self.cfg.window
        after = causal & (alive | sink | window)  # (B, T, T): kept after row t
        held = torch.zeros_like(after)
        held[:, 1:] = after[:, :-1]
        return held[:, None]

    def training_mask(self, q: Tensor, k: Tensor, ctx: AttentionContext) -> Tensor | None:
        prev = ctx.routing_by_layer.get(ctx.layer_idx - 1)
        stats = ctx.stats
        per_tok = self._bytes_per_layer(k)
        if prev is None:  # layer 0 (or after a dense layer): unsharded, one copy per token
            stats["router/kv_bytes_per_token"] = stats.get("router/kv_bytes_per_token", 0.0) + per_tok
            return None
        b, _, t, _ = k.shape
        with torch.no_grad():
            member = shard_membership(prev.ids, prev.valid, self.n_shards).view(b, t, self.n_shards)
            pos = ctx.positions
            causal = (pos[:, None, :] <= pos[:, :, None]) & (pos[:, None, :] >= 0)  # (B, T, T)
            fresh = None
            if self.cfg.shard_budget is not None:
                cnt = member.long().cumsum(1)  # (B, T, S) members of each shard up to each position
                fresh = shard_freshness(cnt, cnt, self.cfg.shard_budget)  # (B, T, T, S)
                ctx.scratch["shard_held"] = self._held(pos, causal, member, fresh)
            if self.cfg.read_mode == "by_routing":
                mask = shard_visibility(pos, pos, member, member, self.cfg.n_sink, self.cfg.window, fresh)[:, None]
            else:
                key_sum = torch.einsum("bjs,bhjd->bhjsd", member.double(), k.double()).cumsum(2)  # (B, H_kv, T, S, hd)
                key_cnt = member.long().cumsum(1)  # (B, T, S)
                reads = top_shards(shard_scores(group_queries(q, self.n_kv_head), key_sum, key_cnt), self.n_read)
                mask = shard_visibility(pos[:, None], pos[:, None], member[:, None], reads, self.cfg.n_sink,
                                        self.cfg.window, None if fresh is None else fresh[:, None])  # (B, H_kv, T, T)
            n_causal = causal.sum(-1).clamp_min(1)[:, None]  # (B, 1, T)
            frac = (mask.sum(-1) / n_causal).mean()
            n = stats.get("_kv_sharded_layers", 0)
            old = stats.get("router/kv_read_fraction", frac.new_zeros(()))
            stats["router/kv_read_fraction"] = (old * n + frac) / (n + 1)
            stats["_kv_sharded_layers"] = n + 1
            flags = k.shape[1] * self.n_shards  # one bool per shard in each kv-head's store
            stats["router/kv_bytes_per_token"] = stats.get("router/kv_bytes_per_token", 0.0) + per_tok + flags
        return mask


def build_sharding(cfg: ShardingConfig | None, model_cfg) -> ExpertShardedKV | None:
    """The sharding hook for ``cfg`` (None when disabled)."""
    if cfg is None or not cfg.enabled:
        return None
    if model_cfg.moe is None:
        raise ConfigError("model.init_args.kv_sharding.enabled=True needs an MoE model (model.moe is not set); "
                          "set the model's moe settings or kv_sharding.enabled false")
    return ExpertShardedKV(
        cfg, model_cfg.moe.n_experts, model_cfg.moe.router.top_k, model_cfg.n_kv_head, model_cfg.head_dim
    )
