"""LightningModules: the language-model task (teachers, CE baseline) and the distillation task."""

from pikv_train.tasks.base import OptimConfig
from pikv_train.tasks.distill import DistillationTask, DistillLossConfig
from pikv_train.tasks.lm import LanguageModelTask
from pikv_train.tasks.teacher import TeacherConfig, load_teacher

__all__ = ["DistillLossConfig", "DistillationTask", "LanguageModelTask", "OptimConfig", "TeacherConfig", "load_teacher"]
