"""Shared machinery of the scheduling policies: budget resolution, the policy hook, the per-head cache.

A policy is ONE object (an :class:`~pikv_train.models.hooks.AttentionHook`): ``training_mask`` gives the
visibility matrix M[t, j] per kv-head for the training forward, and ``new_cache`` builds the inference
cache that appends, evicts and selects by the same rule. Masks are (B|1, H_kv|1, T, T) bool, True = may
read, causal, diagonal kept. The mask is built densely only where another hook's mask must be ANDed with
it (expert sharding, a padding mask) or a versioned compressor reads keys in several forms; otherwise
``attend`` runs it sparsely: on CUDA FlexAttention with a block mask from the policy's ``mask_mod``
(:mod:`pikv_train.cache.policies.flex`), elsewhere block-sparse attention over each block's gathered keys,
O(T·(budget + C)) (:mod:`pikv_train.cache.policies.blocks`; StreamingLLM, Quest, H2O, LRU, LRU+, AdaKV).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from pikv_train.cache.config import CacheConfig
from pikv_train.cache.kv_cache import KVCache
from pikv_train.errors import ConfigError, RollbackError
from pikv_train.models.hooks import AttentionContext, AttentionHook


def resolve_budget(budget: float, seq_len: int | None) -> int:
    """Budget in tokens: a fraction (<= 1) of ``seq_len``, or a token count (> 1)."""
    if budget > 1:
        return int(budget)
    if seq_len is None:
        raise ConfigError(
            "a fractional cache.budget needs a fixed reference length: build the policy with the model config "
            "(or attach it to a model: its max_seq_len), set cache.reference_len, or give the budget in tokens"
        )
    return max(1, int(round(budget * seq_len)))


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

    Budgets: a fractional budget resolves against one fixed reference length L, the same in training
    and at inference (never against a padded batch): ``cache.reference_len`` when set, else the model's
    ``max_seq_len`` (taken when the policy is built with the model config or attached to a model).
    A budget of L tokens or more cannot evict anything, so the policy is skipped (no scoring pass) and
    a warning says so once.
    """

    evicts = True  # eviction policy (C3 applies) vs selection/placement policy
    skips_when_budget_covers = True  # budget >= L: the mask is plain causal, skip the scoring pass

    def __init__(self, cfg: CacheConfig | None = None, model_cfg=None, **overrides):
        super().__init__()
        cfg = cfg or CacheConfig()
        if overrides:
            cfg = CacheConfig.from_dict({**{f: getattr(cfg, f) for f in cfg.__dataclass_fields__}, **overrides})
        self.cfg = cfg.validate()
        self.reference_len: int | None = cfg.reference_len or getattr(model_cfg, "max_seq_len", None)
        self.use_flex: bool | None = None  # None: FlexAttention on CUDA, SDPA elsewhere
        # None: block-sparse attention where FlexAttention does not run and the policy has a block plan;
        # False: the dense (T, T) boolean mask (the reference the block path is tested against). FlexAttention
        # is checked first: on CUDA set use_flex = False as well to run the block-sparse path.
        self.use_blocks: bool | None = None
        self._warned_inert = False
        from pikv_train.cache.compression import build_compressor

        # How kept tokens are stored (SPEC §6): a submodule, so trainable factors train and checkpoint with us.
        self.compressor = build_compressor(self.cfg.compressor, model_cfg)

    def bind(self, model_cfg) -> None:
        """Take the model's ``max_seq_len`` as the reference length when none is set yet."""
        if self.reference_len is None:
            self.reference_len = model_cfg.max_seq_len

    def attach(self, model) -> None:
        """Called by ``Decoder.set_cache_policy``: the compressor may initialise from the model's weights."""
        if self.compressor is not None:
            self.compressor.attach(model)

    def detach(self, model) -> None:
        """Called by ``Decoder.set_cache_policy`` when another policy replaces this one."""
        if self.compressor is not None:
            self.compressor.detach(model)

    # ------------------------------------------------------------------ budget
    def budget_tokens(self, seq_len: int | None = None) -> int:
        """The budget in tokens: against ``seq_len`` if given, else the fixed reference length."""
        return resolve_budget(self.cfg.budget, seq_len or self.reference_len)

    # Chunk-sequential policies decide at boundaries: multiples of C below the reference length L, then L
    # and L + multiples of C. L is a boundary, so a budget of L drops nothing in rows < L whatever C is,
    # and rows past L follow the same rule with no key left out of the competition.
    def chunk_starts(self, t: int, c: int, ref_len: int | None = None) -> list[int]:
        """Start rows of the chunks covering rows [0, t)."""
        ref = ref_len or self.reference_len
        if ref is None or t <= ref:
            return list(range(0, t, c))
        return list(range(0, ref, c)) + list(range(ref, t, c))

    def is_boundary(self, t: int, c: int, ref_len: int | None = None) -> bool:
        """Whether row t starts a chunk (decisions are taken before it reads)."""
        ref = ref_len or self.reference_len
        return t % c == 0 if ref is None or t < ref else (t - ref) % c == 0

    def chunk_end(self, s0: int, c: int, ref_len: int | None = None) -> int:
        """One past the last row of the chunk that starts at s0 (the next boundary)."""
        ref = ref_len or self.reference_len
        return min(s0 + c, ref) if ref is not None and s0 < ref else s0 + c

    def capped_chunk(self, window: int) -> int:
        """``cache.chunk_size`` capped at the recent window (every key must be a candidate before it leaves
        the window); warns once when the cap applies, since the configured value then does nothing."""
        c = max(1, min(self.cfg.chunk_size, window))
        if c < self.cfg.chunk_size and not getattr(self, "_warned_chunk", False):
            self._warned_chunk = True
            warnings.warn(f"cache.chunk_size={self.cfg.chunk_size} exceeds the recent window of {window} tokens at "
                          f"this budget; decisions are taken every {c} tokens", stacklevel=3)
        return c

    def row_chunks(self, t: int, c: int, device) -> Tensor:
        """(T,) index of the chunk each row belongs to (into ``chunk_starts(t, c)``)."""
        starts = torch.tensor(self.chunk_starts(t, c), device=device)
        return torch.bucketize(torch.arange(t, device=device), starts, right=True) - 1

    def inert(self, budget: int, t: int) -> bool:
        """True when the budget covers the reference length and the forward is no longer than it: the
        policy cannot change any row, in training or in the cache."""
        ref = self.reference_len
        return self.skips_when_budget_covers and ref is not None and budget >= ref and t <= ref

    # ------------------------------------------------------------------ training
    def mask(self, q: Tensor, k: Tensor, ctx: AttentionContext, budget: int) -> Tensor | None:
        raise NotImplementedError

    def _flex(self, q: Tensor) -> bool:
        return q.is_cuda if self.use_flex is None else self.use_flex

    def _warn_inert(self, budget: int) -> None:
        if not self._warned_inert:
            self._warned_inert = True
            warnings.warn(
                f"cache.policy={self.cfg.policy}: budget {budget} tokens covers the reference length "
                f"{self.reference_len}, so the policy keeps every key and is skipped; set cache.budget below 1.0 "
                "(or below cache.reference_len tokens) to train under it", stacklevel=3,
            )

    def training_mask(self, q: Tensor, k: Tensor, ctx: AttentionContext) -> Tensor | None:
        budget = self.budget_tokens()
        if self.inert(budget, q.shape[2]):
            self._warn_inert(budget)
            self.log_stats(ctx, None, budget, k)
            return None
        versioned = getattr(ctx, "versions", None) is not None or getattr(self.compressor, "versioned", False)
        if self._flex(q) and getattr(ctx, "prior_mask", None) is None and not versioned:
            # The mask is built as a FlexAttention block mask in ``attend``; statistics from the same mask_mod.
            mm = self.mask_mod(q, k, ctx, budget)
            ctx.scratch["policy_mask_mod"] = mm
            b, hkv, t, _ = k.shape
            if mm is not None:  # for detached attention targets (PiKVRouter's importance head): the same mask
                ctx.scratch["policy_dense_mask"] = lambda: dense_from_mask_mod(mm, b, hkv, t, k.device)
            self.log_stats(ctx, None if mm is None else counts_from_mask_mod(mm, b, hkv, t, k.device), budget, k)
            return None
        if self._blocks(q) and getattr(ctx, "prior_mask", None) is None and not versioned:
            # Block-sparse attention (blocks.py): each block of rows reads only its gathered keys, O(T·budget).
            plan = self.block_plan(q, k, ctx, budget)
            if plan is not None:
                b, hkv, t, _ = k.shape
                ctx.scratch["policy_block_plan"] = plan
                ctx.scratch["policy_dense_mask"] = lambda: plan.dense(b, hkv, t)  # detached attention targets
                self.log_stats(ctx, plan.counts(b, hkv, t), budget, k)
                return None
        m = self.mask(q, k, ctx, budget)
        ctx.scratch["policy_own_mask"] = m  # (B|1, 1|H_kv, T, T) or None: what this policy alone lets rows read
        self.log_stats(ctx, None if m is None else m.expand(k.shape[0], k.shape[1], -1, -1).sum(-1), budget, k)
        return m

    def _blocks(self, q: Tensor) -> bool:
        return not self._flex(q) if self.use_blocks is None else self.use_blocks

    def block_plan(self, q: Tensor, k: Tensor, ctx: AttentionContext, budget: int):
        """The block-sparse form of the training mask (:class:`~pikv_train.cache.policies.blocks.BlockPlan`), or
        None where the policy has none (the dense masked path runs). Only called when no other hook restricts
        the rows and no versioned compressor is active."""
        return None

    def attend(self, q, k, v, mask, ctx):
        # Block-sparse or FlexAttention only when ``training_mask`` left the mask to them; with another hook's
        # dense mask (sharding) ours was built densely and ANDed in already, and SDPA runs the result.
        if mask is None and ctx.versions is None and "policy_block_plan" in ctx.scratch:
            from pikv_train.cache.policies.blocks import block_attend

            return block_attend(q, k, v, ctx.scratch["policy_block_plan"])
        if not self._flex(q) or mask is not None or "policy_mask_mod" not in ctx.scratch or ctx.versions is not None:
            return None
        from pikv_train.cache.policies.flex import flex_attend

        return flex_attend(q, k, v, ctx.scratch["policy_mask_mod"])

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
    def log_stats(self, ctx: AttentionContext, vis: Tensor | None, budget: int, k: Tensor) -> None:
        """cache/kept_fraction, budget_use (mean and worst kv-head), evictions, bytes_stored (averaged
        over layers, bytes summed over layers), per sequence. ``vis`` (B, H_kv, T): keys each row reads
        (None: all causal keys)."""
        b, hkv, t, hd = k.shape
        causal_n = torch.arange(1, t + 1, device=k.device, dtype=torch.float32)
        vis = causal_n.expand(b, hkv, t) if vis is None else vis.float()
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
        if self.compressor is not None and n == 0:  # bytes per token vs the uncompressed cache (closed form)
            self.compressor.log_stats(ctx.stats, k.element_size(), self.reference_len or t)

    def bytes_per_token_head(self, k: Tensor) -> float:
        """Cache bytes of one token's key + value in one kv-head, as its compressor stores them (FlexGen
        overrides for its own kv_bits)."""
        if self.compressor is not None:
            return self.compressor.bytes_per_token_head(k.element_size(), self.reference_len or k.shape[2])
        return 2 * k.shape[-1] * k.element_size()

    scores_by_attention = False
    """Whether the policy's selection comes from attention scores (H2O, LRU, LRU+, AdaKV, Quest): a compressor
    whose stored forms also do (MiKV) forms one joint process with it (models.attention.tiered_versions)."""

    def held_mask(self, t: int, ctx) -> Tensor | None:
        """(B|1, 1|H_kv, T, T) bool: keys j < t the deployed cache still holds when row t arrives (None: every
        earlier key). Used by compressors that rank what a stream holds (MiKV's tiers)."""
        return None

    @staticmethod
    def held_after_previous_row(ctx) -> Tensor | None:
        """held_mask of a cache that keeps exactly what its previous row could read (it drops a key as soon as
        the last row no longer sees it; the policy's own training mask is in ``ctx.scratch``): row t arrives to
        row t - 1's keys and key t - 1."""
        m = ctx.scratch.get("policy_own_mask")
        if m is None:
            return None
        held = torch.zeros_like(m)
        held[..., 1:, :] = m[..., :-1, :]
        return held

    # ------------------------------------------------------------------ inference
    def new_cache(self, n_layer: int, seq_len: int | None = None, sharding=None) -> "PolicyCache":
        """The inference cache driven by this policy (``generate(..., cache_factory=policy.new_cache)``);
        with ``sharding`` (an :class:`~pikv_train.cache.sharding.ExpertShardedKV`) queries read through the
        expert-sharded rule as well (``Decoder.new_cache`` passes the model's).

        Args:
            seq_len: reference length of a fractional budget (default: the policy's fixed reference length).
        """
        cache = self.cache_cls(self, n_layer, self.budget_tokens(seq_len))
        cache.ref_len = seq_len or self.reference_len
        cache.set_compressor(self.compressor)
        if sharding is not None:
            cache.set_sharding(sharding)
        return cache

    cache_cls: type = None  # set by subclasses


@torch.no_grad()
def dense_from_mask_mod(mask_mod, b: int, hkv: int, t: int, device) -> Tensor:
    """(B, H_kv, T, T) bool ``causal ∧ mask_mod`` (only where a dense (T, T) tensor is built anyway)."""
    bi = torch.arange(b, device=device)[:, None, None, None]
    hi = torch.arange(hkv, device=device)[None, :, None, None]
    qi = torch.arange(t, device=device)[None, None, :, None]
    ki = torch.arange(t, device=device)[None, None, None, :]
    return ((ki <= qi) & mask_mod(bi, hi, qi, ki)).expand(b, hkv, t, t)


@torch.no_grad()
def counts_from_mask_mod(mask_mod, b: int, hkv: int, t: int, device, block: int = 256) -> Tensor:
    """(B, H_kv, T) keys each row reads under ``causal ∧ mask_mod``, evaluated in row blocks (the CUDA
    path's statistics without a dense (T, T) mask per head)."""
    bi = torch.arange(b, device=device)[:, None, None, None]
    hi = torch.arange(hkv, device=device)[None, :, None, None]
    ki = torch.arange(t, device=device)[None, None, None, :]
    out = []
    for r0 in range(0, t, block):
        qi = torch.arange(r0, min(t, r0 + block), device=device)[None, None, :, None]
        m = (ki <= qi) & mask_mod(bi, hi, qi, ki)
        out.append(m.expand(b, hkv, -1, t).sum(-1))
    return torch.cat(out, -1)


def _sdpa(q, k, v, mask, ctx=None):
    """SDPA over GQA heads, reading a versioned compressor's stored forms when ``ctx`` carries them."""
    from pikv_train.models.attention import attend

    return attend(q, k, v, mask, q.shape[1] // k.shape[1], getattr(ctx, "versions", None))


class PolicyCache(KVCache):
    """Inference cache with per-(sequence, kv-head) storage, so per-head budgets really shrink memory.

    ``store[layer][b][h]`` holds ``k``, ``v`` (S_bh, hd) and ``pos`` (S_bh,) plus policy state. ``update``
    hands each (b, h) the stored keys followed by the new ones; the policy's ``_step`` returns which of
    them each new query reads and which stay stored. Only the keys some new query reads are gathered for
    attention (at a decode step, exactly the query's visible keys: its shards, Quest's selected pages), padded
    to the longest head for SDPA (padding is masked and not stored).

    With expert sharding (``set_sharding``) each key is still stored once, with its shard membership
    (and, for ``by_score``, each head keeps running per-shard key sums); a query reads the policy's kept
    keys that the sharding rule shows it (SPEC §3), i.e. exactly the ANDed training mask. Policies that
    decide from attention (H2O, LRU, LRU+) compute it over those keys (``self.allow``), as the training
    pass does under ``ctx.prior_mask``.
    """

    _shared_attrs = ("policy", "sharding", "compressor")

    def __init__(self, policy: CachePolicy, n_layer: int, budget: int):
        super().__init__(n_layer)
        self.compressor, self.row_by_row = None, False
        self.policy, self.budget = policy, budget
        self.ref_len: int | None = policy.reference_len
        self.store: list[list[list[dict]] | None] = [None] * n_layer
        self.sharding = None
        self._routing: dict = {}
        self.allow: list | None = None  # per kv-head (Tr, S) sharding visibility of the current step
        self._read_sum, self._read_n = 0.0, 0

    def __len__(self) -> int:
        return 0 if self.store[0] is None else max(len(s["pos"]) for row in self.store[0] for s in row)

    def bytes_stored(self) -> int:
        """Every tensor the cache holds: keys, values, positions, shard membership and sums, policy state."""
        return tensor_bytes(self.store) + tensor_bytes(self.extra)

    def read_fraction(self) -> float:
        """Mean over every real query (all layers and kv-heads) of keys read / keys before it (itself included)."""
        return self._read_sum / max(self._read_n, 1)

    def rollback(self, keep_until: Tensor) -> None:
        raise RollbackError(
            f"{type(self).__name__} cannot roll back by hiding positions (its eviction decisions depend on the "
            "discarded tokens); take cache.snapshot() before the speculative tokens and cache.restore() it"
        )

    def head_lengths(self, layer_idx: int) -> Tensor:
        """(B, H_kv) number of stored keys per sequence and kv-head."""
        return torch.tensor([[len(s["pos"]) for s in row] for row in self.store[layer_idx]])

    def set_compressor(self, compressor) -> None:
        """Store kept tokens through ``compressor`` (a :class:`~pikv_train.cache.compression.KVCompressor`).
        A versioned one (KIVI) makes the decoder feed this cache one token per step (``row_by_row``)."""
        self.compressor = compressor
        self.row_by_row = bool(getattr(compressor, "versioned", False))

    def new_state(self, layer_idx: int, h: int, k: Tensor) -> dict:
        from pikv_train.cache.compression.base import RawStore

        store = RawStore(k.shape[-1], k) if self.compressor is None else self.compressor.new_store(layer_idx, h, k)
        return {"kv": store, "pos": torch.zeros(0, dtype=torch.long, device=k.device)}

    def _read(self, s: dict, t: int | None, like: Tensor) -> tuple[Tensor, Tensor]:
        """Stored keys/values (S, hd) of one (sequence, kv-head) as a query at position t reads them."""
        got = s["kv"].read(t, s["pos"])
        if got is None:
            return like.new_zeros(0, like.shape[-1]), like.new_zeros(0, like.shape[-1])
        return got

    # -------------------------------------------------------------- sharding
    def set_sharding(self, sharding) -> None:
        """Read through expert-sharded placement (an :class:`~pikv_train.cache.sharding.ExpertShardedKV`)."""
        self.sharding = sharding

    def record_routing(self, layer_idx: int, routing) -> None:
        """Called by the decoder after MoE layer ``layer_idx`` with the routing of the current tokens."""
        self._routing[layer_idx] = routing

    def _shard_member(self, layer_idx: int, b: int, tq: int) -> Tensor | None:
        """(B, Tq, n_shards) bool membership of the new tokens at this layer (None: layer not sharded)."""
        if self.sharding is None:
            return None
        prev = self._routing.get(layer_idx - 1)
        if prev is None:
            return None
        from pikv_train.cache.sharding import shard_membership

        return shard_membership(prev.ids, prev.valid, self.sharding.n_shards).view(b, tq, -1)

    def _shard_allow(self, st: dict, qg: Tensor, k_new: Tensor, mem_new: Tensor, p_new: Tensor,
                     p_all: Tensor) -> Tensor:
        """(Tr, S) sharding visibility of one (sequence, kv-head): updates the stored membership and the
        by_score running sums. qg (Tr, hd) group-summed queries, k_new (Tr, hd), mem_new (Tr, n_shards)."""
        from pikv_train.cache.sharding import shard_freshness, shard_visibility, top_shards

        sh = self.sharding
        if sh.cfg.read_mode == "by_routing":
            reads = mem_new
        else:
            mf = mem_new.double()
            if "ksum" not in st:
                st["ksum"] = k_new.new_zeros(sh.n_shards, k_new.shape[-1], dtype=torch.float64)
                st["kcnt"] = torch.zeros(sh.n_shards, dtype=torch.long, device=k_new.device)
            key_sum = st["ksum"][None] + torch.einsum("ts,td->tsd", mf, k_new.double()).cumsum(0)  # (Tr, S, hd)
            key_cnt = st["kcnt"][None] + mem_new.long().cumsum(0)  # (Tr, S)
            mean = key_sum / key_cnt.clamp_min(1)[..., None].double()
            sc = torch.einsum("td,tsd->ts", qg.double(), mean).masked_fill(key_cnt == 0, float("-inf"))
            reads = top_shards(sc, sh.n_read)
            st["ksum"], st["kcnt"] = key_sum[-1], key_cnt[-1]
        mem_all = torch.cat([st["mem"], mem_new]) if "mem" in st else mem_new
        st["mem_all"] = mem_all
        fresh = None
        if sh.cfg.shard_budget is not None:  # per-shard budgets: each key's member count at its own position
            cnt_new = (st["scnt"][None] if "scnt" in st else 0) + mem_new.long().cumsum(0)  # (Tr, S)
            st["midx_all"] = torch.cat([st["midx"], cnt_new]) if "midx" in st else cnt_new
            if len(cnt_new):
                st["scnt"] = cnt_new[-1]
            fresh = shard_freshness(cnt_new, st["midx_all"], sh.cfg.shard_budget)  # (Tr, S_all, n_shards)
        return shard_visibility(p_new, p_all, mem_all, reads, sh.cfg.n_sink, sh.cfg.window, fresh)

    # ---------------------------------------------------------------- update
    def update(self, layer_idx, q, k, v, q_pos, codes: dict | None = None):
        """As :meth:`KVCache.update`; ``codes`` (dict of (B, H_kv, Tq, ...)): the compressor's stored form of
        the new tokens (``k``/``v`` are what reads see)."""
        b, hkv, tq, hd = k.shape
        if getattr(self, "row_by_row", False) and int((q_pos >= 0).sum(1).max()) > 1:
            raise RuntimeError("this cache takes one token per step (a versioned compressor); Decoder.forward "
                               "feeds it row by row")
        g = q.shape[1] // hkv
        if self.store[layer_idx] is None:
            self.store[layer_idx] = [[self.new_state(layer_idx, h, k) for h in range(hkv)] for _ in range(b)]
        member = self._shard_member(layer_idx, b, tq)
        if codes is None:
            codes = {"k": k, "v": v}
        keys, vals, masks = [], [], []
        if getattr(self.compressor, "uses_importance", False):  # the PiKV hybrid ranks by the router's importance
            from pikv_train.cache.compression.pikv import token_importance

            imp = token_importance(self._routing.get(layer_idx - 1), b, tq)
            if imp is not None:
                codes = {**codes, "importance": imp[:, None].expand(b, hkv, tq)}
        for bi in range(b):
            real = q_pos[bi] >= 0
            sts = self.store[layer_idx][bi]
            t_read = int(q_pos[bi][real][0]) if bool(real.any()) else None
            old = [self._read(s, t_read, k) for s in sts]
            for s in sts:  # a store that evicted while it read (PiKV): its tokens' positions and shard rows go too
                gone = getattr(s["kv"], "dropped", None)
                if gone is not None:
                    s["kv"].dropped = None
                    for name in ("pos", "mem", "midx"):
                        if name in s:
                            s[name] = s[name][~gone]
            n_old = [len(s["pos"]) for s in sts]
            k_all = [torch.cat([old[h][0], k[bi, h][real]]) for h in range(hkv)]
            v_all = [torch.cat([old[h][1], v[bi, h][real]]) for h in range(hkv)]
            p_all = [torch.cat([s["pos"], q_pos[bi][real]]) for s in sts]
            qb = q[bi].view(hkv, g, tq, hd)[:, :, real]  # (H_kv, g, Tr, hd)
            self.allow = None
            if member is not None:
                self.allow = [self._shard_allow(s, qb[h].double().sum(0), k[bi, h][real], member[bi][real],
                                                q_pos[bi][real], p_all[h]) for h, s in enumerate(sts)]
            rows, keeps = self._step_b(layer_idx, sts, qb, k_all, p_all, n_old)
            for h, s in enumerate(sts):
                r_h = rows[h] if self.allow is None else rows[h] & self.allow[h]
                if hasattr(s["kv"], "observe"):  # a store that learns from the attention its rows pay (MiKV)
                    s["kv"].observe(qb[h], k_all[h], r_h)
                s["kv"].commit({n: c[bi, h][real] for n, c in codes.items()}, p_all[h], keeps[h])
                s["pos"] = p_all[h][keeps[h]]
                if member is not None:
                    s["mem"] = s.pop("mem_all")[keeps[h]]
                    if "midx_all" in s:
                        s["midx"] = s.pop("midx_all")[keeps[h]]
                # Padded queries (position -1) read only their own (unstored) slot.
                pad_rows = (~real).nonzero().flatten()
                n_all = len(p_all[h])
                m = torch.zeros(tq, n_all + len(pad_rows), dtype=torch.bool, device=k.device)
                m[real, :n_all] = r_h
                self._read_sum += float((r_h.sum(-1) / (p_all[h][n_old[h]:] + 1)).sum())
                self._read_n += int(r_h.shape[0])
                m[pad_rows, n_all + torch.arange(len(pad_rows), device=k.device)] = True
                # Gather only the keys some new query reads (a decode step: exactly its visible keys), so
                # attention touches the query's shards / selected pages / kept keys and nothing else.
                cols = m.any(0)
                keys.append(torch.cat([k_all[h], k[bi, h][~real]])[cols])
                vals.append(torch.cat([v_all[h], v[bi, h][~real]])[cols])
                masks.append(m[:, cols])
        self.allow = None
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
            self._head = h
            r, kp = self._step(layer_idx, h, st, qb[h], k_all[h], p_all[h], n_old[h])
            rows.append(r)
            keeps.append(kp)
        return rows, keeps

    def _step(self, layer_idx, h, st, q, k_all, p_all, n_old) -> tuple[Tensor, Tensor]:
        """One (sequence, kv-head). q (g, Tr, hd) new queries; k_all (S, hd) stored + new keys; p_all (S,).

        Returns (Tr, S) bool visibility and (S,) bool keep-after-step.
        """
        raise NotImplementedError


def tensor_bytes(obj) -> int:
    """Bytes of every tensor reachable from ``obj`` (dicts, lists, tuples, objects' attributes)."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
        return sum(tensor_bytes(v) for k, v in vars(obj).items() if k not in ("policy", "compressor", "sharding"))
    return 0
