"""One distillation loss term: student forward + teacher forward + fused chunked divergence (+ CE).

:class:`DistillLoss` owns the two models, the loss settings and the shared vocabulary; objectives call it
on the batches they build. Teacher logits come from the teacher's own head (``teacher.head``: LM-head
weight, bias, logit scale, softcapping) chunk by chunk inside the fused loss, so they equal the teacher's
``model(input_ids).logits`` and the (N × V) teacher logits never exist at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from pikv_train.errors import bad_value, check_range

from .chunked import chunked_distill_loss
from .divergences import sequence_mean_weights


def check_skew(key: str, alpha: float, divergence: str | None) -> None:
    """Skew alpha of SKL / SRKL: in [0, 1); 1 mixes in only the teacher (SKL) or only the student (SRKL),
    so the divergence is identically 0 and nothing is distilled. ``divergence`` None: the range only."""
    if divergence is not None and alpha == 1:
        raise bad_value(key, alpha, f"must be < 1: with alpha 1 the {divergence} mixture equals one of the two "
                        "distributions, so the divergence is 0 and gives no distillation signal",
                        f"lower {key} (the published value is 0.1)")
    check_range(key, alpha, lo=0, hi=1, hi_open=divergence is not None,
                fix=f"set {key} in [0, 1) (the published value is 0.1)")


@dataclass
class DistillLossConfig:
    """Distillation loss: kd_weight * divergence(teacher || student) + ce_weight * CE + router losses."""

    divergence: Literal["fkl", "rkl", "jsd", "tvd", "skl", "srkl"] = "fkl"
    """Token-level divergence between the teacher's and the student's next-token distributions
    (objective ``kd``; the other objectives use their published divergences)."""
    kd_weight: float = 1.0
    """Weight of the divergence."""
    ce_weight: float = 0.0
    """Weight of cross-entropy on the data's next tokens."""
    temperature: float = 1.0
    """Divides both logit sets inside the divergence (not the CE)."""
    t2_scale: bool = False
    """Multiply the divergence by temperature squared (Hinton); off by default."""
    beta: float = 0.5
    """JSD mixture weight beta (0 = forward KL, 1 = reverse KL)."""
    alpha: float = 0.1
    """Skew alpha of SKL / SRKL."""
    router_loss_weight: float = 1.0
    """Multiplier on the student's (already weighted) router losses; cache penalties (DuoAttention's gate L1,
    ``cache.duo_l1_weight``) keep their own weight."""
    chunk_size: int = 512
    """Tokens per chunk of the fused LM head + loss."""

    def __post_init__(self) -> None:
        k = "model.init_args.loss."
        check_range(k + "temperature", self.temperature, lo=0, lo_open=True,
                    fix=f"set {k}temperature > 0 (1.0 = the raw logits)")
        check_range(k + "beta", self.beta, lo=0, hi=1, fix=f"set {k}beta in [0, 1] (0 = forward KL, 1 = reverse KL)")
        check_skew(k + "alpha", self.alpha, self.divergence if self.divergence in ("skl", "srkl") else None)
        check_range(k + "kd_weight", self.kd_weight, lo=0, fix=f"set {k}kd_weight >= 0")
        check_range(k + "ce_weight", self.ce_weight, lo=0, fix=f"set {k}ce_weight >= 0")
        check_range(k + "router_loss_weight", self.router_loss_weight, lo=0, fix=f"set {k}router_loss_weight >= 0")
        check_range(k + "chunk_size", self.chunk_size, lo=1, fix=f"set {k}chunk_size >= 1 (e.g. 512)")
        if self.kd_weight == 0 and self.ce_weight == 0:
            raise bad_value(k + "kd_weight", 0, f"{k}kd_weight and {k}ce_weight are both 0, so only the router "
                            "losses would train", f"set {k}kd_weight > 0 (distillation) or {k}ce_weight > 0 (cross-entropy)")

    def divergence_kwargs(self) -> dict:
        """Hyper-parameters of the configured divergence (beta for JSD, alpha for SKL/SRKL)."""
        if self.divergence == "jsd":
            return {"beta": self.beta}
        return {"alpha": self.alpha} if self.divergence in ("skl", "srkl") else {}


class DistillLoss:
    """Computes loss terms on batches ``{input_ids, targets, loss_mask}`` (B, T).

    Args:
        student: the trained decoder.
        teacher: the frozen teacher (any model of the causal-LM interface, see ``distill/objective.py``).
        cfg: loss settings.
        vocab_size: compare only the first ``vocab_size`` columns (the real shared vocabulary); None when
            both heads have the same size.
    """

    def __init__(self, student, teacher, cfg: DistillLossConfig, vocab_size: int | None = None):
        self.student, self.teacher, self.cfg, self.vocab_size = student, teacher, cfg, vocab_size

    @torch.no_grad()
    def teacher_hidden(self, input_ids: Tensor) -> Tensor:
        """(B, T, d_t) final hidden states of the frozen teacher."""
        return self.teacher(input_ids).hidden

    def __call__(self, batch: dict, divergence: str, *, sequence_mean: bool = False, ce_weight: float | None = None,
                 **div_kw) -> tuple[Tensor, Tensor, dict, object]:
        """Student forward + fused chunked divergence (+ CE) on ``batch``'s loss tokens.

        Returns (summed loss, count of loss units, detached per-unit parts, student output). With
        ``sequence_mean`` each sequence's tokens are averaged first and the unit is the sequence
        (DistiLLM-2, SKD); otherwise the unit is the token.
        """
        cfg = self.cfg
        t_hidden = self.teacher_hidden(batch["input_ids"])
        out = self.student(batch["input_ids"])
        mask = batch["loss_mask"]
        n_seq = (mask.sum(1) > 0).sum()
        # sequence_mean_weights averages over sequences too; times n_seq gives per-sequence means to sum.
        weights = (sequence_mean_weights(mask) * n_seq).flatten() if sequence_mean else mask.flatten().bool()
        total, parts = chunked_distill_loss(
            out.hidden.flatten(0, 1), self.student.head_weight, t_hidden.flatten(0, 1), teacher_head=self.teacher.head,
            mask=weights, divergence=divergence, chunk_size=cfg.chunk_size, temperature=cfg.temperature,
            t2_scale=cfg.t2_scale, targets=batch["targets"].flatten(),
            ce_weight=cfg.ce_weight if ce_weight is None else ce_weight, kd_weight=cfg.kd_weight,
            reduction="sum", return_parts=True, vocab_size=self.vocab_size, **div_kw,
        )
        count = n_seq if sequence_mean else mask.sum()
        n = mask.sum().clamp_min(1)
        parts = dict(parts, kd=parts["kd"] / count.clamp_min(1), ce=parts["ce"] / count.clamp_min(1),
                     agreement=parts["top1_agree"].float() / n)
        return total, count, parts, out

    def validation(self, batch: dict) -> dict:
        """Forward KL + student CE sums on the loss tokens, whatever the training divergence (comparable
        across recipes): parts ``kd``, ``ce`` (sums), ``top1_agree`` and ``n`` (tokens)."""
        t_hidden = self.teacher_hidden(batch["input_ids"])
        out = self.student(batch["input_ids"])
        mask = batch["loss_mask"].flatten().bool()
        _, parts = chunked_distill_loss(
            out.hidden.flatten(0, 1), self.student.head_weight, t_hidden.flatten(0, 1), teacher_head=self.teacher.head,
            mask=mask, divergence="fkl", chunk_size=self.cfg.chunk_size, targets=batch["targets"].flatten(),
            ce_weight=1.0, kd_weight=1.0, return_parts=True, reduction="sum", vocab_size=self.vocab_size,
        )
        return dict(parts, n=mask.sum())
