"""FlexGen (Sheng et al., 2023): a placement policy, attention identical to dense.

The budget is the part of the KV cache kept in device memory: the most recent ``budget`` tokens of
every layer stay on the compute device and older ones are moved to ``offload_device`` (host memory),
from where they are copied back (non-blocking, from pinned memory on CUDA, so the copy of one layer
overlaps the compute of the previous one) when attention reads them. Nothing is evicted, so the
training mask is plain causal and decoding equals the parallel forward.

Optional lossy knob ``sparse_top_k`` (FlexGen's ``attn_sparsity``): each query keeps its top-k
post-softmax probabilities and the output is *not* renormalised (training forward only; the
inference cache reads every key). FlexGen's 4-bit group-64 KV compression is not implemented here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pikv_train.cache.kv_cache import KVCache, causal_position_mask
from pikv_train.cache.policies.base import CachePolicy, causal_mask


class FlexGenCache(KVCache):
    """Full cache split between device (recent ``budget`` tokens) and host memory (the rest)."""

    def __init__(self, policy, n_layer: int, budget: int):
        super().__init__(n_layer)
        self.policy, self.budget = policy, budget
        self.host_keys: list[Tensor | None] = [None] * n_layer
        self.host_values: list[Tensor | None] = [None] * n_layer
        self.host_pos: list[Tensor | None] = [None] * n_layer

    def __len__(self) -> int:
        n_host = 0 if self.host_keys[0] is None else self.host_keys[0].shape[2]
        return n_host + super().__len__()

    def bytes_on_device(self) -> int:
        return super().bytes_stored()

    def bytes_on_host(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.host_keys + self.host_values if t is not None)

    def bytes_stored(self) -> int:
        return self.bytes_on_device() + self.bytes_on_host()

    def update(self, layer_idx, q, k, v, q_pos):
        dev_k, dev_v, dev_p = super().update(layer_idx, q, k, v, q_pos)[0], self.values[layer_idx], self.key_pos[layer_idx]
        host = self.host_keys[layer_idx]
        if host is not None:  # read the host part back (overlaps compute on CUDA: non_blocking from pinned memory)
            keys = torch.cat([host.to(k.device, non_blocking=True), dev_k], 2)
            values = torch.cat([self.host_values[layer_idx].to(k.device, non_blocking=True), dev_v], 2)
            pos = torch.cat([self.host_pos[layer_idx].to(k.device), dev_p], 1)
        else:
            keys, values, pos = dev_k, dev_v, dev_p
        mask = causal_position_mask(q_pos, pos)
        over = dev_k.shape[2] - self.budget
        if over > 0:  # move the oldest device tokens to the host
            dev = torch.device(self.policy.cfg.offload_device)
            pin = torch.cuda.is_available() and dev.type == "cpu"
            moved = [t[:, :, :over].to(dev) for t in (dev_k, dev_v)]
            if pin:
                moved = [t.pin_memory() for t in moved]
            mp = dev_p[:, :over].to(dev)
            cat = lambda old, new, d: new if old is None else torch.cat([old, new], d)  # noqa: E731
            self.host_keys[layer_idx] = cat(self.host_keys[layer_idx], moved[0], 2)
            self.host_values[layer_idx] = cat(self.host_values[layer_idx], moved[1], 2)
            self.host_pos[layer_idx] = cat(self.host_pos[layer_idx], mp, 1)
            self.keys[layer_idx] = dev_k[:, :, over:]
            self.values[layer_idx] = dev_v[:, :, over:]
            self.key_pos[layer_idx] = dev_p[:, over:]
        return keys, values, mask


class FlexGenScheduler(CachePolicy):
    """Device/host placement of the KV cache (+ optional top-k sparse attention in training)."""

    evicts = False
    cache_cls = FlexGenCache

    def mask(self, q, k, ctx, budget):
        return None  # placement does not change attention

    def mask_mod(self, q, k, ctx, budget):
        return None

    def log_stats(self, ctx, m, budget, k):
        super().log_stats(ctx, m, budget, k)
        t = k.shape[2]
        ctx.stats["cache/device_fraction"] = torch.tensor(min(budget, t) / t)

    def attend(self, q, k, v, mask, ctx):
        if self.cfg.sparse_top_k <= 0:
            return super().attend(q, k, v, mask, ctx)
        b, h, t, d = q.shape
        g = h // k.shape[1]
        kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        logits = q @ kk.transpose(-1, -2) / math.sqrt(d)  # (B, H, T, T)
        vis = causal_mask(t, q.device) if mask is None else (mask.repeat_interleave(g, 1) if mask.shape[1] > 1 else mask)
        p = logits.masked_fill(~vis, float("-inf")).softmax(-1)
        kth = p.topk(min(self.cfg.sparse_top_k, t), dim=-1).values[..., -1:]
        return (p * (p >= kth)) @ vv  # not renormalised, as FlexGen's _sparse_attention_value
