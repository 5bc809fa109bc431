"""Typed settings of the KV compressor (``cache.compressor:`` in recipes), SPEC §6.

One dataclass for the storage compressors (how a kept token is stored) and the token compressors (which tokens
are kept: FastV, PyramidKV, ChunkKV, KV-Distill; the PiKV hybrid does both); fields of compressors other than the selected one are ignored. Every
default is the published one where the paper has one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pikv_train.errors import ConfigError, bad_value, check_range

CompressorName = Literal["none", "quantized", "pyramid", "svd", "lora", "lora_plus", "pruning", "pikv", "fastv",
                         "pyramid_kv", "chunk_kv", "distillation"]
TOKEN_COMPRESSORS = ("fastv", "pyramid_kv", "chunk_kv", "distillation")
"""Compressors that choose which tokens stay (they act as the cache policy: ``cache.policy`` must be ``full``)."""
COMPRESSORS = ("none", "quantized", "pyramid", "svd", "lora", "lora_plus", "pruning", "pikv") + TOKEN_COMPRESSORS
EVICTING = TOKEN_COMPRESSORS + ("pikv",)
"""Compressors that decide which tokens stay (``cache.policy`` must be ``full``)."""
KEY = "model.init_args.cache.compressor."


@dataclass
class CompressorConfig:
    """How each kept token's key and value are stored (none | quantized | pyramid | svd | lora | lora_plus |
    pruning), or which tokens are kept (fastv | pyramid_kv | chunk_kv: token compressors, which take the cache
    policy's place)."""

    name: CompressorName = "none"
    """none | quantized (KIVI) | pyramid (MiKV mixed precision) | svd (Palu) | lora (learned latent) |
    lora_plus (lora with LoRA+ learning rates) | pruning (ThinK key channels) | pikv (PiKV hybrid: tiers and eviction
    by the PiKVRouter's importance) | fastv (FastV) | pyramid_kv (PyramidKV) | chunk_kv (ChunkKV) | distillation
    (KV-Distill: a learned scorer keeps tokens, LoRA-adapted K/V)."""

    # -- quantized (KIVI) and pyramid's low tiers
    bits: int = 2
    """KIVI: 2 or 4 bits per stored key/value element."""
    group_size: int = 32
    """KIVI G: keys are quantized per channel over groups of G tokens, values per token over groups of G
    channels (min(G, head_dim)); KIVI: 32."""
    residual: int = 128
    """KIVI R (a multiple of group_size): keys stay full precision until a block of R tokens fills, values for
    the most recent R tokens; KIVI: 128."""

    # -- pyramid (MiKV) and pikv (the PiKV hybrid)
    pyramid_bits: tuple[int, int] = (4, 2)
    """Bits of the two lower tiers (MiKV: the important tokens at full precision, the others at low precision)."""
    byte_budget: float = 0.3
    """Bytes per token as a fraction of the full-precision cache's; sets how many tokens each tier holds."""
    recent: int = 16
    """Most recent tokens always at full precision (MiKV keeps H2O's recent window in high precision)."""
    tier_every: int = 16
    """Tiers are re-decided every this many tokens (1 = at every token, as MiKV; larger is cheaper in training)."""

    # -- svd / lora / lora_plus
    rank: float = 0.25
    """Latent rank per kv-head: a fraction of head_dim (<= 1) or a whole number of channels (> 1)."""
    lora_plus_ratio: float = 16.0
    """LoRA+ lambda: the up-projection B trains at lambda x lr (Hayou et al.: 16)."""

    # -- pruning (ThinK)
    keep_channels: float = 0.6
    """Fraction of key channels kept per kv-head (ThinK's pruning ratio 0.4 keeps 0.6)."""

    # -- token compressors (fastv, pyramid_kv, chunk_kv): SnapKV-style observation window, decided causally
    obs_window: int = 32
    """Observation window w: the last w rows before a decision score the held keys, and the w most recent keys
    are always kept (capped at half the budget for pyramid_kv / chunk_kv / distillation). SnapKV / PyramidKV use
    32-64."""
    pool_kernel: int = 5
    """Pooling kernel over key positions of the window scores (SnapKV / PyramidKV / ChunkKV: 5; FastV: none)."""
    pooling: Literal["avgpool", "maxpool"] = "avgpool"
    """avgpool (PyramidKV's default) | maxpool."""
    pyramid_beta: int = 20
    """PyramidKV beta: the top layer keeps (budget - w) / beta selected tokens, the bottom layer
    2 (budget - w) - that, linearly in between (the same total as a uniform budget)."""
    chunk_length: int = 10
    """ChunkKV: tokens per chunk (kept or dropped whole; ChunkKV: 10)."""
    reuse_layers: int = 2
    """ChunkKV layer-wise index reuse: each group of this many consecutive layers keeps the chunks its first
    layer selects (1 = every layer selects)."""
    distill_rank: int = 8
    """KV-Distill: LoRA rank of the K/V projection adapters of the kept tokens."""
    fastv_layer: int = 2
    """FastV K: layers up to and including K keep every token; layer K's attention chooses what the later layers
    keep (FastV: K = 2)."""
    fastv_ratio: float = 0.5
    """FastV R: the share of the tokens outside the window that the layers after K drop (FastV: 50%)."""

    def validate(self) -> "CompressorConfig":
        if self.name not in COMPRESSORS:
            raise bad_value(KEY + "name", self.name, f"choose one of {', '.join(COMPRESSORS)}", f"fix {KEY}name")
        if self.bits not in (2, 4):
            raise bad_value(KEY + "bits", self.bits, "KIVI stores 2 or 4 bits", f"set {KEY}bits to 2 or 4")
        check_range(KEY + "group_size", self.group_size, lo=4, fix=f"set {KEY}group_size >= 4 (KIVI: 32)")
        if self.group_size % 4:
            raise bad_value(KEY + "group_size", self.group_size, "must be a multiple of 4 (2-bit codes fill bytes)",
                            f"set {KEY}group_size to a multiple of 4 (KIVI: 32)")
        if self.name == "quantized":
            check_range(KEY + "residual", self.residual, lo=self.group_size,
                        fix=f"set {KEY}residual to a multiple of group_size={self.group_size} (KIVI: 128)")
            if self.residual % self.group_size:
                raise bad_value(KEY + "residual", self.residual, f"must be a multiple of group_size={self.group_size}",
                                f"set {KEY}residual to a multiple of {self.group_size}")
        if len(self.pyramid_bits) != 2 or any(b not in (2, 4, 8) for b in self.pyramid_bits):
            raise bad_value(KEY + "pyramid_bits", list(self.pyramid_bits), "two of 2, 4, 8",
                            f"set {KEY}pyramid_bits e.g. [4, 2]")
        check_range(KEY + "byte_budget", self.byte_budget, lo=0, hi=1, lo_open=True,
                    fix=f"set {KEY}byte_budget in (0, 1]: bytes per token relative to full precision")
        check_range(KEY + "recent", self.recent, lo=0, fix=f"set {KEY}recent >= 0")
        check_range(KEY + "tier_every", self.tier_every, lo=1, fix=f"set {KEY}tier_every >= 1 (1 = every token)")
        r = self.rank
        if not (r > 0) or (r > 1 and float(r) != int(r)):
            raise ConfigError(f"{KEY}rank={r} is out of range; use a fraction of head_dim in (0, 1] or a whole "
                              f"number of channels > 1 (e.g. {KEY}rank 0.25)")
        check_range(KEY + "lora_plus_ratio", self.lora_plus_ratio, lo=0, lo_open=True,
                    fix=f"set {KEY}lora_plus_ratio > 0 (LoRA+: 16)")
        check_range(KEY + "keep_channels", self.keep_channels, lo=0, hi=1, lo_open=True,
                    fix=f"set {KEY}keep_channels in (0, 1] (ThinK: 0.6)")
        for f, lo, note in (("obs_window", 1, "SnapKV: 32"), ("pool_kernel", 1, "1 = no pooling; SnapKV: 5"),
                            ("pyramid_beta", 1, "PyramidKV: 20"), ("chunk_length", 1, "ChunkKV: 10"),
                            ("reuse_layers", 1, "1 = every layer selects"), ("fastv_layer", 0, "FastV: 2"),
                            ("distill_rank", 1, "e.g. 8")):
            check_range(KEY + f, getattr(self, f), lo=lo, fix=f"set {KEY}{f} >= {lo} ({note})")
        if self.pool_kernel % 2 == 0:
            raise bad_value(KEY + "pool_kernel", self.pool_kernel, "must be odd (centred pooling)",
                            f"set {KEY}pool_kernel to an odd number (SnapKV: 5)")
        if self.pooling not in ("avgpool", "maxpool"):
            raise bad_value(KEY + "pooling", self.pooling, "choose avgpool or maxpool", f"fix {KEY}pooling")
        check_range(KEY + "fastv_ratio", self.fastv_ratio, lo=0, hi=1, hi_open=True,
                    fix=f"set {KEY}fastv_ratio in [0, 1) (FastV: 0.5)")
        return self

    def rank_for(self, head_dim: int) -> int:
        """The latent rank in channels for a head dimension (a fraction <= 1, or a count > 1)."""
        r = int(self.rank) if self.rank > 1 else max(1, round(self.rank * head_dim))
        if r > head_dim:
            raise ConfigError(f"{KEY}rank={self.rank} exceeds head_dim={head_dim}; lower {KEY}rank")
        if r == head_dim:
            import warnings

            warnings.warn(f"{KEY}rank={self.rank} keeps all {head_dim} channels of a head: the latent stores as many "
                          f"bytes as the keys/values (rank <= 1 is a fraction of head_dim); lower {KEY}rank",
                          stacklevel=2)
        return r

    @classmethod
    def from_any(cls, d) -> "CompressorConfig":
        if d is None:
            return cls()
        if isinstance(d, cls):
            return d
        if isinstance(d, str):
            return cls(name=d)
        d = dict(d)
        if "pyramid_bits" in d:
            d["pyramid_bits"] = tuple(d["pyramid_bits"])
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown {KEY[:-1]} settings {sorted(unknown)}; valid keys: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)
