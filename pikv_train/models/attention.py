"""Causal grouped-query self-attention with RoPE.

Training runs SDPA over the whole sequence (``is_causal`` when no extra mask is given, else a boolean
mask); decoding passes a cache object (``pikv_train.cache.KVCache`` or a policy subclass) that returns
the keys/values each new query may read, with their mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pikv_train.models.config import ModelConfig
from pikv_train.models.layers import apply_rotary


class CausalSelfAttention(nn.Module):
    """Multi-head attention with n_kv_head <= n_head key/value heads (GQA)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        # qkv_bias (Qwen2): biases on q (H * hd,) and on kv ([k; v] rows, 2 * H_kv * hd,), never on o_proj.
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.kv_proj = nn.Linear(cfg.d_model, 2 * cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Return rotated q (B, H, T, hd), k (B, H_kv, T, hd) and v (B, H_kv, T, hd)."""
        k, v = self.project_kv(x, cos, sin)
        return self.project_q(x, cos, sin), k, v

    def project_q(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Rotated queries (B, H, T, hd)."""
        b, t, _ = x.shape
        return apply_rotary(self.q_proj(x).view(b, t, self.n_head, self.head_dim).transpose(1, 2), cos, sin)

    def project_kv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """Rotated keys and values (B, H_kv, T, hd) from the layer's own projection."""
        b, t, _ = x.shape
        k, v = self.kv_proj(x).view(b, t, 2, self.n_kv_head, self.head_dim).permute(2, 0, 3, 1, 4)
        return apply_rotary(k, cos, sin), v

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        *,
        mask: Tensor | None = None,
        cache=None,
        layer_idx: int = 0,
        positions: Tensor | None = None,
        hooks: list | None = None,
        ctx=None,
        compressor=None,
    ) -> Tensor:
        """x (B, T, d) -> (B, T, d).

        Args:
            mask: optional (B or 1, 1 or H_kv, T, T) bool visibility for the training forward (True = read);
                it must already include causality. None means plain causal attention.
            cache: inference cache; when given, ``mask`` is ignored and the cache decides visibility.
            positions: (B, T) absolute positions (needed with a cache).
            hooks: attention hooks (KV sharding, cache policy) consulted in the training forward; their
                masks are ANDed, and a hook's ``attend`` may replace the attention computation.
            ctx: the hooks' :class:`~pikv_train.models.hooks.AttentionContext` for this layer.
            compressor: the KV storage compressor (SPEC §6): keys/values as every read sees them, their stored
                codes for the cache, and for a versioned one (KIVI) which stored form each (row, key) reads.
        """
        b, t, _ = x.shape
        q = self.project_q(x, cos, sin)
        if compressor is None:
            k, v = self.project_kv(x, cos, sin)
            codes = None
        else:
            k, v, codes = compressor.kv(layer_idx, self, x, cos, sin)
        y = attend_layer(q, k, v, codes, self.n_head // self.n_kv_head, mask=mask, cache=cache, layer_idx=layer_idx,
                         positions=positions, hooks=hooks, ctx=ctx, compressor=compressor)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim))


def attend_layer(q: Tensor, k: Tensor, v: Tensor, codes: dict | None, group: int, *, mask: Tensor | None = None,
                 cache=None, layer_idx: int = 0, positions: Tensor | None = None, hooks: list | None = None, ctx=None,
                 compressor=None) -> Tensor:
    """One layer's attention after the projections: (B, H, T, hd) output of rotated q (B, H, T, hd) over the new
    keys/values k, v (B, H_kv, T, hd) (``codes``: the compressor's stored form of them, or None).

    Shared by :class:`CausalSelfAttention` and the Hugging Face attention function (``pikv_train.hf``), so a
    transformers model trains and decodes under a policy through exactly this code. With ``cache`` the cache decides
    what each query reads (decoding); otherwise the hooks' training masks are ANDed with ``mask`` (see
    :meth:`CausalSelfAttention.forward` for the arguments).
    """
    versions = None
    if cache is None and compressor is not None and compressor.versioned and not getattr(compressor, "needs_visibility", False):
        versions = compressor.versions(layer_idx, k, v)
    if ctx is not None:
        ctx.versions = versions
    y = None
    if cache is not None:
        k, v, mask = cache.update(layer_idx, q, k, v, positions, **({} if codes is None else {"codes": codes}))
        attend_fn = getattr(cache, "attend", None)  # duck-typed caches without it use SDPA
        y = attend_fn(q, k, v, mask) if attend_fn is not None else None
    elif hooks:
        stats0 = dict(ctx.stats) if ctx is not None else None  # before the hooks log this layer
        mask0, mask = mask, hook_masks(q, k, mask, hooks, ctx)
        if compressor is not None and getattr(compressor, "needs_visibility", False):
            versions, mask = tiered_versions(compressor, hooks, layer_idx, q, k, v, mask0, mask, ctx, stats0)
            if ctx is not None:
                ctx.versions = versions
        for h in hooks:
            y = h.attend(q, k, v, mask, ctx)
            if y is not None:
                break
    if y is None:
        y = attend(q, k, v, mask, group, versions)
    if ctx is not None and getattr(ctx, "want_attention_probs", False) and cache is None:
        if mask is None and ctx.scratch.get("policy_dense_mask") is not None:
            mask = ctx.scratch["policy_dense_mask"]()  # FlexAttention path: the same visibility, densely
        ctx.attention_probs = attention_probs(q, k, mask, group, versions)
    return y


def hook_masks(q: Tensor, k: Tensor, mask: Tensor | None, hooks, ctx) -> Tensor | None:
    """AND of ``mask`` and every hook's training mask (each hook sees the masks before it as ctx.prior_mask)."""
    for h in hooks:
        if ctx is not None:
            ctx.prior_mask = mask
        m = h.training_mask(q, k, ctx)
        if m is not None:
            mask = m if mask is None else mask & m
    return mask


def tiered_versions(compressor, hooks, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, mask0: Tensor | None,
                    mask: Tensor | None, ctx, stats0: dict):
    """Versions of a compressor whose stored forms come from the attention rows really pay (MiKV's tiers), and
    the hooks' mask that goes with them: (versions, mask).

    A policy that does not score from attention (full, StreamingLLM, DuoAttention) fixes what is held and read
    on its own: one pass over its deployed, hard-gated visibility. A policy that does (H2O, LRU, LRU+, AdaKV,
    Quest) scores with the keys as each row reads them, in their tiers, while the tiers rank what that policy
    holds: one joint sequential process, as in the deployed cache. Each decision (a tier change or a policy's
    selection at a boundary) depends only on decisions at earlier boundaries (a tier change at s0 comes before
    the policy's decision at s0, as the cache reads before it steps), so alternating the two passes (the policy
    given the tiers, the tiers given the policy) fixes at least one more boundary per round and stops at the
    unique fixed point, the sequential process itself (two to eight rounds in the tests: each is a no-grad policy
    pass and a tier pass). ``stats0``: ``ctx.stats`` before the hooks first logged this layer, restored before
    each round so the layer is logged once.
    """
    t = q.shape[2]
    policy = next(h for h in hooks if getattr(h, "compressor", None) is compressor)
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()[None, None]
    joint = getattr(policy, "scores_by_attention", False) and ctx.scratch.get("policy_own_mask") is not None
    if not joint:
        held = policy.held_mask(t, ctx)
        eye = torch.eye(t, dtype=torch.bool, device=q.device)
        vis = causal if held is None else causal & (held | eye)
        shard = ctx.prior_mask if hooks[-1] is policy else None  # what expert sharding lets each row read
        vis = vis if shard is None else vis & shard
        kw = {}
        if getattr(compressor, "uses_importance", False):  # the PiKV hybrid: the router's importance at layer l - 1
            from pikv_train.cache.compression.pikv import token_importance

            kw["importance"] = token_importance(ctx.routing_by_layer.get(layer_idx - 1), q.shape[0], t)
        versions = compressor.versions(layer_idx, k, v, q=q, vis=vis, held=held, **kw)
        if versions.chunk_evicted is not None:  # evicted keys: no row after the decision reads them
            rows = torch.div(torch.arange(t, device=q.device), versions.chunk, rounding_mode="floor")
            gone = versions.chunk_evicted[:, :, rows]  # (B, H_kv, T, T)
            mask = causal & ~gone if mask is None else mask & ~gone
        return versions, mask
    versions = None
    for _ in range(2 * t + 2):
        # Rows read what the hooks' mask shows (the policy's selection and the sharding rule); the tiers rank
        # what the policy held when each row arrived.
        new = compressor.versions(layer_idx, k, v, q=q, vis=causal & mask, held=policy.held_mask(t, ctx))
        if versions is not None and torch.equal(new.chunk_tier, versions.chunk_tier):
            return new, mask
        versions = ctx.versions = new
        ctx.stats.clear()
        ctx.stats.update(stats0)
        mask = hook_masks(q, k, mask0, hooks, ctx)
    raise RuntimeError(f"{compressor.name} tiers and cache.policy={policy.cfg.policy} did not reach a fixed point")


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, group: int, versions=None) -> Tensor:
    """SDPA over GQA heads. q (B, H, Tq, hd); k, v (B, H_kv, S, hd); mask (B|1, 1|H_kv, Tq, S) bool or None.

    ``versions`` (a versioned compressor's :class:`~pikv_train.cache.compression.Versions`): row t reads key j
    in the stored form the compressor gives that pair, so one SDPA runs over the concatenated forms.
    """
    if versions is not None and versions.chunk is not None:
        return versions.attend_chunked(q, mask, group)
    if versions is not None:
        k, v, mask = versions.expand(mask)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=group > 1)
    if mask.shape[1] > 1 and group > 1:
        # Per-kv-head masks apply to every query head of the group: (B, H_kv, ...) -> (B, H, ...).
        mask = mask.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=group > 1)


@torch.no_grad()
def attention_probs(q: Tensor, k: Tensor, mask: Tensor | None, group: int, versions=None) -> Tensor:
    """Dense no-grad attention probabilities (B, H, T, T) under ``mask`` (causal when None), over the keys as
    each row reads them (``versions``: a versioned compressor's stored forms; ``k`` the exact keys).

    Used for detached training targets (PiKVRouter's importance head); never in the forward output.
    """
    t = q.shape[2]
    if versions is not None:  # the keys as each row reads them (stored form below the row's cut)
        rep = lambda x: (x.repeat_interleave(group, dim=1) if group > 1 else x).float()  # noqa: E731
        scores = versions.logits(q.float(), rep(k), torch.arange(t, device=q.device), rep)
        scores = scores * q.shape[-1] ** -0.5
    else:
        kk = k.repeat_interleave(group, dim=1) if group > 1 else k
        scores = (q.float() @ kk.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is None:
        mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()[None, None]
    elif mask.shape[1] > 1 and group > 1:
        mask = mask.repeat_interleave(group, dim=1)
    return scores.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0)
