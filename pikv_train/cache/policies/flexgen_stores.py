"""FlexGen's device/host placement over per-(sequence, kv-head) stores, for the versioned compressors (KIVI's
residual, MiKV's tiers) whose stored form of a token changes with the reading position.

:class:`~pikv_train.cache.policies.flexgen.FlexGenCache` keeps batched tensors (B, H_kv, S, ...) split by token
age. A versioned store rewrites its own tensors as tokens age (KIVI quantizes the residual a group at a time,
MiKV demotes tokens between tiers), so it is a per-(sequence, kv-head) :class:`Store`, held by the policy cache
machinery (which also brings expert sharding) and wrapped in :class:`PlacedStore`: between steps, the rows of
every tensor that holds one row per token (codes, scales, residual keys, tier payloads: ``Store.placed_rows``)
for tokens older than the most recent ``budget`` live in ``offload_device`` memory; a step reads them back,
lets the store read/re-tier/quantize, and places the rows again after the commit. Small tables that every read
needs (KIVI's key-group ranges, MiKV's tiers and scores) stay on the device. The numbers are those of the same
store without placement (placement moves bytes, never changes them).

Nothing is evicted; ``attn_sparsity`` applies FlexGen's sparse values over the decoded stored forms (training:
:func:`~pikv_train.cache.policies.flexgen.sparse_attention_versions`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pikv_train.cache.compression.base import Store
from pikv_train.cache.policies.base import PolicyCache, tensor_bytes
from pikv_train.cache.policies.flexgen import sparse_attention
from pikv_train.errors import RollbackError


class PlacedStore(Store):
    """A store whose per-token rows older than its ``budget`` most recent tokens sit in ``host`` memory.

    ``_host`` lists ``(holder, attribute, rows)``: the first rows of ``holder.attribute`` (its oldest tokens) as
    moved to the host; the holder keeps the rest on the device.
    """

    def __init__(self, inner: Store, budget: int, host: torch.device):
        self.inner, self.budget, self.host = inner, budget, host
        self._host: list[tuple[object, str, Tensor]] = []

    def __getattr__(self, name):  # anything else the wrapped store has
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _join(self) -> None:
        """Bring the host rows back in front of the device rows (the step reads every stored token)."""
        for holder, name, rows in self._host:
            dev = getattr(holder, name)
            setattr(holder, name, torch.cat([rows.to(dev.device, non_blocking=True), dev]))
        self._host = []

    def _place(self, pos: Tensor) -> None:
        """Move the rows of tokens older than the ``budget`` most recent ones (``pos`` (S,) ascending) to the host."""
        if len(pos) <= self.budget:
            return
        cutoff = pos[len(pos) - self.budget]  # oldest position that stays on the device
        pin = torch.cuda.is_available() and self.host.type == "cpu"
        for holder, name, row_pos in self.inner.placed_rows(pos):
            n = int((row_pos < cutoff).sum())  # rows are in position order: the old ones are a prefix
            if n:
                x = getattr(holder, name)
                rows = x[:n].to(self.host)
                self._host.append((holder, name, rows.pin_memory() if pin else rows))
                setattr(holder, name, x[n:])

    def read(self, t, pos):
        self._join()
        return self.inner.read(t, pos)

    def observe(self, *args) -> None:
        """MiKV's accumulated attention (a no-op for a store without it), with every row back first."""
        if hasattr(self.inner, "observe"):
            self._join()
            self.inner.observe(*args)

    def placed_rows(self, pos):
        return self.inner.placed_rows(pos)

    def commit(self, codes, pos_all, keep):
        self._join()
        self.inner.commit(codes, pos_all, keep)
        self._place(pos_all[keep])

    def host_nbytes(self) -> int:
        return sum(rows.numel() * rows.element_size() for _, _, rows in self._host)

    def nbytes(self) -> int:
        return self.inner.nbytes() + self.host_nbytes()


class FlexGenStoreCache(PolicyCache):
    """FlexGen (nothing evicted, the recent ``budget`` tokens on the device, sparse values) with a versioned
    compressor's per-(sequence, kv-head) stores."""

    def new_state(self, layer_idx: int, h: int, k: Tensor) -> dict:
        st = super().new_state(layer_idx, h, k)
        st["kv"] = PlacedStore(st["kv"], self.budget, torch.device(self.policy.cfg.offload_device))
        return st

    def _step(self, layer_idx, h, st, q, k_all, p_all, n_old):
        t = p_all[n_old:]
        return p_all[None] <= t[:, None], torch.ones_like(p_all, dtype=torch.bool)

    def _stores(self):
        return [s["kv"] for layer in self.store if layer is not None for row in layer for s in row]

    def bytes_on_host(self) -> int:
        return sum(s.host_nbytes() for s in self._stores())

    def bytes_on_device(self) -> int:
        """Everything else the cache holds: the device rows, the stores' tables, positions, shard state (the
        batched FlexGenCache counts its key/value parts only: its positions are few next to them)."""
        return self.bytes_stored() - self.bytes_on_host()

    def bytes_stored(self) -> int:
        return sum(s.nbytes() for s in self._stores()) + tensor_bytes(
            [{n: x for n, x in s.items() if n != "kv"} for layer in self.store if layer is not None
             for row in layer for s in row]) + tensor_bytes(self.extra)

    def rollback(self, keep_until: Tensor) -> None:
        raise RollbackError(
            "FlexGen with a versioned compressor cannot roll back by hiding positions (the stored forms, KIVI's "
            "groups or MiKV's tiers, depend on the discarded tokens); take cache.snapshot() before the speculative "
            "tokens and cache.restore() it")

    def attend(self, q, k, v, mask):
        """FlexGen's sparse values over what ``update`` gathered: a row's own key is its newest readable column
        (stored keys come in position order, the new token last; a padded row reads only its own slot)."""
        s = self.policy.cfg.attn_sparsity
        if s >= 1:
            return None
        col = torch.arange(1, mask.shape[-1] + 1, device=mask.device)
        last = (mask * col).argmax(-1, keepdim=True)  # (B, H_kv, Tq, 1)
        own = torch.zeros_like(mask).scatter_(-1, last, True) & mask
        return sparse_attention(q, k, v, mask, own, s)
