"""KIVI (Liu et al., ICML 2024): 2/4-bit KV cache, keys per channel, values per token, full-precision residual.

What is stored, per (sequence, kv-head), as in KIVI's ``KIVI_LlamaAttention``:

* **keys** are quantized *per channel*: the tokens of a group of G positions (``group_size``, KIVI 32)
  share one min and one scale per channel. Keys stay full precision in a residual of up to R tokens
  (``residual``, KIVI 128, a multiple of G); when the residual fills it is quantized as R / G groups. So
  query t reads keys j < R * floor(t / R) quantized and the later ones exact.
* **values** are quantized *per token* (groups of min(G, head_dim) channels); the most recent R + 1 tokens
  (the current one included) stay full precision: KIVI appends the new value, attends, and quantizes the
  oldest when the residual holds more than R. So query t reads value j quantized iff t - j > R.

Codes are packed (four 2-bit or two 4-bit codes a byte), min and scale kept in the data's dtype, with the
quantization code FlexGen's ``kv_bits`` uses (:mod:`pikv_train.cache.quant`). Keys are quantized after
RoPE, as in KIVI.

Training forward (straight-through estimator): each (row t, key j) pair is read from one of three blocks,
(quantized key, quantized value), (quantized key, exact value), (exact key, exact value), by the rules above,
in one SDPA over the concatenated blocks; cache policies score with the keys as each row reads them.

Deviations, each to keep training equal to decoding: (a) KIVI's prefill attends at full precision and
quantizes afterwards; here a prompt follows the decode rule row by row (the cache takes the prompt as decode
steps). (b) With an evicting cache policy, a key group's min/max covers every key of the group that was ever
written (the cache keeps a running per-channel min/max of the open group), so evicting a member before the
group is quantized does not change the other members' codes; KIVI has no eviction. (c) A value group
longer than head_dim is cut to head_dim; when head_dim is not a multiple of the group, the last group is padded
with zeros that take part in its min/max (FlexGen's rule), where KIVI requires a multiple.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pikv_train.cache.compression.base import KVCompressor, Store, Versions
from pikv_train.cache.quant import (dequantize_codes, group_dequantize, group_quantize, minmax_scale, pack,
                                    quantize_codes, unpack)
from pikv_train.errors import ConfigError


def _ste(x: Tensor, xq: Tensor) -> Tensor:
    """Forward exactly ``xq`` (the value the cache stores, in any dtype), gradient the identity."""
    return xq + (x - x.detach())


class KIVIStore(Store):
    """One (sequence, kv-head): [quantized keys | residual keys], [quantized values | full values], in position
    order, plus the per-channel min/scale of each quantized key group and the running min/max of open groups."""

    def __init__(self, comp: "QuantizedCompressor", like: Tensor):
        hd = comp.head_dim
        self.bits, self.g, self.r, self.gv = comp.cfg.bits, comp.cfg.group_size, comp.cfg.residual, comp.value_group
        z = lambda *s, dt=like.dtype: torch.zeros(*s, dtype=dt, device=like.device)  # noqa: E731
        # Quantized keys (Nq, hd*b/8) packed along channels; a key's group is its position // G (the policy cache
        # holds the positions), so no per-token group id is stored.
        self.k_codes = z(0, hd * self.bits // 8, dt=torch.uint8)
        self.g_id, self.g_mn, self.g_scale = z(0, dt=torch.long), z(0, hd), z(0, hd)  # quantized groups
        self.o_id, self.o_mn, self.o_mx = z(0, dt=torch.long), z(0, hd, dt=torch.float32), z(0, hd, dt=torch.float32)
        self.k_res = z(0, hd)  # (Nr, hd)
        npad = -(-hd // self.gv) * self.gv
        self.v_codes = z(0, npad * self.bits // 8, dt=torch.uint8)
        self.v_mn, self.v_scale = z(0, npad // self.gv, 1), z(0, npad // self.gv, 1)
        self.v_full = z(0, hd)
        self.hd = hd

    def _advance(self, t: int, pos: Tensor) -> None:
        """Quantize what a query at position t reads quantized: keys below R * floor(t / R), values t - j > R."""
        nq, mq = len(self.k_codes), len(self.v_codes)
        cut = self.r * (t // self.r)
        flush = int((pos[nq: nq + len(self.k_res)] < cut).sum())
        if flush:
            keys, gid = self.k_res[:flush], pos[nq: nq + flush] // self.g
            new_groups = ~torch.isin(self.o_id, self.g_id) & (self.o_id < cut // self.g)
            mn, sc = minmax_scale(self.o_mn[new_groups], self.o_mx[new_groups], self.bits, keys.dtype)
            self.g_id = torch.cat([self.g_id, self.o_id[new_groups]])
            self.g_mn, self.g_scale = torch.cat([self.g_mn, mn]), torch.cat([self.g_scale, sc])
            row = torch.searchsorted(self.g_id, gid)
            codes = quantize_codes(keys, self.g_mn[row], self.g_scale[row], self.bits)  # per channel
            self.k_codes = torch.cat([self.k_codes, pack(codes, self.bits)])
            self.k_res = self.k_res[flush:]
        done = self.o_id < cut // self.g  # complete groups: their min/max now live in the group table (or nowhere)
        self.o_id, self.o_mn, self.o_mx = self.o_id[~done], self.o_mn[~done], self.o_mx[~done]
        self._drop_unused_groups(pos[: len(self.k_codes)])
        old = int((pos[mq: mq + len(self.v_full)] < t - self.r).sum())
        if old:
            qt = group_quantize(self.v_full[:old], self.bits, self.gv)
            self.v_codes = torch.cat([self.v_codes, qt.codes])
            self.v_mn, self.v_scale = torch.cat([self.v_mn, qt.mn]), torch.cat([self.v_scale, qt.scale])
            self.v_full = self.v_full[old:]

    def _drop_unused_groups(self, pos_q: Tensor) -> None:
        """Keep the min/scale of the groups that still have a quantized key (positions ``pos_q``)."""
        used = torch.isin(self.g_id, pos_q // self.g)
        self.g_id, self.g_mn, self.g_scale = self.g_id[used], self.g_mn[used], self.g_scale[used]

    def read(self, t, pos):
        if t is not None:
            self._advance(t, pos)
        row = torch.searchsorted(self.g_id, pos[: len(self.k_codes)] // self.g)
        kq = dequantize_codes(unpack(self.k_codes, self.bits), self.g_mn[row], self.g_scale[row]).to(self.k_res.dtype)
        vq = group_dequantize_rows(self.v_codes, self.v_mn, self.v_scale, self.bits, self.gv, self.hd, self.v_full.dtype)
        return torch.cat([kq, self.k_res]), torch.cat([vq, self.v_full])

    def commit(self, codes, pos_all, keep):
        k_new, v_new = codes["k"], codes["v"]
        p_new = pos_all[len(pos_all) - len(k_new):]
        # Running per-channel min/max of every key ever written to an open group (before any eviction).
        for gid in torch.unique(p_new // self.g).tolist():
            kg = k_new[p_new // self.g == gid].float()
            hit = (self.o_id == gid).nonzero().flatten()
            if len(hit):
                i = int(hit[0])
                self.o_mn[i] = torch.minimum(self.o_mn[i], kg.amin(0))
                self.o_mx[i] = torch.maximum(self.o_mx[i], kg.amax(0))
            else:
                self.o_id = torch.cat([self.o_id, torch.tensor([gid], device=kg.device)])
                self.o_mn, self.o_mx = torch.cat([self.o_mn, kg.amin(0)[None]]), torch.cat([self.o_mx, kg.amax(0)[None]])
        self.k_res, self.v_full = torch.cat([self.k_res, k_new]), torch.cat([self.v_full, v_new])
        nq, mq = len(self.k_codes), len(self.v_codes)
        self.k_codes, self.k_res = self.k_codes[keep[:nq]], self.k_res[keep[nq:]]
        self.v_codes, self.v_mn, self.v_scale = self.v_codes[keep[:mq]], self.v_mn[keep[:mq]], self.v_scale[keep[:mq]]
        self.v_full = self.v_full[keep[mq:]]
        self._drop_unused_groups(pos_all[keep][: len(self.k_codes)])


    def placed_rows(self, pos):
        nq, mq = len(self.k_codes), len(self.v_codes)
        return [(self, "k_codes", pos[:nq]), (self, "k_res", pos[nq:]),
                *((self, f, pos[:mq]) for f in ("v_codes", "v_mn", "v_scale")), (self, "v_full", pos[mq:])]


def group_dequantize_rows(codes, mn, scale, bits, group, dim, dtype) -> Tensor:
    """Per-token group-quantized rows (n, D_pad * b / 8) -> (n, dim)."""
    c = unpack(codes, bits)
    c = c.view(codes.shape[0], c.shape[1] // group, group)
    return dequantize_codes(c, mn, scale).flatten(-2)[:, :dim].to(dtype)


class QuantizedCompressor(KVCompressor):
    """KIVI: keys per channel and values per token at 2 or 4 bits with a full-precision residual."""

    name = "quantized"
    versioned = True

    def __init__(self, cfg, model_cfg):
        super().__init__(cfg, model_cfg)
        self.value_group = min(cfg.group_size, self.head_dim)
        if self.value_group * cfg.bits % 8:
            raise ConfigError(f"model.init_args.cache.compressor: value groups of {self.value_group} channels x "
                              f"{cfg.bits} bits do not fill whole bytes; use a head_dim that is a multiple of 4")

    def quantized_keys(self, k: Tensor) -> Tensor:
        """(B, H_kv, T, hd) -> keys as stored once their group is quantized (per channel, groups of G tokens)."""
        qt = group_quantize(k.detach().transpose(-1, -2), self.cfg.bits, self.cfg.group_size)
        return group_dequantize(qt)[..., : k.shape[2]].transpose(-1, -2)

    def quantized_values(self, v: Tensor) -> Tensor:
        return group_dequantize(group_quantize(v.detach(), self.cfg.bits, self.value_group))

    def versions(self, layer_idx, k, v):
        t, r = k.shape[2], self.cfg.residual
        kq, vq = _ste(k, self.quantized_keys(k)), _ste(v, self.quantized_values(v))
        i = torch.arange(t, device=k.device)
        cut = r * torch.div(i, r, rounding_mode="floor")  # (T,) keys j < cut[t] are read quantized
        causal = i[None] <= i[:, None]
        k_q = i[None] < cut[:, None]
        v_q = (i[:, None] - i[None]) > r  # implies k_q
        return Versions(keys=[kq, kq, k], values=[vq, v, v], select=[v_q, k_q & ~v_q, causal & ~k_q],
                        key_q=kq, key_cut=cut)

    def new_store(self, layer_idx, head, like):
        return KIVIStore(self, like)

    def bytes_per_token_head(self, element_size, context):
        """Bytes per token of one kv-head in a cache holding ``context`` tokens after the query at position
        context - 1, nothing evicted: key codes, each quantized key group's per-channel min/scale (and its id),
        value codes with their per-token min/scale, the full-precision residual keys and values, and the running
        fp32 min/max (and id) of the key groups still open. The residual amortises over the context."""
        hd, b, g, r, es = self.head_dim, self.cfg.bits, self.cfg.group_size, self.cfg.residual, element_size
        n = context
        n_kq = r * ((n - 1) // r)  # keys read quantized by the last query
        n_vq = max(0, n - 1 - r)  # values read quantized by the last query
        n_vg = -(-hd // self.value_group)
        groups, open_groups = n_kq // g, -(-n // g) - n_kq // g
        total = (n_kq * hd * b / 8 + groups * (2 * hd * es + 8) + (n - n_kq) * hd * es
                 + n_vq * (n_vg * self.value_group * b / 8 + 2 * n_vg * es) + (n - n_vq) * hd * es
                 + open_groups * (2 * hd * 4 + 8))
        return total / n
