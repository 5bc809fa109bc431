"""LightningModules: the language-model task (teachers, CE baseline) and the distillation task."""

import torch

from pikv_train.tasks.base import OptimConfig
from pikv_train.tasks.distill import DistillationTask, DistillLossConfig
from pikv_train.tasks.lm import LanguageModelTask
from pikv_train.tasks.safe_load import _safe_globals
from pikv_train.tasks.teacher import TeacherConfig, load_teacher

# Lightning resumes with torch.load(weights_only=True); the tasks' hyper-parameters hold our typed config
# dataclasses (plain data), so allow-list exactly those and a resumed fit works from Python as from the CLI.
torch.serialization.add_safe_globals(_safe_globals())

__all__ = ["DistillLossConfig", "DistillationTask", "LanguageModelTask", "OptimConfig", "TeacherConfig", "load_teacher"]
