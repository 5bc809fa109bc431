"""Sparse upcycling (Komatsuzaki et al., ICLR 2023): a pretrained dense decoder becomes an MoE decoder.

``student.upcycle: {n_experts, router, noise}`` replaces every layer's dense SwiGLU (d_model -> d_ff -> d_model) by
an MoE layer of ``n_experts`` SwiGLU experts of width ``d_expert = d_ff``, each a copy of that dense FFN, under a
freshly initialised router (any of ``pikv_train.routing``). Attention, norms, embeddings and head are kept as they
are. This is the paper's recipe: every expert starts as the dense MLP, the router starts random, and continued
training makes the experts diverge.

Why exact copies by default (``noise: 0``): with a router whose weights sum to 1 over the chosen experts
(``normalize_weights: true``, no expert capacity dropping assignments), sum_i w_i FFN(x) = FFN(x), so the upcycled
model starts with exactly the dense model's outputs: nothing learnt is lost at step 0. The price is symmetry: while
the experts are equal the router's choice does not change the output, so the router learns only from its balancing
losses until the experts drift apart through the different tokens they receive. ``noise > 0`` breaks the symmetry
at once: each expert's weights are multiplied elementwise by (1 + noise * N(0, 1)), independently per expert
(multiplicative, so a weight's perturbation is relative to its own scale and zero weights stay zero), at the cost
of starting slightly away from the dense model. Our understanding is that the paper found such perturbations of
the copies unnecessary; it is offered as an option, off by default.

The resolved model config (what checkpoints store) is the MoE one, with ``upcycle`` null: a checkpoint of an
upcycled student reloads as an ordinary MoE decoder.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from pikv_train.errors import ConfigError, check_range
from pikv_train.routing.base import RouterConfig

KEY = "model.init_args.{model|student}.upcycle"


@dataclass
class UpcycleConfig:
    """Sparse upcycling of the dense FFN into ``n_experts`` copies under a fresh router."""

    n_experts: int = 4
    """Experts per layer, each a copy of the layer's dense SwiGLU (width d_expert = the dense d_ff)."""
    router: RouterConfig = field(default_factory=RouterConfig)
    """The new router (randomly initialised): which router, top-k, loss weights, capacity. With normalize_weights
    true and no capacity_factor the upcycled model starts equal to the dense one (when noise is 0)."""
    noise: float = 0.0
    """Multiplicative noise on the copies: each expert weight w becomes w * (1 + noise * N(0, 1)), drawn per expert
    (torch's global generator: seed_everything fixes it). 0 = exact copies, as in the paper."""

    @classmethod
    def from_dict(cls, d: dict) -> "UpcycleConfig":
        d = dict(d)
        router = d.pop("router", None)
        return cls(**d, router=RouterConfig(**router) if isinstance(router, dict) else (router or RouterConfig()))

    def validate(self) -> None:
        check_range(f"{KEY}.n_experts", self.n_experts, lo=1, fix=f"set {KEY}.n_experts to a positive integer")
        check_range(f"{KEY}.noise", self.noise, lo=0, fix=f"set {KEY}.noise to 0 (exact copies) or a small positive "
                    "scale such as 0.01")
        if self.router.top_k > self.n_experts:
            raise ConfigError(f"{KEY}.router.top_k={self.router.top_k} exceeds n_experts={self.n_experts}; lower "
                              f"{KEY}.router.top_k or raise {KEY}.n_experts")


def upcycled_config(cfg):
    """The MoE ModelConfig that upcycling the dense ``cfg`` (with ``cfg.upcycle`` set) gives: moe = (n_experts,
    d_expert = d_ff, the upcycle router), upcycle null."""
    from pikv_train.models.config import MoEConfig

    u = cfg.upcycle
    return replace(cfg, moe=MoEConfig(n_experts=u.n_experts, d_expert=cfg.d_ff, router=replace(u.router)), upcycle=None)


@torch.no_grad()
def upcycle(model) -> None:
    """Turn the dense decoder ``model`` (its ``cfg.upcycle`` set, its dense weights loaded) into the MoE decoder of
    :func:`upcycled_config`, in place: each block's SwiGLU is replaced by an MoE layer whose experts copy it (plus
    ``noise``) and whose router is initialised as a fresh decoder's; ``model.cfg`` becomes the MoE config."""
    from pikv_train.models.decoder import Decoder
    from pikv_train.models.moe import MoEFeedForward

    if model.cfg.moe is not None:
        raise ConfigError(f"{KEY} needs a dense decoder to upcycle, and this one is already MoE; set "
                          "model.init_args.{model|student}.upcycle: null")
    noise = model.cfg.upcycle.noise
    cfg = upcycled_config(model.cfg)
    for blk in model.blocks:
        dense = blk.ffn
        ref = dense.gate.weight
        moe = MoEFeedForward(cfg.d_model, cfg.moe, max_seq_len=cfg.max_seq_len).to(device=ref.device, dtype=ref.dtype)
        moe.router.apply(Decoder._init)  # the router a freshly built MoE decoder would have
        for expert in moe.experts:
            for name in ("gate", "up", "down"):
                w = getattr(dense, name).weight  # gate/up (d_ff, d), down (d, d_ff)
                if noise:
                    w = w * (1 + noise * torch.randn_like(w))
                getattr(expert, name).weight.copy_(w)
        blk.ffn = moe
    model.cfg = cfg

