"""The storage-compressor interface (SPEC §6): one object gives the training-time K/V and the cache's storage.

A compressor acts in two places, built from the same code so that decoding equals training (SPEC §7):

* **training forward**: :meth:`KVCompressor.kv` returns the keys/values every read sees (rounded ones with a
  straight-through gradient; low-rank ones computed through the latent). The cache policy and expert sharding
  score and mask with these keys, exactly as their caches do with what they hold.
* **inference cache**: the same call also returns the *codes* of the new tokens (what is stored: packed codes,
  latents, kept channels); a per-(sequence, kv-head) :class:`Store` keeps them, decodes them when read
  (:meth:`KVCompressor.decode`) and counts its bytes.

Compressors whose stored form depends on the reading query's position (KIVI's full-precision residual,
MiKV's tiers) are *versioned*: the training forward gets :class:`Versions` (which stored form row t reads
for key j), and their caches take one token per step (``row_by_row``: a prompt is fed as decode steps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pikv_train.cache.compression.config import CompressorConfig


def tensors_nbytes(obj) -> int:
    from pikv_train.cache.policies.base import tensor_bytes

    return tensor_bytes(obj)


@dataclass
class Versions:
    """Training view of a versioned compressor: row t reads key/value j from exactly one block.

    keys/values: per block (B, H_kv, T, hd); select: per block (B|1, H_kv|1, T, T) bool, a partition of the
    causal (t, j) pairs. Which stored form of key j row t reads is given either by a prefix rule (KIVI:
    ``key_q`` (B, H_kv, T, hd) the stored keys, read for j < ``key_cut[t]``) or per pair (``key_index``
    (B|1, H_kv|1, T, T) into ``keys``: MiKV's tiers).
    """

    keys: list[Tensor]
    values: list[Tensor]
    select: list[Tensor]
    key_q: Tensor | None = None
    key_cut: Tensor | None = None
    key_index: Tensor | None = None
    chunk: int | None = None
    """Set when rows in blocks of ``chunk`` read every key in one form (MiKV: tiers change only at a decision):
    the attention then runs per block over the keys and values as block c's rows read them (``chunk_tier``),
    instead of over the concatenated forms (a third of the work)."""
    chunk_tier: Tensor | None = None
    """(B, H_kv, nC, T) long: the form (index into ``keys``/``values``) block c's rows read key j in."""
    chunk_evicted: Tensor | None = None
    """(B, H_kv, nC, T) bool: keys block c's rows cannot read at all (the PiKV hybrid's fourth tier); the caller
    removes them from the mask (:func:`pikv_train.models.attention.tiered_versions`)."""

    def expand_mask(self, mask: Tensor | None, t: int) -> Tensor:
        """(B|1, 1|H_kv, T, T) visibility (None: causal) -> (B|1, 1|H_kv, T, n_blocks * T) over the blocks."""
        if mask is None:
            mask = torch.ones(t, t, dtype=torch.bool, device=self.keys[0].device).tril()[None, None]
        return torch.cat([mask & s for s in self.select], -1)

    def expand(self, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Keys (B, H_kv, nT, hd), values and mask over the concatenated blocks, for one SDPA call."""
        t = self.keys[0].shape[2]
        return torch.cat(self.keys, 2), torch.cat(self.values, 2), self.expand_mask(mask, t)

    def attend_chunked(self, q: Tensor, mask: Tensor | None, group: int, n_groups: int = 8) -> Tensor:
        """SDPA of q (B, H, T, hd) with row block c reading ``chunk_keys[:, :, c]``; mask (B|1, 1|H_kv, T, T)
        (None: causal). Blocks become batch entries, (B * n, H, chunk, hd) queries against (B * n, H_kv, e, hd)
        keys, in up to ``n_groups`` runs of consecutive blocks, each reading only the keys before its last row
        (causal: about half the work of every block reading all T keys)."""
        import torch.nn.functional as F

        b, h, t, hd = q.shape
        c, hkv, n = self.chunk, self.chunk_tier.shape[1], self.chunk_tier.shape[2]
        if mask is None:
            mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()[None, None]
        pad = n * c - t
        if pad:  # rows padded to whole blocks; a padded row reads key 0 only and is dropped
            q = F.pad(q, (0, 0, 0, pad))
            extra = torch.zeros(*mask.shape[:2], pad, t, dtype=torch.bool, device=q.device)
            extra[..., 0] = True
            mask = torch.cat([mask, extra], 2)
        mb, mh = mask.shape[:2]
        k0, v0 = self.keys[0], self.values[0]  # the exact keys/values (B, H_kv, T, hd)
        # The stored forms without gradient, (B, H_kv, n_forms, T, hd): gathered per run of blocks below.
        k_forms = torch.stack([x.detach() for x in self.keys], 2)
        v_forms = torch.stack([x.detach() for x in self.values], 2)
        cuts = sorted({round(i * n / min(n, n_groups)) for i in range(min(n, n_groups) + 1)})
        out = []
        for a, z in zip(cuts, cuts[1:]):
            m, e = z - a, min(z * c, t)  # blocks in this run; keys its rows can read
            qc = q[:, :, a * c: z * c].reshape(b, h, m, c, hd).transpose(1, 2).reshape(b * m, h, c, hd)
            # Stored forms (no gradient) plus x - x.detach() (zero): forward exactly the stored numbers, gradient
            # the identity to the exact keys/values (straight-through), without a gradient of the whole block tensor.
            idx = self.chunk_tier[:, :, a:z, :e, None].expand(-1, -1, -1, -1, hd)  # (B, H_kv, m, e, hd)
            kc = k_forms[:, :, :, :e].gather(2, idx) + (k0[:, :, None, :e] - k0[:, :, None, :e].detach())
            vc = v_forms[:, :, :, :e].gather(2, idx) + (v0[:, :, None, :e] - v0[:, :, None, :e].detach())
            kc, vc = (x.transpose(1, 2).reshape(b * m, hkv, e, hd) for x in (kc, vc))
            mc = mask[:, :, a * c: z * c, :e].reshape(mb, mh, m, c, e).transpose(1, 2)
            mc = mc.expand(b, m, mh, c, e).reshape(b * m, mh, c, e)
            if mh > 1 and group > 1:
                mc = mc.repeat_interleave(group, dim=1)
            y = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mc, enable_gqa=group > 1)
            out.append(y.view(b, m, h, c, hd).transpose(1, 2).reshape(b, h, m * c, hd))
        return torch.cat(out, 2)[:, :, :t]

    def blocks(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        """(keys, values, select) per stored form: row t reads key/value j from the one block whose select
        ((T, T) or (B|1, H_kv|1, T, T) bool) holds (t, j) (for attention that is not one SDPA call: FlexGen's sparse values)."""
        if self.key_index is None:
            return list(zip(self.keys, self.values, self.select))
        return [(k, v, self.key_index == i) for i, (k, v) in enumerate(zip(self.keys, self.values))]

    def keys_in_block(self, c: int) -> Tensor:
        """(B, H_kv, T, hd) the keys as the rows of block c read them (no gradient)."""
        forms = torch.stack([x.detach() for x in self.keys], 2)  # (B, H_kv, n_forms, T, hd)
        idx = self.chunk_tier[:, :, c, None, :, None].expand(-1, -1, 1, -1, forms.shape[-1])
        return forms.gather(2, idx)[:, :, 0]

    def keys_at(self, row: int, k: Tensor) -> Tensor:
        """(…, T, hd) the keys as row ``row`` reads them (prefix rule: stored form below the cut)."""
        j = torch.arange(k.shape[-2], device=k.device)
        return torch.where((j < self.key_cut[row])[:, None], self.key_q, k)

    def logits(self, q: Tensor, k: Tensor, rows: Tensor, view=None) -> Tensor:
        """q (…, Tr, hd) queries of rows ``rows`` (Tr,) -> (…, Tr, T) logits over the keys as those rows read
        them. ``k`` is the full-precision keys in the caller's layout and ``view`` maps a (B, H_kv, T, hd) tensor
        to that layout (e.g. ``lambda x: x.double()[:, :, None]``)."""
        view = view or (lambda x: x)
        full = q @ k.transpose(-1, -2)
        j = torch.arange(k.shape[-2], device=k.device)
        if self.key_index is None:
            stored = q @ view(self.key_q.detach()).transpose(-1, -2)
            return torch.where(j[None] < self.key_cut[rows][:, None], stored, full)
        idx = view(self.key_index[..., rows, :])  # (B, H_kv, Tr, T) into the caller's layout, as the keys
        out = full
        for i, kb in enumerate(self.keys[1:], start=1):
            out = torch.where(idx == i, q @ view(kb.detach()).transpose(-1, -2), out)
        return out


def scoring_logits(versions: Versions | None, q: Tensor, k: Tensor, rows: Tensor, view=None) -> Tensor:
    """Logits a policy scores with: ``q @ k^T``, or per-row stored forms under a versioned compressor
    (``view`` as in :meth:`Versions.logits`)."""
    if versions is None:
        return q @ k.transpose(-1, -2)
    return versions.logits(q, k, rows, view)


class Store:
    """What one (sequence, kv-head) stream holds: ``read`` gives the stored keys/values (S, hd) as a query at
    position ``t`` reads them (``pos`` (S,): the stored tokens' positions, kept by the policy cache);
    ``commit`` appends the new tokens' codes (dict of (n, ...)) and keeps the rows ``keep`` of (old + new)."""

    def read(self, t: int | None, pos: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def commit(self, codes: dict, pos_all: Tensor, keep: Tensor) -> None:
        raise NotImplementedError

    def nbytes(self) -> int:
        return tensors_nbytes(vars(self))

    def placed_rows(self, pos: Tensor) -> list[tuple[object, str, Tensor]]:
        """The per-token payload FlexGen's placement may move to host memory: ``(holder, attribute, row
        positions)`` for each tensor whose rows are tokens in position order (``pos`` (S,): the stored tokens'
        positions). Tables that every read needs (group ranges, scores) are not listed and stay on the device."""
        return []


class RawStore(Store):
    """No compressor: keys and values as computed."""

    def __init__(self, hd: int, like: Tensor):
        self.k, self.v = like.new_zeros(0, hd), like.new_zeros(0, hd)

    def read(self, t, pos):
        return self.k, self.v

    def commit(self, codes, pos_all, keep):
        self.k = torch.cat([self.k, codes["k"]])[keep]
        self.v = torch.cat([self.v, codes["v"]])[keep]


class CodeStore(Store):
    """A per-token (position-independent) compressor: each token's codes are stored as they are and decoded on read."""

    def __init__(self, comp: "KVCompressor", layer_idx: int, head: int):
        self.comp, self.layer, self.head = comp, layer_idx, head  # the compressor is shared, never copied
        self.codes: dict[str, Tensor] | None = None

    def read(self, t, pos):
        if self.codes is None:
            return None
        return self.comp.decode(self.layer, self.head, self.codes, pos)

    def commit(self, codes, pos_all, keep):
        merged = codes if self.codes is None else {n: torch.cat([self.codes[n], c]) for n, c in codes.items()}
        self.codes = {n: c[keep] for n, c in merged.items()}


class KVCompressor(nn.Module):
    """Base of the storage compressors. Subclasses implement :meth:`kv` and :meth:`decode` (and, when
    versioned, :meth:`versions` and :meth:`new_store`)."""

    name = "none"
    versioned = False
    """Stored form depends on the reading query's position (KIVI residual, MiKV tiers)."""

    def __init__(self, cfg: CompressorConfig, model_cfg):
        super().__init__()
        self.cfg = cfg
        self.n_layer, self.n_kv_head, self.head_dim = model_cfg.n_layer, model_cfg.n_kv_head, model_cfg.head_dim

    def attach(self, model) -> None:
        """Called when the policy holding this compressor is set on ``model`` (e.g. SVD initialisation)."""

    def detach(self, model) -> None:
        """Called when the policy holding this compressor leaves ``model`` (e.g. fold trained factors back)."""

    def fold(self, model) -> None:
        """Called before a checkpoint is written: write what the model's own weights should hold."""

    # ------------------------------------------------------------------ both passes
    def kv(self, layer_idx: int, attn, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, dict]:
        """Keys (B, H_kv, T, hd) rotated and values as reads see them, and the codes to store
        (dict of (B, H_kv, T, ...)). Default: the layer's own projection, stored raw."""
        k, v = attn.project_kv(x, cos, sin)
        return k, v, {"k": k, "v": v}

    def decode(self, layer_idx: int, head: int, codes: dict, pos: Tensor) -> tuple[Tensor, Tensor]:
        """Stored codes of one kv-head (S, ...) at positions ``pos`` (S,) -> keys (S, hd) rotated, values."""
        return codes["k"], codes["v"]

    def decode_batched(self, layer_idx: int, codes: dict, pos: Tensor) -> tuple[Tensor, Tensor]:
        """Codes (B, H_kv, S, ...) at positions (B, S) -> keys, values (B, H_kv, S, hd) (batched caches)."""
        b, h = pos.shape[0], self.n_kv_head
        out = [[self.decode(layer_idx, hi, {n: c[bi, hi] for n, c in codes.items()}, pos[bi]) for hi in range(h)]
               for bi in range(b)]
        return (torch.stack([torch.stack([o[0] for o in row]) for row in out]),
                torch.stack([torch.stack([o[1] for o in row]) for row in out]))

    def versions(self, layer_idx: int, k: Tensor, v: Tensor) -> Versions | None:
        """Training view of a versioned compressor (None: every read sees ``kv``'s keys/values)."""
        return None

    def new_store(self, layer_idx: int, head: int, like: Tensor) -> Store:
        return CodeStore(self, layer_idx, head)

    # ------------------------------------------------------------------ accounting
    def bytes_per_token_head(self, element_size: int, context: int) -> float:
        """Closed-form bytes one token's key + value take in one kv-head (codes, scales, latents), amortised
        over a ``context``-token cache (full-precision residuals, group tables)."""
        return 2 * self.head_dim * element_size

    def log_stats(self, stats: dict, element_size: int, context: int) -> None:
        stats["cache/compression_ratio"] = torch.tensor(
            self.bytes_per_token_head(element_size, context) / (2 * self.head_dim * element_size))

    def extra_repr(self) -> str:
        return f"name={self.name}"
