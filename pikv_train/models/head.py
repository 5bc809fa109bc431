"""The LM head as a value: weight, bias and the logit transform a model family applies after it.

Losses never build a model's full (N, V) logits: they call the head on chunks of hidden states
(``pikv_train.distill.chunked``). So the head must carry everything a family's ``forward`` does after the
projection — a bias (Phi), a multiplier (Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``), a
soft cap (Gemma-2's ``final_logit_softcapping``) — or distillation would learn from wrong distributions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True, eq=False)
class LogitHead:
    """``logits = softcap(scale · (hidden @ weight.T + bias))`` with ``softcap(x) = cap · tanh(x / cap)``.

    Attributes:
        weight: (V, d) projection (rows past the real vocabulary may be padding).
        bias: (V,) or None.
        scale: multiplier applied after the projection and bias (1.0 = none).
        softcap: cap of the final tanh soft-capping, or None for none.
    """

    weight: Tensor
    bias: Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None

    def __post_init__(self) -> None:
        if self.weight.dim() != 2:
            raise ValueError(f"LogitHead weight must be (V, d), got shape {tuple(self.weight.shape)}")
        if self.bias is not None and tuple(self.bias.shape) != (self.weight.shape[0],):
            raise ValueError(
                f"LogitHead bias must be ({self.weight.shape[0]},) like the weight's rows, got {tuple(self.bias.shape)}"
            )
        if not math.isfinite(self.scale) or self.scale == 0:
            raise ValueError(f"LogitHead scale must be finite and non-zero, got {self.scale}")
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"LogitHead softcap must be > 0 or None, got {self.softcap}")

    @property
    def vocab_size(self) -> int:
        """Rows of the head (V, padding rows included)."""
        return self.weight.shape[0]

    def __call__(self, hidden: Tensor, vocab: int | None = None) -> Tensor:
        """(..., d) -> (..., vocab or V) logits in the dtype of ``hidden`` (the same ops, in the same order,
        as the families' ``forward``); ``vocab`` keeps only the first rows (the real shared vocabulary)."""
        w = self.weight if vocab is None else self.weight[:vocab]
        b = self.bias if (self.bias is None or vocab is None) else self.bias[:vocab]
        x = F.linear(hidden, w, b)  # (..., V)
        if self.scale != 1.0:
            x = x * self.scale
        if self.softcap is not None:
            x = torch.tanh(x / self.softcap) * self.softcap
        return x

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> LogitHead:
        """A copy whose weight and bias are cast / moved (the scalars are unchanged)."""
        cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        return replace(self, weight=cast(self.weight), bias=cast(self.bias))

    def detach(self) -> LogitHead:
        """A copy whose tensors are detached from autograd (the teacher's head in a loss)."""
        return replace(self, weight=self.weight.detach(), bias=None if self.bias is None else self.bias.detach())
