"""Typed cache-policy settings (``cache:`` in recipes) and the factory that builds the policy hook.

Every policy parameter is a field here with its published default, so ``--print_config=comments``
documents the whole policy space. Fields of policies other than the selected one are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

from pikv_train.cache.compression.config import CompressorConfig
from pikv_train.errors import ConfigError, bad_value, check_range

PolicyName = Literal["full", "h2o", "streaming_llm", "quest", "flexgen", "lru", "lru_plus", "ada_kv", "duo_attention"]
POLICIES = ("full", "h2o", "streaming_llm", "quest", "flexgen", "lru", "lru_plus", "ada_kv", "duo_attention")


@dataclass
class CacheConfig:
    """Which cache scheduling policy the model trains and decodes under, its budget and its parameters."""

    policy: PolicyName = "full"
    """full | h2o | streaming_llm | quest | flexgen | lru | lru_plus | ada_kv | duo_attention."""
    budget: float = 1.0
    """Keys each query may read, per layer and kv-head: a fraction of the sequence (0 < b <= 1) or a
    token count (an integer > 1). For FlexGen it is the part of the cache kept in device memory."""
    reference_len: int | None = None
    """L, the fixed length a fractional budget refers to, the same in training and in the inference cache
    (never a padded batch's length): default the model's max_seq_len; recipes set it to data.seq_len.
    A budget of L tokens or more keeps every key: the policy is skipped with a warning."""

    # -- shared by the policies with sinks (StreamingLLM, LRU, LRU+, DuoAttention streaming heads)
    n_sink: int = 4
    """Attention-sink tokens always kept (StreamingLLM's start_size=4)."""

    # -- chunk-sequential eviction (H2O, LRU, LRU+) and AdaKV's re-selection cadence
    chunk_size: int = 32
    """C: eviction decisions are taken every C tokens and at the reference length L (capped at the recent
    window so every key is a candidate before it leaves the window, with a warning); C = 1 is per-token
    H2O/LRU. Decisions come from the attention each row pays over the keys it still holds (SPEC §7)."""
    heavy_ratio: float = 0.1
    """H2O heavy-hitter share (H2O's heavy_ratio 10%); with recent_ratio it splits the budget."""
    recent_ratio: float = 0.1
    """H2O/LRU/LRU+ recent-window share (10%): recent window = budget * recent / (heavy + recent)."""

    # -- LRU / LRU+
    lru_threshold: float = 0.05
    """tau: query s 'uses' key j when its attention A[s, j] >= tau."""
    lru_top_m: int = 4
    """... or when j is among the top-m keys of row s (0 disables the top-m rule)."""
    lru_plus_weights: tuple[float, float, float] = (0.3, 0.3, 0.4)
    """LRU+ score weights (recency, frequency, importance), each term normalised to [0, 1]."""

    # -- Quest
    page_size: int = 16
    """Quest page (chunk) size in tokens; each page keeps per-channel key min/max."""
    quest_dense_layers: int = 2
    """Quest leaves the first layers dense (2 in the paper's code)."""

    # -- AdaKV (+ SnapKV window scores)
    ada_alpha: float = 0.2
    """AdaKV safeguard: each head keeps at least its best alpha * budget keys, its window included (kvpress: 0.2)."""
    snap_window: int = 32
    """SnapKV observation window: the last w queries score the keys (and stay as the recent window)."""
    snap_kernel: int = 7
    """SnapKV max-pool kernel over key positions (paper configs: 7)."""

    # -- DuoAttention
    duo_gate_init: float = 1.0
    """Initial gate of every kv-head (1 = retrieval/full; DuoAttention starts from full attention)."""
    duo_l1_weight: float = 0.05
    """L1 penalty weight on the gates (DuoAttention reg_weight 0.05); exported as cache/l1_penalty."""
    duo_threshold: float = 0.5
    """At inference (eval mode) heads with gate >= threshold keep the full cache, the others stream."""
    duo_hard: bool = False
    """Use thresholded (hard) gates in training too (exact with the inference cache)."""

    # -- FlexGen
    offload_device: str = "cpu"
    """Where FlexGen places the part of the KV cache that exceeds the device budget."""
    attn_sparsity: float = 1.0
    """FlexGen attn_sparsity: each query keeps the softmax weights of its top int(s * n_past) earlier keys
    plus its own key, not renormalised (1.0 = dense)."""
    sparse_top_k: int = 0
    """Removed (kept so checkpoints written before it was replaced still load): must stay 0; use attn_sparsity."""
    kv_bits: int = 0
    """FlexGen compress_cache: 4 (or 8) bit group-wise min/max quantization of the stored keys and values,
    trained with a straight-through estimator (0 = off; FlexGen uses 4)."""
    kv_group_size: int = 64
    """Quantization group along the head dimension (FlexGen: 64), zero-padded up to a multiple."""

    # -- KV storage compression (SPEC §6), with any policy
    compressor: CompressorConfig = field(default_factory=CompressorConfig)
    """How each kept token is stored: {name: none | quantized | svd | lora | lora_plus | pruning, ...}."""

    def validate(self) -> "CacheConfig":
        """Raise a one-line ConfigError naming the fix (called by ``build_policy`` and the policies, so the
        CLI reports it as ``error: ...`` rather than as a parse error)."""
        k = "model.init_args.cache."
        if self.policy not in POLICIES:
            raise bad_value(k + "policy", self.policy, f"choose one of {', '.join(POLICIES)}", f"fix {k}policy")
        b = self.budget
        if not (b > 0) or (b > 1 and float(b) != int(b)):
            raise ConfigError(f"{k}budget={b} is out of range; use a fraction in (0, 1] or a whole token count > 1 "
                              f"(e.g. {k}budget 0.5 for half the keys, or 64 tokens)")
        for name, lo in (("n_sink", 0), ("chunk_size", 1), ("page_size", 1), ("snap_window", 1), ("snap_kernel", 1),
                         ("lru_top_m", 0), ("quest_dense_layers", 0), ("kv_group_size", 1)):
            check_range(k + name, getattr(self, name), lo=lo, fix=f"set {k}{name} >= {lo}")
        check_range(k + "ada_alpha", self.ada_alpha, lo=0, hi=1, fix=f"set {k}ada_alpha in [0, 1] (kvpress: 0.2)")
        if self.kv_bits not in (0, 4, 8):
            raise bad_value(k + "kv_bits", self.kv_bits, "choose 0 (off), 4 or 8", f"set {k}kv_bits to 0, 4 or 8")
        if self.kv_bits == 4 and self.kv_group_size % 2:
            raise bad_value(k + "kv_group_size", self.kv_group_size, "must be even with kv_bits 4 (two values a byte)",
                            f"set {k}kv_group_size to an even number (FlexGen: 64)")
        if self.sparse_top_k:
            raise ConfigError("cache.sparse_top_k was replaced by cache.attn_sparsity (FlexGen's fraction of earlier "
                              "keys each query keeps, e.g. 0.25); remove sparse_top_k")
        check_range(k + "attn_sparsity", self.attn_sparsity, lo=0, hi=1, lo_open=True,
                    fix=f"set {k}attn_sparsity in (0, 1] (1 = dense)")
        if self.reference_len is not None:
            check_range(k + "reference_len", self.reference_len, lo=1,
                        fix=f"set {k}reference_len >= 1 (or null: the model's max_seq_len)")
        check_range(k + "lru_threshold", self.lru_threshold, lo=0, hi=1, lo_open=True,
                    fix=f"set {k}lru_threshold in (0, 1]: a query 'uses' a key when its attention weight reaches it")
        check_range(k + "recent_ratio", self.recent_ratio, lo=0, lo_open=True, fix=f"set {k}recent_ratio > 0")
        check_range(k + "heavy_ratio", self.heavy_ratio, lo=0, fix=f"set {k}heavy_ratio >= 0")
        check_range(k + "duo_threshold", self.duo_threshold, lo=0, hi=1, fix=f"set {k}duo_threshold in [0, 1]")
        check_range(k + "duo_l1_weight", self.duo_l1_weight, lo=0, fix=f"set {k}duo_l1_weight >= 0")
        self.compressor = CompressorConfig.from_any(self.compressor).validate()
        name = self.compressor.name
        from pikv_train.cache.compression.config import EVICTING

        if name in EVICTING and self.policy != "full":
            raise ConfigError(f"{k}compressor.name={name} chooses which tokens stay, as {k}policy={self.policy} does; "
                              f"keep one (set {k}policy full to use {name})")
        if name != "none" and self.kv_bits:
            raise ConfigError(f"{k}kv_bits={self.kv_bits} and {k}compressor.name={name} both compress the stored "
                              f"keys/values; keep one (set {k}kv_bits 0 or {k}compressor.name none)")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "CacheConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown cache settings {sorted(unknown)}; valid keys: {sorted(names)}")
        d = dict(d)
        if "lru_plus_weights" in d:
            d["lru_plus_weights"] = tuple(d["lru_plus_weights"])
        if "compressor" in d:
            d["compressor"] = CompressorConfig.from_any(d["compressor"])
        return cls(**d)


def build_policy(cfg: CacheConfig | dict | None, model_cfg=None):
    """The policy hook for ``cfg`` (None for ``full`` without a compressor; the policy holds the compressor).

    Args:
        model_cfg: the decoder's ModelConfig; required by ``duo_attention`` (its gates are one parameter
            per layer and kv-head).
    """
    if isinstance(cfg, dict):
        cfg = CacheConfig.from_dict(cfg)
    if cfg is None:
        return None
    if cfg.validate().policy == "full" and cfg.compressor.name == "none":
        return None
    from pikv_train.cache import policies as P
    from pikv_train.cache.compression import TOKEN_COMPRESSORS, token_compressor_class

    if cfg.compressor.name in TOKEN_COMPRESSORS:  # the token compressor is the policy
        return token_compressor_class(cfg.compressor.name)(cfg, model_cfg)

    cls = {
        "full": P.FullScheduler,
        "h2o": P.H2OScheduler,
        "streaming_llm": P.StreamingLLMScheduler,
        "quest": P.QuestScheduler,
        "flexgen": P.FlexGenScheduler,
        "lru": P.LRUScheduler,
        "lru_plus": P.LRUPlusScheduler,
        "ada_kv": P.AdaKVScheduler,
        "duo_attention": P.DuoAttentionScheduler,
    }[cfg.policy]
    return cls(cfg, model_cfg)
