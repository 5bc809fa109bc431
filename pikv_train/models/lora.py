"""LoRA / LoRA+ adapters on the decoder's attention and expert projections (SPEC §8).

``student.lora: {rank, alpha, dropout, targets, lora_plus_ratio}`` freezes the base weights and trains, on each
targeted ``nn.Linear`` W (out, in), a low-rank update: y = x W^T + (alpha / r) · dropout(x) A^T B^T with A (r, in)
(Kaiming-uniform, as LoRA) and B (out, r) zero at init, so the adapted model starts equal to the base. LoRA+ (Hayou
et al., 2024) trains B at ``lora_plus_ratio`` times the learning rate (its own optimizer group).

Why not peft: our cache machinery reads the K/V projection as a plain ``nn.Linear`` (the low-rank KV compressors
factor ``kv_proj.weight``, KV-Distill calls ``kv_proj(x)``); a peft-wrapped layer keeps the base weight under
``base_layer`` and adds the adapter only in its forward, so anything reading the weight would silently see the
un-adapted projection, and every checkpoint key of a targeted layer would move (``q_proj.base_layer.weight``).
:class:`LoRALinear` *is* the ``nn.Linear`` (same ``weight`` key, ``lora_A``/``lora_B`` beside it) and
:meth:`LoRALinear.merged_weight` gives the effective weight to whoever reads it (export, the K/V compressors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pikv_train.errors import ConfigError, check_range

ATTENTION = ("q_proj", "kv_proj", "o_proj")
FFN = ("gate", "up", "down")  # the dense SwiGLU's and every expert's (shared expert included)
TARGETS = ATTENTION + FFN


@dataclass
class LoRAConfig:
    """LoRA / LoRA+ adapters: the base weights freeze, low-rank updates of the targeted projections train."""

    rank: int = 8
    """r, the rank of each update."""
    alpha: float = 16.0
    """Scale alpha: the update is multiplied by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter's input (training only)."""
    targets: list[str] = field(default_factory=lambda: list(ATTENTION))
    """Projections that get adapters: q_proj, kv_proj, o_proj (attention), gate, up, down (the dense FFN's and every
    expert's); 'attention' and 'ffn' name those groups."""
    lora_plus_ratio: float = 1.0
    """LoRA+: B's learning rate is this times the optimizer's lr (1 = plain LoRA; LoRA+ suggests 16)."""
    train_router: bool = False
    """Keep the MoE routers trainable (else frozen with the base)."""
    train_norms: bool = False
    """Keep the RMSNorm weights trainable (else frozen with the base)."""
    save_merged: bool = False
    """Checkpoints hold the merged weights (a standalone model) instead of the trainable parameters plus a reference
    to the base (student.hf_path or student_init)."""

    def validate(self) -> "LoRAConfig":
        k = "model.init_args.student.lora."
        check_range(k + "rank", self.rank, lo=1, fix=f"set {k}rank to a positive integer (e.g. 8)")
        check_range(k + "alpha", self.alpha, lo=0, lo_open=True, fix=f"set {k}alpha > 0 (e.g. 2 x rank)")
        check_range(k + "dropout", self.dropout, lo=0, hi=1, fix=f"set {k}dropout in [0, 1)")
        check_range(k + "lora_plus_ratio", self.lora_plus_ratio, lo=0, lo_open=True,
                    fix=f"set {k}lora_plus_ratio > 0 (1 = LoRA, 16 = LoRA+)")
        names = self.target_names()
        bad = sorted(set(names) - set(TARGETS))
        if bad or not names:
            raise ConfigError(f"{k}targets {bad or '[]'} are not projections of the decoder; choose among "
                              f"{', '.join(TARGETS)} (or 'attention', 'ffn')")
        return self

    def target_names(self) -> list[str]:
        out = []
        for t in self.targets:
            out += list({"attention": ATTENTION, "ffn": FFN}.get(t, (t,)))
        return out


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` with a trainable low-rank update; ``weight`` (the frozen base) keeps its state-dict key."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(base.weight)
            if base.bias is not None:
                self.bias.copy_(base.bias)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.scaling = rank, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # LoRA's (and nn.Linear's) init for A; B = 0
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        # (..., in) -> (..., out): base, plus (alpha / r) B A x through the rank-r bottleneck (never the (out, in) delta).
        return F.linear(x, self.weight, self.bias) + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def delta(self) -> Tensor:
        """(out, in) the update (alpha / r) B A."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def merged_weight(self) -> Tensor:
        """(out, in) the effective weight W + (alpha / r) B A."""
        return self.weight + self.delta()

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the merged weight (and bias)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.merged_weight())
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}"


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Freeze ``model``'s weights (all but the routers / norms when ``cfg`` keeps them trainable, and the attention
    hooks' own parameters) and replace each targeted ``nn.Linear`` by a :class:`LoRALinear`; returns the names of
    the adapted modules. Idempotent on already adapted layers."""
    cfg.validate()
    targets = set(cfg.target_names())
    hooks = ("cache_policy", "kv_sharding")
    for name, p in model.named_parameters():
        keep = (cfg.train_router and ".router." in name) or (cfg.train_norms and "norm" in name.rsplit(".", 2)[-2])
        if not name.startswith(hooks) and not keep:
            p.requires_grad_(False)
    adapted = []
    for parent_name, parent in list(model.named_modules()):
        if parent_name.startswith(hooks) or ".router" in f".{parent_name}":  # a router's own `gate` is not the FFN's
            continue
        for child_name, child in list(parent.named_children()):
            if child_name in targets and type(child) is nn.Linear:
                setattr(parent, child_name, LoRALinear(child, cfg.rank, cfg.alpha, cfg.dropout))
                adapted.append(f"{parent_name}.{child_name}" if parent_name else child_name)
            elif isinstance(child, LoRALinear) and child_name in targets:
                adapted.append(f"{parent_name}.{child_name}")
    if not adapted:
        raise ConfigError(f"model.init_args.student.lora.targets {sorted(targets)} match no projection of this model "
                          "(e.g. gate/up/down of a model without that FFN); choose others")
    return adapted


def merge_lora(model: nn.Module) -> int:
    """Replace every :class:`LoRALinear` of ``model`` by a plain ``nn.Linear`` with the merged weight (in place);
    returns how many were merged."""
    n = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, child_name, child.merged())
                n += 1
    return n


def lora_b_params(model: nn.Module) -> list[nn.Parameter]:
    """The B factors (LoRA+'s faster group)."""
    return [m.lora_B for m in model.modules() if isinstance(m, LoRALinear) and m.lora_B.requires_grad]


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def check_with_cache(lora: LoRAConfig | None, compressor_name: str, qkv_bias: bool = False) -> None:
    """The low-rank KV compressors compute keys/values from their own factors of ``kv_proj``'s weight (an adapter on
    ``kv_proj`` would train without reaching the keys) and fold them into it (a LoRA checkpoint keeps only adapters and
    a base reference), and they ignore ``kv_proj``'s bias: refused with LoRA, and with ``qkv_bias``, in one line.
    Called by the tasks and by CachePolicySwitch."""
    if lora is not None and "kv_proj" in lora.target_names() and compressor_name in ("svd", "lora", "lora_plus"):
        raise ConfigError(f"student.lora adapts kv_proj, but cache.compressor {compressor_name} reads keys/values "
                          "through its own factors of that weight; drop kv_proj from student.lora.targets")
    if lora is not None and compressor_name in ("svd", "lora", "lora_plus"):
        raise ConfigError(f"student.lora with cache.compressor {compressor_name}: the compressor trains low-rank factors "
                          "of the frozen kv_proj and folds them into it, which a LoRA checkpoint (adapters + base "
                          "reference) does not keep; use quantized, pyramid or pruning, or drop student.lora")
    if qkv_bias and compressor_name in ("svd", "lora", "lora_plus"):
        raise ConfigError(f"cache.compressor {compressor_name} factors kv_proj's weight without its bias (qkv_bias, a "
                          "Qwen2 base); use another compressor (quantized, pyramid, pruning)")
