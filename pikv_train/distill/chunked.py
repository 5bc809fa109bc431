"""Chunked fused LM-head + distillation / cross-entropy loss (SPEC §5 "Chunked loss").

The student's LM head, the divergence against the teacher and (optionally) cross-entropy on labels
are evaluated over chunks of tokens. Each chunk's gradient w.r.t. its logits is taken *during the
forward* (autograd on the chunk only, as Liger-Kernel's fused linear losses do) and immediately
folded into ``grad_hidden`` (N, d) and ``grad_weight`` (V, d); the chunk's logits are then freed.
The backward only scales those stored gradients by ``grad_output``. Hence no (N × V) logits
tensor for all N tokens exists at once, in the forward or the backward: the peak extra memory is
a handful of (chunk_size × V) fp32 buffers plus the (V, d) fp32 weight-gradient accumulator.

Masked tokens are dropped *before* the LM head (index_select on the rows), so prompt tokens cost
neither FLOPs nor memory. With ``reduction="sum"`` the caller divides by a global token count,
which keeps gradient accumulation and DDP splits exact. A float ``mask`` acts as per-token
weights, e.g. ``sequence_mean_weights(mask).flatten()`` with ``reduction="sum"`` gives the
sequence-mean (DistiLLM-2, SKD) on flattened tokens.

Not differentiable twice (``once_differentiable``); the teacher never receives gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from pikv_train.models.head import LogitHead

from .divergences import resolve_divergence, token_divergence

__all__ = ["chunked_distill_loss", "chunked_cross_entropy", "DEFAULT_CHUNK_SIZE"]

# Tokens per chunk. At V = 32k fp32 one (chunk × V) buffer is 64 MiB; the divergence's autograd
# keeps ~6-8 of them alive, so this bounds the loss's working set at roughly 0.5 GiB whatever N.
DEFAULT_CHUNK_SIZE = 512


@dataclass
class _Plan:
    """Everything the fused loop needs besides the two differentiable inputs (rows pre-selected)."""

    vocab_size: int
    chunk_size: int
    need_grad: bool
    # KD (divergence=None disables it)
    divergence: Optional[str]
    div_kwargs: dict
    temperature: float
    t2_scale: bool
    kd_weight: float
    kd_scale: Tensor  # () 1/denominator for "mean", 1 for "sum"
    teacher_hidden: Optional[Tensor]  # (n, d_t)
    teacher_head: Optional[LogitHead]  # weight (>= vocab_size, d_t) + the family's logit transform
    teacher_logits: Optional[Tensor]  # (n, >= vocab_size)
    # CE (targets=None disables it)
    targets: Optional[Tensor]  # (n,) long
    ignore_index: int
    ce_weight: float
    ce_scale: Tensor  # ()
    # per-token weights from a float mask, None = all ones
    weights: Optional[Tensor]  # (n,) fp32

    def teacher_chunk(self, start: int, end: int) -> Tensor:
        """Teacher logits for rows [start, end), (C, vocab_size) fp32, never tracked by autograd."""
        with torch.no_grad():
            if self.teacher_logits is not None:
                return _upcast(self.teacher_logits[start:end, : self.vocab_size])
            th = self.teacher_hidden[start:end]  # (C, d_t)
            return _upcast(self.teacher_head(th, self.vocab_size))  # (C, V)


def _upcast(t: Tensor) -> Tensor:
    """half/bf16 -> fp32; fp32/fp64 unchanged (fp64 keeps the tests exact)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _weighted_sum(values: Tensor, weights: Optional[Tensor]) -> Tensor:
    """Σ w·v over a chunk; values (C,), weights (C,) or None."""
    return values.sum() if weights is None else (values * weights).sum()


class _FusedChunkedLoss(torch.autograd.Function):
    """loss = kd_weight·KD + ce_weight·CE over row chunks; grads computed in the forward."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, plan: _Plan):
        n, d = hidden.shape
        vs, cs = plan.vocab_size, plan.chunk_size
        w_head = weight[:vs]  # (V, d) view; rows past vocab_size (padding) get zero gradient
        need_h = plan.need_grad and hidden.requires_grad
        need_w = plan.need_grad and weight.requires_grad
        grad_h = torch.empty_like(hidden) if need_h else None  # (n, d), every row written below
        # fp32 accumulator whatever the weight dtype, so summing many chunks loses nothing.
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)
        grad_w = weight.new_zeros(weight.shape, dtype=acc_dtype) if need_w else None  # (V_s, d)
        do_kd, do_ce = plan.divergence is not None, plan.targets is not None

        dev = hidden.device
        kd_sum = torch.zeros((), dtype=acc_dtype, device=dev)
        ce_sum = torch.zeros((), dtype=acc_dtype, device=dev)
        agree = torch.zeros((), dtype=torch.long, device=dev)

        for start in range(0, n, cs):
            end = min(start + cs, n)
            h_c = hidden[start:end]  # (C, d)
            w_c = None if plan.weights is None else plan.weights[start:end]  # (C,)
            logits = _upcast(h_c @ w_head.t())  # (C, V) fp32: the only student logits alive
            if need_h or need_w:
                logits.requires_grad_(True)
            with torch.enable_grad():
                objective = logits.new_zeros(())
                if do_kd:
                    t_logits = plan.teacher_chunk(start, end)  # (C, V)
                    kd_tok = token_divergence(
                        plan.divergence, logits, t_logits,
                        temperature=plan.temperature, t2_scale=plan.t2_scale, **plan.div_kwargs,
                    )  # (C,)
                    kd_c = _weighted_sum(kd_tok, w_c)
                    objective = objective + (plan.kd_weight * plan.kd_scale) * kd_c
                    kd_sum += kd_c.detach()
                    agree += (logits.detach().argmax(-1) == t_logits.argmax(-1)).sum()
                if do_ce:
                    ce_tok = F.cross_entropy(
                        logits, plan.targets[start:end], ignore_index=plan.ignore_index,
                        reduction="none",
                    )  # (C,), 0 at ignore_index
                    ce_c = _weighted_sum(ce_tok, w_c)
                    objective = objective + (plan.ce_weight * plan.ce_scale) * ce_c
                    ce_sum += ce_c.detach()
            if need_h or need_w:
                (g,) = torch.autograd.grad(objective, logits)  # (C, V) d objective / d logits
                if need_h:
                    grad_h[start:end] = g.to(weight.dtype) @ w_head  # (C, d)
                if need_w:
                    grad_w[:vs].addmm_(g.t(), h_c.to(acc_dtype))  # (V, d) += (V, C) @ (C, d)
                del g
            # Free this chunk's (C, V) buffers before the next chunk allocates its own.
            del logits, objective
            if do_kd:
                del t_logits, kd_tok

        kd = kd_sum * plan.kd_scale
        ce = ce_sum * plan.ce_scale
        loss = plan.kd_weight * kd if do_kd else torch.zeros_like(kd)
        if do_ce:
            loss = loss + plan.ce_weight * ce
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(kd, ce, agree)
        return loss, kd, ce, agree

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor, *_unused):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        # The stored gradients are already d loss / d input; grad_loss is a scalar. Skipping the
        # multiply when it is 1 (the usual `loss.backward()`) avoids another (V, d) buffer at the
        # cost of one host sync.
        unit = bool(grad_loss == 1)

        def scale(g: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
            if g is None:
                return None
            return (g if unit else g * grad_loss).to(dtype)

        return scale(grad_h, h_dtype), scale(grad_w, w_dtype), None


def _check_2d(name: str, t: Optional[Tensor], n: Optional[int] = None) -> None:
    if t is None:
        return
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if n is not None and t.shape[0] != n:
        raise ValueError(f"{name} has {t.shape[0]} rows, expected {n}")


def _fused_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    *,
    divergence: Optional[str],
    teacher_hidden: Optional[Tensor],
    teacher_head: Optional[LogitHead],
    teacher_logits: Optional[Tensor],
    mask: Optional[Tensor],
    targets: Optional[Tensor],
    ignore_index: int,
    chunk_size: int,
    temperature: float,
    t2_scale: bool,
    reduction: str,
    vocab_size: Optional[int],
    kd_weight: float,
    ce_weight: float,
    div_kwargs: dict,
) -> Dict[str, Tensor]:
    """Validate, drop masked rows, run the fused autograd Function. Returns loss + parts."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"chunked losses support reduction 'mean' or 'sum', got {reduction!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n = student_hidden.shape[0]
    _check_2d("student_hidden", student_hidden)
    _check_2d("student_weight", student_weight)
    if student_weight.shape[1] != student_hidden.shape[1]:
        raise ValueError("student_weight (V, d) and student_hidden (N, d) disagree on d")

    v_student = student_weight.shape[0]
    if divergence is not None:
        divergence = resolve_divergence(divergence)
        if teacher_logits is not None:
            _check_2d("teacher_logits", teacher_logits, n)
            v_teacher = teacher_logits.shape[1]
        else:
            if teacher_hidden is None:
                raise ValueError("teacher_hidden is missing: the teacher head needs its (N, d_t) hidden states")
            _check_2d("teacher_hidden", teacher_hidden, n)
            if teacher_head.weight.shape[1] != teacher_hidden.shape[1]:
                raise ValueError("the teacher head (V, d_t) and teacher_hidden (N, d_t) disagree on d_t")
            v_teacher = teacher_head.weight.shape[0]
        if vocab_size is None and v_teacher != v_student:
            raise ValueError(
                f"teacher vocab {v_teacher} != student vocab {v_student}; pass vocab_size to "
                "compare the shared first vocab_size columns"
            )
        vs = vocab_size if vocab_size is not None else v_student
        if vs > min(v_student, v_teacher):
            raise ValueError(f"vocab_size {vs} exceeds a head's vocabulary")
    else:
        vs = vocab_size if vocab_size is not None else v_student
        if vs > v_student:
            raise ValueError(f"vocab_size {vs} exceeds the head's vocabulary {v_student}")

    # Drop masked rows up front: they cost neither LM-head FLOPs nor memory. index_select is
    # differentiable, so autograd scatters the row gradients back into (N, d) zeros.
    weights = None
    if mask is not None:
        if mask.shape != (n,):
            raise ValueError(f"mask must have shape ({n},), got {tuple(mask.shape)}")
        rows = (mask if mask.dtype == torch.bool else mask != 0).nonzero().squeeze(1)  # (n_sel,)
        if mask.dtype != torch.bool:
            weights = mask.index_select(0, rows).float()  # (n_sel,)

        def take(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else t.index_select(0, rows)

        student_hidden = take(student_hidden)
        targets = take(targets)
        with torch.no_grad():
            teacher_hidden = take(teacher_hidden) if divergence else None
            teacher_logits = take(teacher_logits) if divergence else None
    n_sel = student_hidden.shape[0]

    dev = student_hidden.device
    kd_den = weights.sum() if weights is not None else torch.tensor(float(n_sel), device=dev)
    one = torch.ones((), device=dev)
    kd_scale = ce_scale = one
    if reduction == "mean":
        kd_scale = 1.0 / torch.where(kd_den > 0, kd_den, one)
        if targets is not None:
            valid = (targets != ignore_index).float()  # (n_sel,)
            ce_den = (valid * weights).sum() if weights is not None else valid.sum()
            ce_scale = 1.0 / torch.where(ce_den > 0, ce_den, one)

    plan = _Plan(
        vocab_size=vs,
        chunk_size=chunk_size,
        need_grad=torch.is_grad_enabled()
        and (student_hidden.requires_grad or student_weight.requires_grad),
        divergence=divergence,
        div_kwargs=div_kwargs,
        temperature=temperature,
        t2_scale=t2_scale,
        kd_weight=kd_weight,
        kd_scale=kd_scale,
        teacher_hidden=None if teacher_hidden is None else teacher_hidden.detach(),
        teacher_head=None if teacher_head is None else teacher_head.detach(),
        teacher_logits=None if teacher_logits is None else teacher_logits.detach(),
        targets=targets,
        ignore_index=ignore_index,
        ce_weight=ce_weight,
        ce_scale=ce_scale,
        weights=weights,
    )
    loss, kd, ce, agree = _FusedChunkedLoss.apply(student_hidden, student_weight, plan)
    return {"loss": loss, "kd": kd, "ce": ce, "top1_agree": agree, "n_tokens": kd_den.detach()}


def chunked_distill_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Optional[Tensor] = None,
    teacher_weight: Optional[Tensor] = None,
    *,
    teacher_head: Optional[LogitHead] = None,
    teacher_logits: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    divergence: str = "fkl",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
    t2_scale: bool = False,
    reduction: str = "mean",
    vocab_size: Optional[int] = None,
    targets: Optional[Tensor] = None,
    ce_weight: float = 0.0,
    kd_weight: float = 1.0,
    ignore_index: int = -100,
    return_parts: bool = False,
    **div_kwargs,
) -> Union[Tensor, Tuple[Tensor, Dict[str, Tensor]]]:
    """Fused student LM head + divergence (+ optional CE) without materialising (N × V) logits.

    Args:
        student_hidden: (N, d_s) final student hidden states (flattened tokens).
        student_weight: (V_s, d_s) student LM-head weight (logits = hidden @ weight.T; fold a bias
            or logit scaling into hidden/weight beforehand).
        teacher_hidden: (N, d_t) teacher hidden states, or None with ``teacher_logits``.
        teacher_weight: (V_t, d_t) teacher LM-head weight (a plain projection). Teacher work runs under
            no_grad.
        teacher_head: the teacher's :class:`~pikv_train.models.head.LogitHead` (weight (V_t, d_t), bias and the
            family's logit transform: Cohere's scale, Gemma-2's soft cap), alternative to ``teacher_weight``;
            it is applied chunk by chunk, so the (N × V) teacher logits are never built either.
        teacher_logits: (N, V_t) precomputed teacher logits.
        Exactly one of ``teacher_weight``, ``teacher_head`` and ``teacher_logits`` is given.
        mask: (N,) bool, or float per-token weights; None = every token.
        divergence: "fkl" | "rkl" | "jsd" | "tvd" | "skl" | "srkl" (or an alias).
        chunk_size: tokens per chunk; peak loss memory scales with chunk_size × V.
        temperature: divides both logit sets in the divergence (not in CE).
        t2_scale: multiply the divergence by temperature².
        reduction: "mean" (weighted token-mean over the call's unmasked tokens) or "sum" (divide
            by a global token count yourself for accumulation / DDP).
        vocab_size: compare only the first ``vocab_size`` columns of both heads (padded vocabs).
        targets: (N,) long labels; when given CE is computed in the same pass.
        ce_weight: weight of CE in the returned loss. kd_weight: weight of the divergence.
        ignore_index: target value excluded from CE (and its token count).
        return_parts: also return detached parts.
        **div_kwargs: ``beta`` (jsd), ``alpha`` / ``detach_mixture`` (skl, srkl).

    Returns:
        ``loss`` = kd_weight·KD + ce_weight·CE, fp32 scalar differentiable w.r.t. student_hidden
        and student_weight; with ``return_parts`` a tuple ``(loss, parts)`` where parts holds
        detached ``kd``, ``ce`` (0 without targets), ``top1_agree`` (long count of unmasked tokens
        whose student and teacher argmax agree) and ``n_tokens`` (unmasked token weight).
    """
    given = [name for name, t in (("teacher_weight", teacher_weight), ("teacher_head", teacher_head),
                                  ("teacher_logits", teacher_logits)) if t is not None]
    if len(given) != 1 and (divergence is not None or given):
        raise ValueError(
            f"pass exactly one teacher source: teacher_weight, teacher_head or teacher_logits (got {given or 'none'})"
        )
    if teacher_weight is not None:
        if teacher_weight.dim() != 2:
            raise ValueError(f"teacher_weight must be 2-D, got shape {tuple(teacher_weight.shape)}")
        teacher_head = LogitHead(teacher_weight)
    out = _fused_loss(
        student_hidden, student_weight,
        divergence=divergence, teacher_hidden=teacher_hidden, teacher_head=teacher_head,
        teacher_logits=teacher_logits, mask=mask, targets=targets, ignore_index=ignore_index,
        chunk_size=chunk_size, temperature=temperature, t2_scale=t2_scale, reduction=reduction,
        vocab_size=vocab_size, kd_weight=kd_weight, ce_weight=ce_weight, div_kwargs=div_kwargs,
    )
    if return_parts:
        return out["loss"], {k: v for k, v in out.items() if k != "loss"}
    return out["loss"]


def chunked_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    mask: Optional[Tensor] = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    reduction: str = "mean",
    ignore_index: int = -100,
    vocab_size: Optional[int] = None,
) -> Tensor:
    """Fused LM head + cross-entropy (training CE, validation NLL) with chunked memory.

    Args:
        hidden: (N, d) hidden states. weight: (V, d) LM-head weight. targets: (N,) long labels.
        mask: (N,) bool or float weights; ``ignore_index`` targets are excluded as well.
        chunk_size: tokens per chunk. reduction: "mean" over counted tokens, or "sum".
        ignore_index: label excluded from the loss. vocab_size: use only the first columns.

    Returns:
        fp32 scalar, equal to ``F.cross_entropy(hidden @ weight.T, targets)`` on the kept tokens.
    """
    out = _fused_loss(
        hidden, weight,
        divergence=None, teacher_hidden=None, teacher_head=None, teacher_logits=None,
        mask=mask, targets=targets, ignore_index=ignore_index, chunk_size=chunk_size,
        temperature=1.0, t2_scale=False, reduction=reduction, vocab_size=vocab_size,
        kd_weight=0.0, ce_weight=1.0, div_kwargs={},
    )
    return out["loss"]
