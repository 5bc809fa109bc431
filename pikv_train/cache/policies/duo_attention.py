"""DuoAttention (Xiao et al., 2024): retrieval heads read the full cache, streaming heads sinks + recent.

Each (layer, kv-head) has a learnable gate g (``gates``, a parameter of this hook, so it is trained
and checkpointed with the model). Training with soft gates computes both passes and mixes
``g * full + (1 - g) * streaming`` per kv-head; as in the paper the parameter is clamped to [0, 1] in
place after every optimizer step (``after_optimizer_step``, called by the tasks), and the forward also
clamps with a straight-through gradient so a gate set out of range by hand still acts as 0 or 1.
``l1_penalty()`` is
``duo_l1_weight * mean|g|`` and is put, differentiable, in ``ctx.stats['cache/l1_penalty']`` for the task
to add to its loss. In eval mode (or with ``duo_hard``) the gates are thresholded at 0.5: heads with
g >= 0.5 keep the full cache, the others only sinks + recent window (budget tokens) — exact: the
inference cache stores per head what that head reads.

Streaming heads read ``n_sink`` sinks + ``budget - n_sink`` recent tokens (StreamingLLM's layout). The
paper's defaults are 64 sinks + 256 recent: ``n_sink: 64, budget: 320``. With a budget that covers the
whole sequence a streaming head reads everything, the mixing gradient is zero and the L1 term alone
drives every gate to 0; training warns about it.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from pikv_train.cache.policies.base import CachePolicy, PolicyCache, _sdpa
from pikv_train.cache.policies.streaming_llm import sink_window, streaming_mask, streaming_plan, streaming_step
from pikv_train.errors import ConfigError


class DuoAttentionCache(PolicyCache):
    def _step(self, layer_idx, h, st, q, k_all, p_all, n_old):
        if bool(self.retrieval[layer_idx, h]):
            t = p_all[n_old:]
            return p_all[None] <= t[:, None], torch.ones_like(p_all, dtype=torch.bool)
        s, w = sink_window(self.budget, self.policy.cfg.n_sink)
        return streaming_step(p_all, n_old, s, w)

    def __init__(self, policy, n_layer, budget):
        super().__init__(policy, n_layer, budget)
        self.retrieval = policy.hard_gates().cpu()  # (L, H_kv) bool, fixed for the cache's lifetime


class DuoAttentionScheduler(CachePolicy):
    """Learnable per-kv-head retrieval/streaming gates with an L1 penalty."""

    cache_cls = DuoAttentionCache
    skips_when_budget_covers = False  # the gates and their L1 penalty still train (warned about below)

    def __init__(self, cfg=None, model_cfg=None, **overrides):
        super().__init__(cfg, model_cfg, **overrides)
        if model_cfg is None:
            raise ConfigError(
                "duo_attention needs the model config for its per-head gates: build it with "
                "build_policy(cache_cfg, model.cfg) or DuoAttentionScheduler(cfg, model.cfg)"
            )
        self.gates = nn.Parameter(torch.full((model_cfg.n_layer, model_cfg.n_kv_head), float(self.cfg.duo_gate_init)))

    def gate_values(self) -> torch.Tensor:
        """(L, H_kv) gates clamped to [0, 1], straight-through gradient."""
        g = self.gates
        return g + (g.clamp(0, 1) - g).detach()

    def hard_gates(self) -> torch.Tensor:
        """(L, H_kv) bool: retrieval heads at inference."""
        return self.gates.detach().clamp(0, 1) >= self.cfg.duo_threshold

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.gates.clamp_(0, 1)

    def l1_penalty(self) -> torch.Tensor:
        return self.cfg.duo_l1_weight * self.gate_values().abs().mean()

    def _hard(self) -> bool:
        return self.cfg.duo_hard or not self.training

    def mask(self, q, k, ctx, budget):
        t = q.shape[2]
        if not self._hard():
            return None  # soft gates: both passes, in ``attend``
        stream = streaming_mask(t, budget, self.cfg.n_sink, q.device)  # (T, T)
        full = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        retr = self.hard_gates()[ctx.layer_idx].to(q.device)  # (H_kv,)
        return torch.where(retr[:, None, None], full, stream)[None]  # (1, H_kv, T, T)

    def training_mask(self, q, k, ctx):
        m = super().training_mask(q, k, ctx)
        t = q.shape[2]
        if self.training and not self._hard() and self.budget_tokens() >= t and not getattr(self, "_warned", False):
            self._warned = True
            warnings.warn(
                f"duo_attention: cache.budget={self.cfg.budget} covers the whole {t}-token sequence, so streaming "
                "heads equal full attention and the gates only follow the L1 penalty to 0; set a budget below "
                "the sequence length (the paper: n_sink 64, budget 320)", stacklevel=2,
            )
        g = self.gate_values()
        if ctx.layer_idx == 0:
            ctx.stats["cache/l1_penalty"] = self.l1_penalty()  # differentiable: add it to the loss
            ctx.stats["cache/duo_gate_mean"] = g.detach().mean()
            ctx.stats["cache/duo_retrieval_fraction"] = self.hard_gates().float().mean()
        ctx.stats[f"cache/duo_gate_l{ctx.layer_idx}"] = g[ctx.layer_idx].detach().mean()
        return m

    def log_stats(self, ctx, vis, budget, k):
        if not self._hard():  # soft gates: report the streaming heads' view, on every device
            b, hkv, t, _ = k.shape
            vis = streaming_plan(t, budget, self.cfg.n_sink, k.device).counts(b, hkv, t)  # no (T, T) mask
        super().log_stats(ctx, vis, budget, k)

    def attend(self, q, k, v, mask, ctx):
        if self._hard():
            return super().attend(q, k, v, mask, ctx)
        t = q.shape[2]
        budget = self.budget_tokens()
        g = self.gate_values()[ctx.layer_idx].to(q.dtype)  # (H_kv,)
        group = q.shape[1] // k.shape[1]
        if self._flex(q) and mask is None and ctx.versions is None:
            from pikv_train.cache.policies.flex import flex_attend

            s, w = sink_window(budget, self.cfg.n_sink)
            full = flex_attend(q, k, v, None)
            stream = flex_attend(q, k, v, lambda b, h, qi, ki: (ki < s) | (qi - ki < w))
        elif self._blocks(q) and mask is None and ctx.versions is None:  # streaming heads block-sparse
            from pikv_train.cache.policies.blocks import block_attend

            full = _sdpa(q, k, v, None, ctx)
            stream = block_attend(q, k, v, streaming_plan(t, budget, self.cfg.n_sink, q.device))
        else:
            causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()[None, None]
            base = causal if mask is None else mask & causal
            full = _sdpa(q, k, v, base if mask is not None else None, ctx)
            stream = _sdpa(q, k, v, base & streaming_mask(t, budget, self.cfg.n_sink, q.device), ctx)
        gq = g.repeat_interleave(group)[None, :, None, None]  # (1, H, 1, 1)
        return gq * full + (1 - gq) * stream

    def held_mask(self, t, ctx):
        """What the deployed (hard-gated) cache holds: retrieval heads everything, streaming heads the sinks and
        the window (also while the gates train soft: the cache is built from the hard gates)."""
        stream = streaming_mask(t, self.budget_tokens(), self.cfg.n_sink, ctx.positions.device)
        full = torch.ones(t, t, dtype=torch.bool, device=stream.device).tril()
        retr = self.hard_gates()[ctx.layer_idx].to(stream.device)
        return torch.where(retr[:, None, None], full, stream)[None]

    def mask_mod(self, q, k, ctx, budget):
        s, w = sink_window(budget, self.cfg.n_sink)
        retr = self.hard_gates()[ctx.layer_idx].to(q.device)
        return lambda b, h, qi, ki: retr[h] | (ki < s) | (qi - ki < w)


@torch.no_grad()
def calibrate_gates(model, input_ids: torch.Tensor, streaming_fraction: float = 0.5) -> torch.Tensor:
    """Set untrained DuoAttention gates by a per-head ablation on calibration tokens (our method, for
    students not trained with gates; kvpress's on-the-fly scoring instead uses the area under the
    cumulative attention curve): each kv-head alone is made streaming and the change of the final hidden
    states (MSE vs full attention) is measured; the ``streaming_fraction`` of heads that change it least
    become streaming (gate 0), the others retrieval (gate 1). Returns the (L, H_kv) errors."""
    policy = model.cache_policy
    was = policy.training
    policy.eval()
    gates = policy.gates
    gates.fill_(1.0)
    ref = model(input_ids).hidden
    err = torch.zeros_like(gates)
    for li in range(gates.shape[0]):
        for h in range(gates.shape[1]):
            gates[li, h] = 0.0
            err[li, h] = (model(input_ids).hidden - ref).pow(2).mean()
            gates[li, h] = 1.0
    n = int(round(streaming_fraction * err.numel()))
    order = err.flatten().argsort()[:n]
    gates.view(-1)[order] = 0.0
    policy.train(was)
    return err
