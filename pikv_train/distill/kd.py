"""Plain knowledge distillation: the configured divergence on the data's own tokens (objective ``kd``)."""

from __future__ import annotations

from .objective import Objective, StepInfo, StepResult


class KDObjective(Objective):
    """``loss.divergence`` between teacher and student on the batch's loss tokens (token-mean), plus the
    optional CE; no sampling. ``cfg`` is the task's :class:`~pikv_train.distill.term.DistillLossConfig`."""

    name = "kd"
    needs_prompts = False

    def loss(self, batch: dict, step: StepInfo, loss_fn) -> StepResult:
        total, count, parts, out = loss_fn(batch, self.cfg.divergence, **self.cfg.divergence_kwargs())
        return StepResult(total, count, parts, [out])
