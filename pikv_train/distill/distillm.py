"""DistiLLM (Ko et al., ICML 2024): skew divergences + adaptive off-policy student-generated outputs.

Each training batch draws r ~ U(0, 1). With progress s = step / total steps and threshold phi:

- fresh student generations for the batch's prompts if ``r < phi * (1 - s)``, or if ``r < phi`` while the
  replay buffer is not yet full (the fresh pairs are pushed into the buffer);
- a replay batch drawn from the buffer (without replacement) if ``r < phi``;
- the dataset batch otherwise.

So P(student-generated) = phi at all times, and within it the fresh:replayed split moves from 1:0 to 0:1
over training. phi starts at ``init_phi`` (0) and rises by ``phi_step`` (0.1, capped at 1) as in the
DistiLLM repository (``distillm/finetune.py``): the reference loss is the validation loss measured
*before training*; a later validation loss ``>= reference + loss_eps`` raises phi, and only then becomes
the new reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pikv_train.data.prompts import build_sequences
from pikv_train.models.generation import generate

from .objective import BeforeTraining, Objective, StepInfo, StepResult, responses_of, to_device
from .replay import ReplayBuffer


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
    """Increase of phi whenever the validation loss reaches the reference + loss_eps."""
    loss_eps: float = 0.1
    """Validation-loss rise over the reference that triggers a phi increase."""
    capacity: int = 1000
    """Replay buffer capacity (sequences); at least the batch size."""
    temperature: float = 1.0
    """Sampling temperature of the student generations (DistiLLM: 1.0)."""
    top_p: float = 1.0
    """Nucleus sampling threshold of the student generations (DistiLLM: 1.0, no truncation)."""
    max_new_tokens: int | None = None
    """Tokens generated per prompt (default: the data's response_len)."""

    def __post_init__(self) -> None:
        from pikv_train.distill.term import check_skew
        from pikv_train.errors import check_range

        k = "model.init_args.distillm."
        check_skew(k + "alpha", self.alpha, self.divergence)
        check_range(k + "init_phi", self.init_phi, lo=0, hi=1, fix=f"set {k}init_phi in [0, 1] (a probability)")
        check_range(k + "phi_step", self.phi_step, lo=0, hi=1, fix=f"set {k}phi_step in [0, 1] (0 = phi never rises)")
        check_range(k + "loss_eps", self.loss_eps, lo=0, fix=f"set {k}loss_eps >= 0")
        check_range(k + "capacity", self.capacity, lo=1, fix=f"set {k}capacity >= data.batch_size")
        check_range(k + "temperature", self.temperature, lo=0, fix=f"set {k}temperature >= 0 (0 = greedy; DistiLLM: 1.0)")
        check_range(k + "top_p", self.top_p, lo=0, hi=1, lo_open=True, fix=f"set {k}top_p in (0, 1] (1.0 = no truncation)")
        if self.max_new_tokens is not None:
            check_range(k + "max_new_tokens", self.max_new_tokens, lo=1, fix=f"set {k}max_new_tokens >= 1 or null")


class AdaptiveOffPolicySchedule:
    """The phi schedule and the per-batch source decision."""

    def __init__(self, cfg: DistiLLMConfig):
        self.cfg = cfg
        self.phi = cfg.init_phi
        self.reference: float | None = None
        """Validation loss phi's rises are measured from: the pre-training validation, then each loss
        that raised phi."""

    def choose(self, r: float, progress: float, buffer_full: bool) -> str:
        """'fresh', 'replay' or 'dataset' for a uniform draw r and training progress in [0, 1]."""
        if r < self.phi * (1.0 - progress) or (r < self.phi and not buffer_full):
            return "fresh"
        if r < self.phi:
            return "replay"
        return "dataset"

    def on_validation(self, val_loss: float) -> bool:
        """Update phi from a new validation loss; returns True when phi rose. The first loss heard (the
        pre-training validation) becomes the reference."""
        if self.reference is None:
            self.reference = val_loss
            return False
        rose = val_loss >= self.reference + self.cfg.loss_eps
        if rose:
            self.phi = min(1.0, self.phi + self.cfg.phi_step)
            self.reference = val_loss
        return rose

    def state_dict(self) -> dict:
        return {"phi": self.phi, "reference": self.reference}

    def load_state_dict(self, state: dict) -> None:
        self.phi = float(state["phi"])
        # Checkpoints written before the repository rule kept the last validation as "prev_val_loss".
        self.reference = state.get("reference", state.get("prev_val_loss"))


class DistiLLMObjective(Objective):
    """DistiLLM: SKL/SRKL (gradient through the student inside the mixture) on the batch the adaptive
    off-policy sampler picks. Owns the schedule, the replay buffer and the sampling streams."""

    name = "distillm"

    def __init__(self, cfg: DistiLLMConfig, seed: int = 0):
        super().__init__(cfg, seed)
        self.schedule = AdaptiveOffPolicySchedule(cfg)
        self.replay = ReplayBuffer(cfg.capacity)

    def before_training(self, ctx: BeforeTraining) -> None:
        # The reference of phi's rises: the validation loss before any training step (not on resume).
        if self.schedule.reference is None and ctx.val_loss is not None:
            self.schedule.on_validation(ctx.val_loss())

    def on_validation(self, val_loss: float) -> str | None:
        if self.schedule.on_validation(val_loss):
            return f"DistiLLM: validation loss reached reference + loss_eps; phi -> {self.schedule.phi:.2f}"
        return None

    def training_batch(self, batch: dict, step: StepInfo) -> tuple[dict, dict]:
        """The batch to train on (fresh generations, replay or the data) and the ``kd/`` source metrics."""
        env, cfg = self.env, self.cfg
        source = self.schedule.choose(self.rng.random(), step.progress, self.replay.full)
        prompts = [p.cpu() for p in batch["prompts"]]
        logs = {}
        if source == "fresh":
            gen = generate(env.student, [p.to(env.device) for p in prompts], self.max_new_tokens(),
                           temperature=cfg.temperature, top_p=cfg.top_p, eos_id=env.eos_id, pad_id=env.pad_id,
                           vocab_size=env.vocab_size, generator=self.generator())
            responses = responses_of(gen)
            self.replay.push(prompts, responses)
            logs["kd/gen_len"] = float(gen.lengths.float().mean())
            batch = to_device(build_sequences(prompts, responses, env.pad_id), env.device)
        elif source == "replay":
            prompts, responses = self.replay.sample(len(prompts), self.rng)
            batch = to_device(build_sequences(prompts, responses, env.pad_id), env.device)
        logs.update({
            "kd/phi": self.schedule.phi,
            "kd/source_fresh": float(source == "fresh"),
            "kd/source_replay": float(source == "replay"),
            "kd/source_dataset": float(source == "dataset"),
            "kd/replay_size": float(len(self.replay)),
        })
        return batch, logs

    def loss(self, batch: dict, step: StepInfo, loss_fn) -> StepResult:
        batch, logs = self.training_batch(batch, step)
        total, count, parts, out = loss_fn(batch, self.cfg.divergence, alpha=self.cfg.alpha, detach_mixture=False)
        return StepResult(total, count, parts, [out], logs)

    def state_dict(self) -> dict:
        return dict(super().state_dict(), schedule=self.schedule.state_dict(), replay=self.replay.state_dict())

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "schedule" in state:
            self.schedule.load_state_dict(state["schedule"])
        if "replay" in state:
            self.replay.load_state_dict(state["replay"])
