"""ThinK (Xu et al., ICLR 2025): query-driven pruning of key channels; keys are stored with the kept channels only.

ThinK scores each key channel j of a head by ``|| Q[:, j] K[:, j]^T ||_F`` (queries of an observation window
against all keys; the Frobenius norm of a rank-one matrix is ``||Q[:, j]|| * ||K[:, j]||``), keeps the top
channels and stores the keys with only those; queries use the same channels, so ``q . k`` over the kept channels
is exactly what attention computes. Values are stored whole (ThinK prunes keys; its value variant is optional).

The channel choice must be causal here (SPEC §6): ThinK decides per prompt at prefill from the prompt's last
queries, which in a training forward would let early rows depend on later queries. So the choice is static per
(layer, kv-head), calibrated on training data: the first training forward of each layer (or
:meth:`PruningCompressor.calibrate`) accumulates the channel scores over every row of its batch (summed over
the query heads of a kv-head and, under DDP, over ranks) and fixes the top ``keep_channels`` fraction. It is a
buffer, so checkpoints carry it. Channels are post-RoPE key channels, as in ThinK. An evaluation before calibration (Lightning's sanity check)
keeps the first channels of each head, with a warning, and does not calibrate: only training data does.

Deviations from ThinK's code (SalesforceAIResearch/ThinK, ``key_pruner_query_driven``) besides the static
choice: ThinK scores with each prompt's last 32 queries and keeps the last 32 prompt keys and every decoded key
unpruned; here every key is pruned (training has no prompt/decode split), and the score sums over every row of
the calibration batch.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from pikv_train.cache.compression.base import KVCompressor


class PruningCompressor(KVCompressor):
    """ThinK key-channel pruning with a static, calibrated channel set per (layer, kv-head)."""

    name = "pruning"

    def __init__(self, cfg, model_cfg):
        super().__init__(cfg, model_cfg)
        self.n_keep = max(1, round(cfg.keep_channels * self.head_dim))
        # (L, H_kv, n_keep) kept channel indices (sorted); calibrated[l] once layer l has chosen them.
        self.register_buffer("channels", torch.arange(self.n_keep).expand(self.n_layer, self.n_kv_head, -1).clone())
        self.register_buffer("calibrated", torch.zeros(self.n_layer, dtype=torch.bool))

    @torch.no_grad()
    def channel_scores(self, q, k):
        """q (B, H, T, hd), k (B, H_kv, T, hd) -> (H_kv, hd): ||Q[:, j]|| * ||K[:, j]|| summed over the group."""
        b, h, t, hd = q.shape
        hkv = k.shape[1]
        qn = q.float().view(b, hkv, h // hkv, t, hd).pow(2).sum((0, 3)).sqrt()  # (H_kv, g, hd)
        kn = k.float().pow(2).sum((0, 2)).sqrt()  # (H_kv, hd)
        return (qn * kn[:, None]).sum(1)

    @torch.no_grad()
    def set_channels(self, layer_idx: int, scores) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(scores)  # every rank keeps the same channels
        top = scores.topk(self.n_keep, dim=-1).indices.sort(-1).values
        self.channels[layer_idx] = top.to(self.channels.device)
        self.calibrated[layer_idx] = True

    def kv(self, layer_idx, attn, x, cos, sin):
        k, v = attn.project_kv(x, cos, sin)
        if not bool(self.calibrated[layer_idx]):
            if self.training:  # the first training forward chooses the channels, once
                self.set_channels(layer_idx, self.channel_scores(attn.project_q(x, cos, sin), k))
            elif not getattr(self, "_warned", False):  # e.g. Lightning's sanity check before the first step
                self._warned = True
                warnings.warn("compressor pruning: channels not calibrated yet, so this evaluation keeps the first "
                              f"{self.n_keep} channels of each head; they are chosen by the first training forward, "
                              "or call PruningCompressor.calibrate(model, batch) on training data", stacklevel=2)
        idx = self.channels[layer_idx]  # (H_kv, n_keep)
        mask = torch.zeros(self.n_kv_head, self.head_dim, dtype=torch.bool, device=k.device)
        mask.scatter_(1, idx.to(k.device), True)
        kept = k.gather(-1, idx.to(k.device)[None, :, None, :].expand(k.shape[0], -1, k.shape[2], -1))
        return k * mask[None, :, None, :], v, {"k": kept, "v": v}

    def decode(self, layer_idx, head, codes, pos):
        kept = codes["k"]
        k = kept.new_zeros(kept.shape[0], self.head_dim)
        k[:, self.channels[layer_idx, head].to(kept.device)] = kept
        return k, codes["v"]

    @torch.no_grad()
    def calibrate(self, model, input_ids) -> None:
        """Choose every layer's channels from one forward of ``model`` (with this compressor set) over
        ``input_ids`` (training data), e.g. before applying ThinK to a trained model without training."""
        self.calibrated.zero_()
        was = self.training
        self.train()
        try:
            model(input_ids)
        finally:
            self.train(was)

    def bytes_per_token_head(self, element_size, context):
        return (self.n_keep + self.head_dim) * element_size
