"""Router interface shared by every router, the plain top-k router and the Switch-balanced router.

Every router maps hidden states ``x`` of shape (N, d) to a :class:`RouterOutput`. The output carries the
statistics that the losses and metrics need (per-expert counts, mean probabilities, per-token
logsumexp), so nothing downstream runs a second pass over the logits.

Routing is causal by construction: a token's experts depend only on its own hidden state and on
parameters/buffers that change between optimizer steps, never on other tokens of the batch. The one
exception allowed by SPEC.md is capacity dropping (:mod:`pikv_train.routing.capacity`), which only decides
*whether* a chosen expert processes the token (dropped tokens pass through the residual), and does so
per sequence and causally: a token is only ever dropped because of earlier tokens of its own sequence.

Exact ties in a selection score go to the lowest expert index everywhere (:func:`topk_lowest_index`),
as in the Triton kernel, so a checkpoint routes the same on CPU and GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pikv_train.routing.capacity import apply_capacity, capacity_slots, new_capacity_state


@dataclass
class RouterConfig:
    """Typed settings for every router; each router reads the fields that apply to it."""

    name: Literal["base", "topk_balanced", "adaptive", "pikv", "eplb", "hierarchical"] = "topk_balanced"
    """Which router: base | topk_balanced | adaptive | pikv | eplb | hierarchical."""
    top_k: int = 2
    """Experts per token (the maximum for routers with a dynamic k)."""
    normalize_weights: bool = True
    """Renormalise the chosen experts' probabilities to sum to 1 (off: raw softmax probabilities)."""
    aux_loss_weight: float = 1e-2
    """Switch load-balancing loss weight alpha (loss = alpha * E * sum_i f_i * P_i)."""
    z_loss_weight: float = 1e-3
    """Router z-loss weight c_z (loss = c_z * mean_t logsumexp(r_t)^2)."""
    capacity_factor: float | None = None
    """Expert capacity per sequence: each expert takes at most C = ceil(top_k * L * cf / E) assignments of
    one sequence (position policy), where L is the model's max_seq_len, a fixed length, so C is the same
    for every batch and in training and decoding (a router used on its own, outside a model, takes L =
    the sequence length of the call). None = dropless."""
    drop_policy: Literal["position", "probability"] = "position"
    """Which assignments an over-full expert keeps, causally within each sequence: position = the first C
    (token-major, a hard load bound); probability = an online top-C by router probability: an assignment
    is kept iff fewer than C earlier assignments of its sequence to that expert are at least as probable
    (does not bound the load; see pikv_train/routing/capacity.py)."""
    p_threshold: float = 0.6
    """AdaptiveRouter: smallest expert set whose cumulative probability reaches this (top-p routing)."""
    k_min: int = 1
    """AdaptiveRouter / PiKVRouter: the fewest experts a token may use."""
    importance_threshold: float = 0.5
    """PiKVRouter: tokens with importance >= tau get top_k experts, others k_min."""
    importance_loss_weight: float = 1e-2
    """PiKVRouter: weight of the importance head's regression onto the (detached) attention mass."""
    score_fn: Literal["softmax", "sigmoid"] = "softmax"
    """EPLBRouter / HierarchicalRouter: how router logits become scores."""
    bias_update_rate: float = 1e-3
    """EPLBRouter: gamma in b_i <- b_i - gamma * sign(load_i - mean load), applied after each step."""
    route_scale: float = 1.0
    """EPLBRouter: constant multiplied onto the normalised weights (DeepSeek-V3's routed scaling)."""
    n_groups: int = 1
    """HierarchicalRouter: experts are split into this many equal groups."""
    topk_groups: int = 1
    """HierarchicalRouter: number of groups kept per token (M)."""
    n_devices: int = 1
    """EPLB planner: devices to pack experts onto (for the before/after device-load report)."""
    n_redundant: int = 0
    """EPLB planner: extra replicas handed to the hottest experts."""
    load_ema: float = 0.9
    """EPLB planner: moving-average decay of the per-expert load."""
    eplb_aux_loss_weight: float = 0.0
    """EPLBRouter: weight of a complementary Switch loss; 0 = auxiliary-loss-free (DeepSeek-V3). EPLBRouter
    ignores aux_loss_weight."""
    kernel: Literal["auto", "triton", "reference", "eager"] = "auto"
    """Router implementation for the fixed-k routers (base, topk_balanced, eplb, hierarchical): auto = the
    env var PIKV_ROUTER_KERNEL if set, else the fused Triton kernel on CUDA and eager PyTorch elsewhere;
    triton (CPU needs TRITON_INTERPRET=1); reference (pikv_kernels/router_reference.py); eager. adaptive and
    pikv always run eager (dynamic k)."""

    def __post_init__(self) -> None:
        from pikv_train.errors import check_range

        k = "model.init_args.{model|student}.moe.router"
        check_range(f"{k}.top_k", self.top_k, lo=1, fix=f"set {k}.top_k to at least 1 (experts per token)")
        if self.capacity_factor is not None:
            check_range(f"{k}.capacity_factor", self.capacity_factor, lo=0, lo_open=True,
                        fix=f"set {k}.capacity_factor > 0 (e.g. 1.25), or null for dropless routing")
        for name in ("aux_loss_weight", "z_loss_weight", "importance_loss_weight", "eplb_aux_loss_weight",
                     "bias_update_rate"):
            check_range(f"{k}.{name}", getattr(self, name), lo=0, fix=f"set {k}.{name} >= 0 (0 = off)")
        check_range(f"{k}.p_threshold", self.p_threshold, lo=0, hi=1, lo_open=True, fix=f"set {k}.p_threshold in (0, 1]")


@dataclass
class RouterOutput:
    """What every router returns (N tokens, E experts, K = the router's maximum k).

    ids:      (N, K) int64 expert ids; entries with ``valid == False`` are padding.
    valid:    (N, K) bool; False for unused slots (dynamic k) and for capacity-dropped assignments.
    weights:  (N, K) fp32 combine weights, 0 where not valid.
    logits:   (N, E) fp32 router logits.
    probs:    (N, E) fp32 router probabilities used by the balancing loss.
    counts:   (E,) fp32 number of routed assignments per expert (before capacity drops).
    lse:      (N,) fp32 per-token logsumexp of the logits (for the z-loss).
    losses:   weighted loss terms (already multiplied by their weights); ``loss`` is their sum.
    stats:    detached scalars for logging (``dropped``, ``mean_k``, ``load_max_over_mean``, router-specific).
    extras:   router-specific per-token tensors, e.g. PiKVRouter's ``importance`` (N,) (with grad, for
              :meth:`PiKVRouter.importance_loss`) and ``k`` (N,) tokens' expert counts.
    """

    ids: Tensor
    valid: Tensor
    weights: Tensor
    logits: Tensor
    probs: Tensor
    counts: Tensor
    lse: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, Tensor] = field(default_factory=dict)
    extras: dict[str, Tensor] = field(default_factory=dict)

    @property
    def loss(self) -> Tensor:
        """Sum of the router's weighted losses (0 when it has none)."""
        if not self.losses:
            return self.logits.new_zeros(())
        return torch.stack(list(self.losses.values())).sum()


def switch_loss(probs: Tensor, counts: Tensor, n_assign: int | Tensor) -> Tensor:
    """Switch-Transformer balance term E * sum_i f_i * P_i (unweighted).

    f_i = share of the N*k assignments that went to expert i (no gradient), P_i = mean probability.
    """
    n_experts = probs.shape[-1]
    f = counts / max(float(n_assign), 1.0)
    p_mean = probs.mean(0) if probs.shape[0] > 0 else probs.new_zeros(n_experts)
    return n_experts * (f.detach() * p_mean).sum()


def z_loss(lse: Tensor) -> Tensor:
    """Router z-loss mean_t logsumexp(r_t)^2 (unweighted)."""
    return (lse**2).mean() if lse.numel() else lse.new_zeros(())


def balance_losses(out: RouterOutput, aux_weight: float, z_weight: float) -> dict[str, Tensor]:
    """Weighted Switch loss (f_i over the routed assignments, i.e. ``counts.sum()``, before capacity drops)
    and z-loss; a term with weight 0 is left out."""
    losses = {}
    if aux_weight:
        losses["aux"] = aux_weight * switch_loss(out.probs, out.counts, out.counts.sum())
    if z_weight:
        losses["z"] = z_weight * z_loss(out.lse)
    return losses


def check_k_min(cfg: RouterConfig) -> None:
    """Validate k_min for the dynamic-k routers (1 <= k_min <= top_k)."""
    if not 1 <= cfg.k_min <= cfg.top_k:
        raise ValueError(
            f"router k_min={cfg.k_min} must be between 1 and top_k={cfg.top_k}; lower k_min or raise top_k"
        )


def topk_lowest_index(v: Tensor, k: int) -> Tensor:
    """Indices (..., k) of the k largest values along the last dim, in descending order, exact ties to the
    lowest index (the Triton kernel's rule; ``torch.topk`` breaks ties arbitrarily).

    One ``topk(k + 1)`` finds the rows whose result a tie could affect (two equal values among the top
    k + 1); only those rows are re-ranked with a stable descending sort.
    """
    v = v.detach()
    e = v.shape[-1]
    if k >= e:
        return torch.sort(v, dim=-1, descending=True, stable=True).indices[..., :k]
    vals, idx = v.topk(k + 1, dim=-1)
    tie = (vals[..., 1:] == vals[..., :-1]).any(-1)
    idx = idx[..., :k]
    if bool(tie.any()):
        idx = idx.clone()
        rows = tie.nonzero(as_tuple=True)
        idx[rows] = torch.sort(v[rows], dim=-1, descending=True, stable=True).indices[..., :k]
    return idx


def topk_lowest(v: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, indices) like ``v.topk(k, dim=-1)`` with ties to the lowest index; values keep v's grad."""
    idx = topk_lowest_index(v, k)
    return v.gather(-1, idx), idx


class Router(nn.Module):
    """Base class: a linear gate W_g (E, d) in fp32 and the shared top-k machinery.

    Subclasses override :meth:`select` (which experts, which weights) and :meth:`compute_losses`.
    """

    def __init__(self, d_model: int, n_experts: int, cfg: RouterConfig | None = None):
        super().__init__()
        cfg = cfg or RouterConfig()
        if not 1 <= cfg.top_k <= n_experts:
            raise ValueError(
                f"router top_k={cfg.top_k} must be between 1 and n_experts={n_experts}; lower top_k or add experts"
            )
        self.cfg = cfg
        self.n_experts = n_experts
        self.d_model = d_model
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=d_model**-0.5 * 0.1)
        self.max_seq_len: int | None = None
        """Reference length L of the capacity (the model's max_seq_len; set by ``build_router``)."""

    @property
    def k_max(self) -> int:
        return self.cfg.top_k

    def router_logits(self, x: Tensor) -> Tensor:
        # Router math in fp32 whatever the autocast dtype: top-k ties and softmax are precision-sensitive.
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.float(), self.gate.weight.float())  # (N, E)

    def select(self, logits: Tensor, x: Tensor) -> tuple[Tensor, ...]:
        """Return (ids (N,K), valid (N,K), weights (N,K), probs (N,E)), optionally followed by an
        ``extras`` dict of per-token tensors that is copied into :attr:`RouterOutput.extras`."""
        probs = logits.softmax(-1)
        top_p, ids = topk_lowest(probs, self.cfg.top_k)
        weights = top_p / top_p.sum(-1, keepdim=True).clamp_min(1e-20) if self.cfg.normalize_weights else top_p
        return ids, torch.ones_like(ids, dtype=torch.bool), weights, probs

    def compute_losses(self, out: RouterOutput, x: Tensor) -> dict[str, Tensor]:
        return {}

    def fused_spec(self) -> dict | None:
        """Keyword arguments of ``pikv_kernels.fused_router`` that reproduce this router's selection,
        weights and losses, or None when the rule is not fusable (dynamic k)."""
        return None

    def capacity(self, seq_len: int) -> int:
        """Places per (sequence, expert): C = ceil(top_k * L * cf / E), L = ``max_seq_len`` if set, else
        ``seq_len`` (a router used on its own)."""
        if self.cfg.capacity_factor is None:
            raise ValueError("capacity() needs capacity_factor")
        length = self.max_seq_len if self.max_seq_len is not None else seq_len
        return capacity_slots(self.cfg.top_k, length, self.cfg.capacity_factor, self.n_experts)

    def new_capacity_state(self) -> dict:
        """Empty decoding state for causal capacity (kept in the inference cache's ``extra``)."""
        if self.max_seq_len is None:
            raise ValueError(
                "capacity in incremental decoding needs a fixed reference length: set router.max_seq_len "
                "(build_router(..., max_seq_len=model max_seq_len) does)"
            )
        return new_capacity_state(self.capacity(self.max_seq_len), self.cfg.drop_policy)

    def _capacity(self, ids: Tensor, valid: Tensor, weights: Tensor, probs: Tensor, n_seq: int,
                  positions: Tensor | None, state: dict | None) -> tuple[Tensor, Tensor, Tensor]:
        """The one capacity step of the eager and fused paths: (valid, weights, dropped)."""
        if self.cfg.capacity_factor is None or ids.shape[0] == 0:
            return valid, weights, weights.new_zeros((), dtype=torch.float32)
        cap = self.capacity(ids.shape[0] // n_seq)
        new_valid, weights = apply_capacity(ids, valid, weights, self.n_experts, cap, self.cfg.drop_policy,
                                            priority=probs.detach().gather(-1, ids), n_seq=n_seq,
                                            positions=positions, state=state)
        return new_valid, weights, (valid & ~new_valid).sum().float()

    def _forward_fused(self, x: Tensor, fn, spec: dict, n_seq: int = 1, positions: Tensor | None = None,
                       capacity_state: dict | None = None) -> RouterOutput:
        with torch.autocast(device_type=x.device.type, enabled=False):
            f = fn(x if x.dtype in (torch.float32, torch.bfloat16) else x.float(), self.gate.weight,
                   self.cfg.top_k, **spec)
        ids, weights = f.ids, f.weights
        if spec.get("score_fn", "softmax") == "sigmoid":
            s = torch.sigmoid(f.logits)
            probs = s / s.sum(-1, keepdim=True).clamp_min(1e-20)
        else:
            probs = f.logits.softmax(-1)
        valid = torch.ones_like(ids, dtype=torch.bool)
        valid, weights, dropped = self._capacity(ids, valid, weights, probs, n_seq, positions, capacity_state)
        out = RouterOutput(ids=ids, valid=valid, weights=weights, logits=f.logits, probs=probs, counts=f.counts,
                           lse=f.lse)
        out.stats = {
            "dropped": dropped,
            "mean_k": torch.tensor(float(self.cfg.top_k), device=x.device),
            "load_max_over_mean": f.counts.max() / f.counts.mean().clamp_min(1e-20),
        }
        out.losses = {name: v for name, v, w in (("aux", f.aux, spec.get("aux_weight", 0.0)),
                                                 ("z", f.z, spec.get("z_weight", 0.0))) if w}
        return out

    def forward(self, x: Tensor, *, n_seq: int = 1, positions: Tensor | None = None,
                capacity_state: dict | None = None) -> RouterOutput:
        """Route tokens x (N, d).

        Args:
            n_seq: the N tokens are ``n_seq`` sequences of N / n_seq tokens (sequence-major); capacity is
                counted per sequence.
            positions: (N,) or (n_seq, T) absolute positions, -1 for padding (holds no capacity).
            capacity_state: decoding state from :meth:`new_capacity_state` (updated in place) when x
                continues earlier calls; None: the N tokens are whole sequences (training).
        """
        spec = self.fused_spec()
        if spec is not None and x.shape[0] > 0:
            from pikv_kernels import resolve_router_kernel, router_fn

            impl = resolve_router_kernel(self.cfg.kernel, x.device.type)
            if impl != "eager":
                return self._forward_fused(x, router_fn(impl), spec, n_seq, positions, capacity_state)
        logits = self.router_logits(x)
        sel = self.select(logits, x)
        ids, valid, weights, probs = sel[:4]
        extras = dict(sel[4]) if len(sel) > 4 else {}
        counts = torch.zeros(self.n_experts, device=x.device, dtype=torch.float32)
        counts.index_add_(0, ids[valid], torch.ones_like(ids[valid], dtype=torch.float32))
        n_routed = valid.sum()
        valid, weights, dropped = self._capacity(ids, valid, weights, probs, n_seq, positions, capacity_state)
        weights = torch.where(valid, weights, torch.zeros_like(weights))
        out = RouterOutput(
            ids=ids, valid=valid, weights=weights, logits=logits, probs=probs, counts=counts,
            lse=torch.logsumexp(logits, -1), extras=extras,
        )
        out.stats = {
            "dropped": dropped,
            "mean_k": n_routed.float() / max(x.shape[0], 1),
            "load_max_over_mean": counts.max() / counts.mean().clamp_min(1e-20),
        }
        out.losses = self.compute_losses(out, x)
        return out

    @torch.no_grad()
    def on_after_optimizer_step(self, counts: Tensor) -> None:
        """Hook for routers with persistent statistics; ``counts`` are the step's global (E,) loads.

        The caller (the MoE layer / training loop) all-reduces ``counts`` across data-parallel ranks
        before calling this; routers never communicate themselves, so every rank applies the identical
        update and the buffers stay in sync.
        """


class BaseRouter(Router):
    """Softmax top-k router with weights renormalised over the chosen k (no balancing loss)."""

    def fused_spec(self) -> dict | None:
        return {"normalize": self.cfg.normalize_weights}


class TopKBalancedRouter(Router):
    """Top-k softmax router + Switch balance loss + z-loss, with optional capacity dropping."""

    def compute_losses(self, out: RouterOutput, x: Tensor) -> dict[str, Tensor]:
        # counts.sum() == N * top_k here (every slot is routed before capacity drops).
        return balance_losses(out, self.cfg.aux_loss_weight, self.cfg.z_loss_weight)

    def fused_spec(self) -> dict | None:
        return {"normalize": self.cfg.normalize_weights, "aux_weight": self.cfg.aux_loss_weight,
                "z_weight": self.cfg.z_loss_weight}
