"""ChunkKV (Liu et al., 2025): keep whole chunks of ``chunk_length`` tokens chosen by observation-window
attention, one choice for all kv-heads, reused by groups of layers.

A chunk is the positions [m L, (m + 1) L). Its score is the mean over its L positions of the SnapKV scores
(pooled window attention) summed over the kv-heads (as kvpress's ``ChunkKVPress``: ``scores.sum(heads)``, mean
per chunk); the best ``(budget - w) // L`` chunks stay, whole, in every kv-head. Layer-wise index reuse: in each
group of ``reuse_layers`` consecutive layers the first layer selects and the others keep the same chunks.

Causal form (module docstring of :mod:`~pikv_train.cache.compression.token_select`): a chunk becomes a candidate
when its first token is about to leave the recent window (its later tokens are still in the window and are read
either way); positions of a chunk not seen yet count as zero in its mean. ChunkKV keeps the incomplete last chunk
of a prompt whole; here the window plays that part.
"""

from __future__ import annotations

import torch

from pikv_train.cache.compression.token_select import NEG, TokenSelectPolicy


class ChunkKVCompressor(TokenSelectPolicy):
    """ChunkKV: whole chunks by window attention, shared by kv-heads, indices reused across layers."""

    name = "chunk_kv"

    def source(self, layer):
        return layer - layer % self.ccfg.reuse_layers

    def select(self, score, cand, n):
        """score, cand (B, H_kv, S) -> keep (B, H_kv, S): the n // L best candidate chunks, for every kv-head."""
        b, hkv, s = score.shape
        length = self.ccfg.chunk_length
        n_ch = -(-s // length)
        pad = n_ch * length - s
        tot = torch.nn.functional.pad(score.sum(1), (0, pad)).view(b, n_ch, length).sum(-1) / length  # (B, n_ch)
        first = torch.arange(n_ch, device=score.device) * length
        first_cand = torch.nn.functional.pad(cand[:, 0], (0, pad))[:, first]  # a chunk is decided with its first token
        from pikv_train.cache.policies.base import top_n_mask

        keep_ch = top_n_mask(tot.masked_fill(~first_cand, NEG), n // length,
                             torch.arange(n_ch, device=score.device, dtype=torch.float64))
        keep = keep_ch.repeat_interleave(length, -1)[:, :s]  # (B, S)
        return keep[:, None].expand(b, hkv, s)
