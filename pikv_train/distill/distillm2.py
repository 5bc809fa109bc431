"""DistiLLM-2 (Ko et al., ICML 2025): contrastive pair loss on teacher and student responses.

Per prompt, a teacher response y_T and a student response y_S. Loss per pair:

    (2 - beta) * mean_tokens SKL_alpha1(y_T) + beta * mean_tokens SRKL_alpha2(y_S)

where SKL pulls the student up on the teacher's response (gradient through the student inside the
mixture) and SRKL, with the student inside its mixture *detached*, pushes the student's own unlikely
tokens down; means are over each sequence's response tokens, then over pairs (sequence-mean).
Optional curriculum: beta_t = 1 + 0.5 * min(1, 2 t / T).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DistiLLM2Config:
    """DistiLLM-2 pair loss and online response generation."""

    alpha1: float = 0.1
    """Skew of SKL on teacher responses."""
    alpha2: float = 0.1
    """Skew of SRKL on student responses (student inside the mixture detached)."""
    beta: float = 1.0
    """Weight balance: (2 - beta) * SKL + beta * SRKL."""
    beta_curriculum: bool = False
    """Use beta_t = 1 + 0.5 * min(1, 2 t / T) instead of a constant beta."""
    temperature: float = 1.0
    """Sampling temperature of online teacher and student responses."""
    top_p: float = 1.0
    """Nucleus sampling threshold of online responses."""
    max_new_tokens: int | None = None
    """Tokens generated per prompt (default: the data's response_len)."""


def beta_at(cfg: DistiLLM2Config, step: int, total: int) -> float:
    """The beta used at optimizer step ``step`` of ``total``."""
    if not cfg.beta_curriculum:
        return cfg.beta
    return 1.0 + 0.5 * min(1.0, 2.0 * step / max(total, 1))
