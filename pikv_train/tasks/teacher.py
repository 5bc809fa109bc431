"""Loading a frozen teacher: our own decoder from a LanguageModelTask checkpoint (HF teachers: issue 6)."""

from __future__ import annotations

from pikv_train.errors import ConfigError, MissingFileError

from dataclasses import dataclass
from typing import Literal
from pathlib import Path

import torch

from pikv_train.models.config import ModelConfig
from pikv_train.models.decoder import Decoder


@dataclass
class TeacherConfig:
    """Where the teacher comes from. The teacher is frozen, in eval mode and never checkpointed."""

    checkpoint: str | None = None
    """A checkpoint written by LanguageModelTask (e.g. runs/teacher/checkpoints/last.ckpt)."""
    hf_path: str | None = None
    """A local folder holding a Hugging Face causal LM and its tokenizer (instead of checkpoint)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Teacher weights dtype."""
    trust_remote_code: bool = False
    """Allow a Hugging Face teacher folder to run its own modelling code (off unless you trust it)."""
    student_itself: bool = False
    """The teacher is the student without its cache compression (KV-Distill: the uncompressed model teaches the
    compressed one). No second model is loaded; the student's own weights are frozen and only the cache's trainable
    parts (the ``distillation`` compressor's scorer and adapters, LoRA factors) train. Objective ``kd`` only."""


# Parameters of attention hooks (e.g. DuoAttention gates) are not part of the architecture.
_HOOK_PREFIXES = ("cache_policy.", "kv_sharding.")


def read_checkpoint(path: str | Path) -> dict:
    """torch.load a Lightning checkpoint with ``weights_only`` (no arbitrary unpickling), with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(
            f"checkpoint not found: {str(path)!r}; fix the path (a teacher checkpoint comes from "
            "python -m pikv_train fit --config recipes/teacher.yaml)"
        )
    from pikv_train.tasks.safe_load import load_checkpoint_file

    return load_checkpoint_file(path)


class SelfTeacher(torch.nn.Module):
    """The student as its own teacher: its forward with the cache policy, compressor and sharding off, in eval mode,
    without gradient. Holds no weights of its own (the student is referenced, not registered: checkpoints and the
    optimizer see it once)."""

    def __init__(self, student):
        super().__init__()
        object.__setattr__(self, "_student", student)
        self.cfg = student.cfg

    def forward(self, input_ids, **kw):
        s = self._student
        was = s.training
        s.eval()
        try:
            with torch.no_grad(), s.cache_off():
                return s(input_ids, **kw)
        finally:
            s.train(was)

    @property
    def head_weight(self):
        return self._student.head_weight.detach()

    @property
    def head(self):
        from pikv_train.models.head import LogitHead

        return LogitHead(self.head_weight)


def load_teacher(cfg: TeacherConfig):
    """Build the teacher (our decoder from ``cfg.checkpoint``, or a Hugging Face model) and freeze it."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    if cfg.checkpoint is not None and cfg.hf_path is not None:
        raise ConfigError("set teacher.checkpoint or teacher.hf_path, not both")
    if cfg.hf_path is not None:
        from pikv_train.tasks.hf_teacher import HFTeacher

        model = HFTeacher(cfg.hf_path, dtype=dtype, trust_remote_code=cfg.trust_remote_code).eval()
        model.requires_grad_(False)
        return model
    if cfg.checkpoint is None:
        raise ConfigError(
            "no teacher given: set model.init_args.teacher.checkpoint (a LanguageModelTask checkpoint) or teacher.hf_path"
        )
    try:
        ckpt = read_checkpoint(cfg.checkpoint)
    except MissingFileError:
        raise
    except ConfigError as e:  # say it is the teacher's checkpoint, not the run's --ckpt_path
        raise ConfigError(f"model.init_args.teacher.checkpoint: {e}") from None
    if "pikv_model_config" not in ckpt or ckpt.get("pikv_task") != "lm":
        raise ConfigError(
            f"{cfg.checkpoint!r} is not a pikv_train LanguageModelTask checkpoint (no model config inside); "
            "use a checkpoint written by recipes/teacher.yaml"
        )
    from dataclasses import replace

    from pikv_train.models.build import plain_state

    mcfg = replace(ModelConfig.from_dict(ckpt["pikv_model_config"]), lora=None)  # adapters come merged
    model = Decoder(mcfg)
    state = plain_state(ckpt, "model.")
    state = {k: v for k, v in state.items() if not k.startswith(_HOOK_PREFIXES)}  # teachers attend fully
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"teacher checkpoint {cfg.checkpoint!r} does not fit its own architecture "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); the file is damaged or from another version"
        )
    model = model.to(dtype).eval()
    model.requires_grad_(False)
    return model


def init_student_from(student: Decoder, path: str) -> None:
    """Copy a pikv_train checkpoint's decoder weights into ``student`` (architectures must match)."""
    ckpt = read_checkpoint(path)
    prefix = {"lm": "model.", "distill": "student."}.get(ckpt.get("pikv_task"))
    if prefix is None:
        raise ConfigError(f"{path!r} is not a pikv_train checkpoint; student_init needs one written by pikv_train")
    from pikv_train.models.build import plain_state

    state = plain_state(ckpt, prefix)  # a LoRA checkpoint's adapters merged into its base
    state = {k: v for k, v in state.items() if not k.startswith(_HOOK_PREFIXES)}
    try:
        student.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ConfigError(
            f"student_init {path!r} has another architecture than the student ({str(e).splitlines()[0][:120]}); "
            "use a checkpoint of the same model config"
        ) from None
