"""The shape every distillation objective has (kd, distillm, distillm2, skd).

An objective is an object that owns its configuration and its state (DistiLLM's phi schedule and replay
buffer, DistiLLM-2's offline pairs, the random streams of its sampling). A distillation step asks it one
thing, :meth:`Objective.loss`: from the data batch, build what to train on (the batch itself, student
generations, interleaved samples, teacher/student pairs) and return the loss computed by a
:class:`~pikv_train.distill.term.DistillLoss` (student forward + teacher forward + fused chunked
divergence). Between steps it hears about validation losses and saves/loads its state with the
checkpoint. It never sees the training task: what it needs from the run is handed over explicitly, once
(:class:`DistillEnv`: the two models and the token conventions), per step (:class:`StepInfo`) and before
training (:class:`BeforeTraining`).

Models are used through one small causal-LM interface, answered by our :class:`~pikv_train.models.decoder.Decoder`
and by :class:`~pikv_train.models.hf_causal_lm.HFCausalLM` alike: ``model(ids, positions=, cache=).hidden``,
``model.logits(hidden)``, ``model.head`` (the LM head with the family's logit transform),
``model.new_cache()`` (a KV cache with ``rollback`` / ``snapshot`` / ``restore``) and ``model.cfg.max_seq_len``.
So every objective works with every teacher without special cases.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import torch
from torch import Tensor


@dataclass
class DistillEnv:
    """What an objective needs from the run, handed over once before the first step.

    Attributes:
        student: the trained decoder (generations use its deployed cache, ``student.new_cache()``).
        teacher: the frozen teacher (our decoder or a Hugging Face causal LM).
        vocab_size: the real shared vocabulary; ids at or beyond it are never generated (padded LM-head rows).
        eos_id / pad_id: the tokenizer's end-of-sequence (None: none) and padding ids.
        response_len: the data's ``response_len``, the default number of generated tokens per prompt.
    """

    student: torch.nn.Module
    teacher: torch.nn.Module
    vocab_size: int
    eos_id: int | None = None
    pad_id: int = 0
    response_len: int | None = None

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device


@dataclass
class StepInfo:
    """Where training is: optimizer step ``step`` of ``total``."""

    step: int
    total: int

    @property
    def progress(self) -> float:
        return min(1.0, self.step / max(1, self.total))


@dataclass
class BeforeTraining:
    """What an objective may use once before the first step.

    Attributes:
        val_loss: computes the student's validation loss over the whole validation split (None when the
            run has no validation split).
        train_prompts: the prompts the training steps will draw (1-D id tensors; the whole training split
            when the run spans an epoch or more).
        run_dir: the run's output folder (for files an objective keeps, e.g. offline pairs).
        rank / world_size: this process's place in a multi-process run.
        data_pairs: the data supplies (teacher, student) response pairs itself (DistiLLM-2 columns).
        global_step: the optimizer step training starts from (> 0 when resuming).
        identity: what data an objective prepares depends on besides its own settings (the teacher, the
            initial student, the seed), for files it keeps across runs.
    """

    val_loss: Callable[[], float] | None = None
    train_prompts: Callable[[], list[Tensor]] | None = None
    run_dir: Path | None = None
    rank: int = 0
    world_size: int = 1
    data_pairs: bool = False
    global_step: int = 0
    identity: dict = field(default_factory=dict)


@dataclass
class StepResult:
    """total: summed loss over ``count`` loss units (tokens or sequences or pairs); parts: detached
    per-unit ``kd`` / ``ce`` / ``agreement``; outs: the student forwards (for router losses); logs: ``kd/``
    metrics of the objective."""

    total: Tensor
    count: Tensor
    parts: dict
    outs: list
    logs: dict = field(default_factory=dict)


class Objective:
    """Base class: owns ``cfg``, a ``random.Random`` and a ``torch.Generator`` seeded from ``seed``.

    Subclasses set ``name`` and ``needs_prompts`` and implement :meth:`loss`.
    """

    name: ClassVar[str] = ""
    needs_prompts: ClassVar[bool] = True
    """Whether the objective samples responses to prompts (``data.mode: prompts``)."""

    def __init__(self, cfg, seed: int = 0):
        self.cfg = cfg
        # Sampling randomness (source draws, replay picks, generation) has its own seeded streams.
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.env: DistillEnv | None = None

    # --------------------------------------------------------------------------- wiring
    def bind(self, env: DistillEnv) -> None:
        """Receive the models and token conventions (before the first step, after the teacher loads)."""
        self.env = env

    def max_new_tokens(self) -> int:
        """Tokens generated per prompt: the objective's ``max_new_tokens``, else the data's response_len."""
        n = getattr(self.cfg, "max_new_tokens", None) or (self.env.response_len if self.env else None)
        if not n:
            raise ValueError(f"objective {self.name!r} needs max_new_tokens or the data's response_len")
        return int(n)

    def generator(self) -> torch.Generator | None:
        """The seeded sampling stream on CPU; on accelerators sampling uses the device's default generator."""
        return self.gen if self.env is None or self.env.device.type == "cpu" else None

    # ---------------------------------------------------------------------------- steps
    def before_training(self, ctx: BeforeTraining) -> None:
        """Called once when training starts (also on resume)."""

    def loss(self, batch: dict, step: StepInfo, loss_fn) -> StepResult:
        raise NotImplementedError

    def on_validation(self, val_loss: float) -> str | None:
        """Hear a validation loss; returns a message to print when the objective changed its schedule."""
        return None

    # ----------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if "rng" in state:
            self.rng.setstate(as_rng_state(state["rng"]))
        if "gen" in state:
            self.gen.set_state(state["gen"])


def as_rng_state(state):
    """random.Random state restored from a checkpoint (tuples may come back as lists)."""
    return tuple(tuple(x) if isinstance(x, list) else x for x in state)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def responses_of(gen) -> list[Tensor]:
    """Generated ids per row of a :class:`~pikv_train.models.generation.Generation` (CPU; without prompt
    padding or post-EOS padding)."""
    return [row[mask] for row, mask in zip(gen.tokens.cpu(), gen.generated.cpu())]
