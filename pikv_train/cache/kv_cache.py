"""Inference-time KV cache: per-layer key/value storage kept outside module state.

The decoder never stores keys or values on itself; generation passes a cache object in and the same
object carries the state to the next step. Scheduling policies (``pikv_train.cache.policies``) subclass
:class:`KVCache` and override :meth:`update` to evict or select what each query may read.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor


class KVCache:
    """Full (unscheduled) cache: every appended key stays visible to every later query.

    Keys and values are stored per layer as (B, H_kv, S, hd); ``key_pos`` (B, S) holds each slot's
    absolute position, or -1 for left padding in batched generation.
    """

    def __init__(self, n_layer: int):
        self.n_layer = n_layer
        self.keys: list[Tensor | None] = [None] * n_layer
        self.values: list[Tensor | None] = [None] * n_layer
        self.key_pos: list[Tensor | None] = [None] * n_layer
        self.extra: dict = {}
        """State that other decoder parts keep per generation (e.g. the MoE layers' causal capacity counts,
        keyed by the component); snapshot/restore and bytes accounting include it."""

    def __len__(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def bytes_stored(self) -> int:
        """Bytes of every tensor the cache holds: keys, values, positions and ``extra`` state, all layers."""
        from pikv_train.cache.policies.base import tensor_bytes

        return tensor_bytes([self.keys, self.values, self.key_pos, self.extra])

    _shared_attrs = ("policy",)
    """Attributes that reference shared objects (the policy module) and are not copied by ``snapshot``."""

    def snapshot(self) -> dict:
        """A copy of the cache's whole state (tensors cloned), for :meth:`restore`.

        Speculative decoding snapshots the student's cache before a proposal round and restores it
        afterwards, then re-feeds the accepted tokens: exact for every cache, including the evicting
        policies whose decisions cannot be undone by hiding positions.
        """
        shared = {a: self.__dict__[a] for a in self._shared_attrs if a in self.__dict__}
        memo = {id(v): v for v in shared.values()}
        return copy.deepcopy({k: v for k, v in self.__dict__.items() if k not in shared}, memo)

    def restore(self, snap: dict) -> None:
        """Return to the state of :meth:`snapshot` (the snapshot can be restored again)."""
        shared = {a: self.__dict__[a] for a in self._shared_attrs if a in self.__dict__}
        self.__dict__.update(copy.deepcopy(snap, {id(v): v for v in shared.values()}))

    def rollback(self, keep_until: Tensor) -> None:
        """Hide every cached key whose position is beyond ``keep_until`` (B,) in its row.

        Used by speculative sampling to discard rejected proposals; the slots stay allocated but are
        never read again (their position becomes -1, which every mask treats as padding).
        """
        for i, kp in enumerate(self.key_pos):
            if kp is not None:
                self.key_pos[i] = torch.where(kp > keep_until[:, None], torch.full_like(kp, -1), kp)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor | None:
        """Optionally compute the new queries' attention over what ``update`` returned ((B, H, Tq, hd));
        None uses SDPA with the mask (FlexGen's sparse attention overrides it)."""
        return None

    def update(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor,
               codes: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Append new keys/values and return what the new queries may read.

        ``codes`` (a compressor's stored form) is ignored here: this plain cache stores the keys/values as read
        (``Decoder.new_cache`` builds a compressing cache when the model has a compressor).

        Args:
            q: (B, H, Tq, hd) new queries (used by selection policies; ignored here).
            k, v: (B, H_kv, Tq, hd) new keys/values.
            q_pos: (B, Tq) absolute positions of the new tokens, -1 for padding.
        Returns:
            keys (B, H_kv, S, hd), values (B, H_kv, S, hd), mask (B, 1 or H_kv, Tq, S) bool.
        """
        if self.keys[layer_idx] is None:
            self.keys[layer_idx], self.values[layer_idx], self.key_pos[layer_idx] = k, v, q_pos
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], k], dim=2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], v], dim=2)
            self.key_pos[layer_idx] = torch.cat([self.key_pos[layer_idx], q_pos], dim=1)
        kp = self.key_pos[layer_idx]
        mask = causal_position_mask(q_pos, kp)
        return self.keys[layer_idx], self.values[layer_idx], mask


def causal_position_mask(q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """(B, 1, Tq, S) bool: key j visible to query t iff it is real and not in the future.

    A padded query (position -1) is allowed to read itself only, so its softmax row stays finite.
    """
    kp = k_pos[:, None, None, :]  # (B, 1, 1, S)
    qp = q_pos[:, None, :, None]  # (B, 1, Tq, 1)
    mask = (kp >= 0) & (kp <= qp)
    pad_q = (q_pos < 0)[:, None, :, None]
    if pad_q.any():
        # Give padded queries one visible key so SDPA never sees an all-False row (NaN rows).
        first = torch.zeros_like(mask)
        first[..., 0] = True
        mask = torch.where(pad_q, first, mask)
    return mask
