"""Token-level divergences between teacher and student next-token distributions (SPEC §5).

Conventions (all functions):

* ``p`` is the teacher distribution, ``q`` the student's; both are ``softmax(logits / temperature)``
  computed in fp32 for half/bf16/fp32 inputs (float64 inputs stay float64).
* Values are true KL (``sum p log p/q``), not the cross-entropy form that omits the teacher entropy.
* A vocabulary column whose logit is ``±inf`` in either model (padded vocabulary) contributes
  nothing, and never produces NaN in values or gradients (DistiLLM's ``inf_mask`` convention).
* ``t2_scale=True`` multiplies every per-token value by ``temperature**2`` (Hinton KD); off by
  default.
* ``mask`` (same shape as the logits without the vocab dim) is bool or float; a float mask acts as
  per-token weights. Masked positions contribute nothing, even if their logits are garbage.

Reductions (``reduction=``):

* ``"mean"``: weighted token-mean over unmasked positions (0 when everything is masked).
* ``"sum"``: weighted sum over unmasked positions; divide by a global token count yourself to make
  gradient accumulation / DDP splits exact.
* ``"none"``: per-position values, masked positions set to 0.
* ``"sequence_mean"``: the last non-vocab dim is the sequence (``(B, T, V)`` logits); token-mean
  inside each sequence, then mean over the sequences that have at least one unmasked token.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "forward_kl",
    "reverse_kl",
    "jsd",
    "tvd",
    "skew_kl",
    "skew_reverse_kl",
    "token_divergence",
    "reduce_tokens",
    "sequence_mean_weights",
    "resolve_divergence",
    "DIVERGENCES",
    "REDUCTIONS",
]

REDUCTIONS = ("mean", "sum", "none", "sequence_mean")


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------
def _log_weight(w: float) -> float:
    """log(w) for a mixture weight in [0, 1]; log(0) = -inf so logaddexp drops that branch."""
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"mixture weight must lie in [0, 1], got {w}")
    return math.log(w) if w > 0.0 else float("-inf")


def _log_probs(student_logits: Tensor, teacher_logits: Tensor, temperature: float):
    """Tempered fp32 log-probabilities plus the padded-column mask.

    Args:
        student_logits: (..., V) student logits, any float dtype.
        teacher_logits: (..., V) teacher logits, same shape.
        temperature: divides both logit sets before the softmax.

    Returns:
        ``(logq, logp, pad)``: student and teacher log-probs (..., V) fp32 with ``±inf`` columns
        replaced by 0 (so no ``inf - inf`` or ``0 * inf`` can appear downstream), and ``pad``
        (..., V) bool, True where either logit is infinite. Callers must zero their per-column
        terms at ``pad``.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student/teacher logits shapes differ: {tuple(student_logits.shape)} vs "
            f"{tuple(teacher_logits.shape)} (slice padded vocabularies to a shared size first)"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    # Upcast half/bf16 to fp32; float64 stays float64 (golden tests, gradcheck).
    s = student_logits.to(torch.promote_types(student_logits.dtype, torch.float32))
    t = teacher_logits.to(torch.promote_types(teacher_logits.dtype, torch.float32))
    if temperature != 1.0:
        s = s / temperature
        t = t / temperature
    pad = torch.isinf(s).logical_or_(torch.isinf(t))  # (..., V) bool
    # log_softmax handles -inf inputs (they get -inf log-prob and zero gradient); the fill then
    # makes every later subtraction finite. The fill's backward zeroes the gradient at pad.
    logq = F.log_softmax(s, dim=-1).masked_fill(pad, 0.0)  # (..., V)
    logp = F.log_softmax(t, dim=-1)  # (..., V)
    if torch.is_grad_enabled() and t.requires_grad:
        logp = logp.masked_fill(pad, 0.0)
    else:  # usual case: frozen teacher, so fill in place and save a (..., V) buffer
        logp.masked_fill_(pad, 0.0)
    return logq, logp, pad


def _kl_terms(log_a: Tensor, log_b: Tensor, pad: Tensor) -> Tensor:
    """Per-token KL(a || b) = sum_v a (log a - log b), padded columns excluded.

    Args:
        log_a, log_b: (..., V) finite log-probabilities (pad columns already 0).
        pad: (..., V) bool columns to drop.

    Returns:
        (...) fp32 KL values.
    """
    # exp(0) = 1 at pad columns, so the fill after the product is what drops them.
    terms = log_a.exp() * (log_a - log_b)  # (..., V)
    return terms.masked_fill(pad, 0.0).sum(-1)


def _log_mix(log_a: Tensor, log_b: Tensor, w_a: float) -> Tensor:
    """log(w_a * a + (1 - w_a) * b) computed stably in log space. Shapes (..., V)."""
    return torch.logaddexp(log_a + _log_weight(w_a), log_b + _log_weight(1.0 - w_a))


# ----------------------------------------------------------------------------------------------
# Per-token kernels on prepared log-probs: (logq, logp, pad, **hyper) -> (...)
# ----------------------------------------------------------------------------------------------
def _fkl_tok(logq: Tensor, logp: Tensor, pad: Tensor) -> Tensor:
    return _kl_terms(logp, logq, pad)


def _rkl_tok(logq: Tensor, logp: Tensor, pad: Tensor) -> Tensor:
    return _kl_terms(logq, logp, pad)


def _tvd_tok(logq: Tensor, logp: Tensor, pad: Tensor) -> Tensor:
    diff = (logp.exp() - logq.exp()).abs()  # (..., V)
    return 0.5 * diff.masked_fill(pad, 0.0).sum(-1)


def _jsd_tok(logq: Tensor, logp: Tensor, pad: Tensor, beta: float = 0.5) -> Tensor:
    # Endpoints are special-cased (TRL convention) so they are *exactly* FKL / RKL.
    if beta == 0.0:
        return _fkl_tok(logq, logp, pad)
    if beta == 1.0:
        return _rkl_tok(logq, logp, pad)
    log_m = _log_mix(logp, logq, beta)  # (..., V) log(beta p + (1 - beta) q)
    return beta * _kl_terms(logp, log_m, pad) + (1.0 - beta) * _kl_terms(logq, log_m, pad)


def _skl_tok(
    logq: Tensor, logp: Tensor, pad: Tensor, alpha: float = 0.1, detach_mixture: bool = False
) -> Tensor:
    # SKL_a = KL(p || a p + (1 - a) q). The student only enters through the mixture, so with
    # detach_mixture=True this has no student gradient at all (kept for API symmetry). The
    # `0 * logq` link keeps the result attached to the graph so `.backward()` still works.
    if detach_mixture:
        warnings.warn(
            "skew_kl with detach_mixture=True has zero gradient w.r.t. the student; DistiLLM and "
            "DistiLLM-2 back-propagate through SKL's mixture (detach_mixture=False)",
            stacklevel=3,
        )
        q_in_mix = logq.detach() + 0.0 * logq
    else:
        q_in_mix = logq
    log_m = _log_mix(logp, q_in_mix, alpha)  # (..., V)
    return _kl_terms(logp, log_m, pad)


def _srkl_tok(
    logq: Tensor, logp: Tensor, pad: Tensor, alpha: float = 0.1, detach_mixture: bool = False
) -> Tensor:
    # SRKL_a = KL(q || (1 - a) p + a q); DistiLLM back-props through the q inside the mixture,
    # DistiLLM-2 treats it as stop-gradient (detach_mixture=True).
    q_in_mix = logq.detach() if detach_mixture else logq
    log_m = _log_mix(logp, q_in_mix, 1.0 - alpha)  # (..., V)
    return _kl_terms(logq, log_m, pad)


_TOKEN_KERNELS: Dict[str, Callable[..., Tensor]] = {
    "fkl": _fkl_tok,
    "rkl": _rkl_tok,
    "jsd": _jsd_tok,
    "tvd": _tvd_tok,
    "skl": _skl_tok,
    "srkl": _srkl_tok,
}

_ALIASES = {
    "kl": "fkl",
    "forward_kl": "fkl",
    "reverse_kl": "rkl",
    "skew_kl": "skl",
    "skew_reverse_kl": "srkl",
    "sfkl": "skl",
}


def resolve_divergence(name: str) -> str:
    """Canonical short name ("fkl", "rkl", "jsd", "tvd", "skl", "srkl") for a config string.

    Args:
        name: canonical name or alias (``forward_kl``, ``skew_reverse_kl``, ...), case-insensitive.

    Returns:
        The canonical name. Raises ``KeyError`` listing valid names otherwise.
    """
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in _TOKEN_KERNELS:
        valid = sorted(set(_TOKEN_KERNELS) | set(_ALIASES))
        raise KeyError(f"unknown divergence {name!r}; expected one of {valid}")
    return key


def token_divergence(
    name: str,
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    t2_scale: bool = False,
    **hyper,
) -> Tensor:
    """Per-position divergence selected by a config string, without masking or reduction.

    Args:
        name: "fkl", "rkl", "jsd", "tvd", "skl", "srkl" (or an alias, see ``resolve_divergence``).
        student_logits: (..., V) student logits.
        teacher_logits: (..., V) teacher logits.
        temperature: divides both logit sets.
        t2_scale: multiply by ``temperature**2``.
        **hyper: ``beta`` for jsd; ``alpha`` and ``detach_mixture`` for skl / srkl.

    Returns:
        (...) fp32 per-position divergence values.
    """
    kernel = _TOKEN_KERNELS[resolve_divergence(name)]
    logq, logp, pad = _log_probs(student_logits, teacher_logits, temperature)
    values = kernel(logq, logp, pad, **hyper)  # (...)
    if t2_scale and temperature != 1.0:
        values = values * (temperature**2)
    return values


# ----------------------------------------------------------------------------------------------
# Reductions
# ----------------------------------------------------------------------------------------------
def _masked(values: Tensor, mask: Optional[Tensor]):
    """Apply a bool/float mask: returns (masked values, weights) both shaped like ``values``."""
    if mask is None:
        return values, torch.ones_like(values)
    if mask.shape != values.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != token shape {tuple(values.shape)}")
    keep = mask if mask.dtype == torch.bool else mask != 0
    weights = mask.to(values.dtype)
    # where (not a multiply) so NaN/inf at masked positions cannot leak into the result.
    out = torch.where(keep, values * weights if mask.dtype != torch.bool else values, 0.0)
    return out, torch.where(keep, weights, 0.0)


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den with den == 0 mapped to a result of 0 (no NaN, no device sync)."""
    return num / torch.where(den > 0, den, torch.ones_like(den))


def reduce_tokens(values: Tensor, mask: Optional[Tensor] = None, reduction: str = "mean") -> Tensor:
    """Reduce per-position values over unmasked positions.

    Args:
        values: (...) per-position values, e.g. (B, T) or (N,).
        mask: (...) bool or float (weights), or None for all positions.
        reduction: "mean" | "sum" | "none" | "sequence_mean" (see module docstring).

    Returns:
        Scalar tensor, or (...) values (masked = 0) for ``"none"``.
    """
    out, weights = _masked(values, mask)
    if reduction == "none":
        return out
    if reduction == "sum":
        return out.sum()
    if reduction == "mean":
        return _safe_div(out.sum(), weights.sum())
    if reduction == "sequence_mean":
        # Sequences run along the last dim; a 1-D input is a single sequence.
        n_last = out.shape[-1] if out.dim() else 1
        seq_sum = out.reshape(-1, n_last).sum(-1)  # (S,)
        seq_cnt = weights.reshape(-1, n_last).sum(-1)  # (S,)
        seq_mean = _safe_div(seq_sum, seq_cnt)  # (S,)
        has_tokens = (seq_cnt > 0).to(seq_mean.dtype)  # (S,)
        return _safe_div(seq_mean.sum(), has_tokens.sum())
    raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")


def sequence_mean_weights(mask: Tensor) -> Tensor:
    """Per-token weights that turn a weighted *sum* into the sequence-mean.

    Useful with ``chunked_distill_loss(..., mask=weights.flatten(), reduction="sum")`` where the
    tokens are flattened and the sequence structure is otherwise lost.

    Args:
        mask: (B, T) bool/float response mask.

    Returns:
        (B, T) fp32 weights ``m_bt / (count_b * number of non-empty sequences)``.
    """
    m = mask.float()  # (B, T)
    count = m.sum(-1, keepdim=True)  # (B, 1)
    n_seq = (count > 0).float().sum()
    return _safe_div(m, count * n_seq)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------
def _divergence(
    name: str,
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Optional[Tensor],
    temperature: float,
    t2_scale: bool,
    reduction: str,
    **hyper,
) -> Tensor:
    values = token_divergence(
        name, student_logits, teacher_logits, temperature=temperature, t2_scale=t2_scale, **hyper
    )
    return reduce_tokens(values, mask, reduction)


def forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Optional[Tensor] = None,
    *,
    temperature: float = 1.0,
    t2_scale: bool = False,
    reduction: str = "mean",
) -> Tensor:
    """Forward KL(p || q), mode-covering.

    Args:
        student_logits: (..., V). teacher_logits: (..., V). mask: (...) bool/float or None.
        temperature, t2_scale, reduction: see module docstring.

    Returns:
        Reduced fp32 tensor (scalar, or (...) for ``reduction="none"``).
    """
    return _divergence(
        "fkl", student_logits, teacher_logits, mask, temperature, t2_scale, reduction
    )


def reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Optional[Tensor] = None,
    *,
    temperature: float = 1.0,
    t2_scale: bool = False,
    reduction: str = "mean",
) -> Tensor:
    """Reverse KL(q || p), mode-seeking. Args/Returns as ``forward_kl``."""
    return _divergence(
        "rkl", student_logits, teacher_logits, mask, temperature, t2_scale, reduction
    )


def tvd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Optional[Tensor] = None,
    *,
    temperature: float = 1.0,
    t2_scale: bool = False,
    reduction: str = "mean",
) -> Tensor:
    """Total variation distance ½ Σ|p − q|. Args/Returns as ``forward_kl``."""
    return _divergence(
        "tvd", student_logits, teacher_logits, mask, temperature, t2_scale, reduction
    )


def jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Optional[Tensor] = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    t2_scale: bool = False,
    reduction: str = "mean",
) -> Tensor:
    """Generalised JSD_β (TRL convention): M = βp + (1−β)q, β·KL(p‖M) + (1−β)·KL(q‖M).

    Args:
        beta: in [0, 1]; 0 returns exactly forward KL, 1 exactly reverse KL.
        Others as ``forward_kl``.

    Returns:
        Reduced fp32 tensor.
    """
    return _divergence(
        "jsd", student_logits, teacher_logits, mask, temperature, t2_scale, reduction, beta=beta
    )


def skew_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Optional[Tensor] = None,
    *,
    alpha: float = 0.1,
    detach_mixture: bool = False,
    temperature: float = 1.0,
    t2_scale: bool = False,
    reduction: str = "mean",
) -> Tensor:
    """Skew KL (DistiLLM): KL(p ‖ αp + (1−α)q).

    Args:
        alpha: skew in [0, 1]; 0 is forward KL.
        detach_mixture: stop-gradient on the student inside the mixture. SKL's only student
            dependence is the mixture, so True yields zero student gradient; default False.
        Others as ``forward_kl``.

    Returns:
        Reduced fp32 tensor.
    """
    return _divergence(
        "skl", student_logits, teacher_logits, mask, temperature, t2_scale, reduction,
        alpha=alpha, detach_mixture=detach_mixture,
    )


def skew_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Optional[Tensor] = None,
    *,
    alpha: float = 0.1,
    detach_mixture: bool = False,
    temperature: float = 1.0,
    t2_scale: bool = False,
    reduction: str = "mean",
) -> Tensor:
    """Skew reverse KL: KL(q ‖ (1−α)p + αq).

    Args:
        alpha: skew in [0, 1]; 0 is reverse KL.
        detach_mixture: False = gradient through the student inside the mixture (DistiLLM);
            True = stop-gradient there (DistiLLM-2's contrastive SRKL).
        Others as ``forward_kl``.

    Returns:
        Reduced fp32 tensor.
    """
    return _divergence(
        "srkl", student_logits, teacher_logits, mask, temperature, t2_scale, reduction,
        alpha=alpha, detach_mixture=detach_mixture,
    )


# Reduced public functions by canonical name, for selecting an objective from a config string.
DIVERGENCES: Dict[str, Callable[..., Tensor]] = {
    "fkl": forward_kl,
    "rkl": reverse_kl,
    "jsd": jsd,
    "tvd": tvd,
    "skl": skew_kl,
    "srkl": skew_reverse_kl,
}
