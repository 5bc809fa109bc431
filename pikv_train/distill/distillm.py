"""DistiLLM (Ko et al., ICML 2024): skew divergences + adaptive off-policy student-generated outputs.

Each training batch draws r ~ U(0, 1). With progress s = step / total steps and threshold phi:

- fresh student generations for the batch's prompts if ``r < phi * (1 - s)``, or if ``r < phi`` while the
  replay buffer is not yet full (the fresh pairs are pushed into the buffer);
- a replay batch drawn from the buffer if ``r < phi``;
- the dataset batch otherwise.

So P(student-generated) = phi at all times, and within it the fresh:replayed split moves from 1:0 to 0:1
over training. phi starts at ``init_phi`` (0) and rises by ``phi_step`` (0.1, capped at 1) whenever the
validation loss rises by more than ``loss_eps`` (0.1) over the previous validation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class DistiLLMConfig:
    """DistiLLM objective and adaptive off-policy sampler."""

    divergence: Literal["skl", "srkl"] = "srkl"
    """Skew KL (SKL) or skew reverse KL (SRKL); gradient flows through the student inside the mixture."""
    alpha: float = 0.1
    """Skew alpha."""
    init_phi: float = 0.0
    """Initial probability of training on student-generated outputs."""
    phi_step: float = 0.1
    """Increase of phi whenever validation loss rises by more than loss_eps."""
    loss_eps: float = 0.1
    """Validation-loss rise that triggers a phi increase."""
    capacity: int = 1000
    """Replay buffer capacity (sequences)."""
    temperature: float = 1.0
    """Sampling temperature of the student generations."""
    max_new_tokens: int | None = None
    """Tokens generated per prompt (default: the data's response_len)."""


class AdaptiveOffPolicySchedule:
    """The phi schedule and the per-batch source decision."""

    def __init__(self, cfg: DistiLLMConfig):
        self.cfg = cfg
        self.phi = cfg.init_phi
        self.prev_val_loss: float | None = None

    def choose(self, r: float, progress: float, buffer_full: bool) -> str:
        """'fresh', 'replay' or 'dataset' for a uniform draw r and training progress in [0, 1]."""
        if r < self.phi * (1.0 - progress) or (r < self.phi and not buffer_full):
            return "fresh"
        if r < self.phi:
            return "replay"
        return "dataset"

    def on_validation(self, val_loss: float) -> bool:
        """Update phi from a new validation loss; returns True when phi rose."""
        rose = self.prev_val_loss is not None and val_loss > self.prev_val_loss + self.cfg.loss_eps
        if rose:
            self.phi = min(1.0, self.phi + self.cfg.phi_step)
        self.prev_val_loss = val_loss
        return rose

    def state_dict(self) -> dict:
        return {"phi": self.phi, "prev_val_loss": self.prev_val_loss}

    def load_state_dict(self, state: dict) -> None:
        self.phi, self.prev_val_loss = float(state["phi"]), state["prev_val_loss"]
