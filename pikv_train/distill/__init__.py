"""Distillation math: token-level divergences and the chunked fused LM-head losses (SPEC §5)."""

from .chunked import chunked_cross_entropy, chunked_distill_loss
from .divergences import (
    DIVERGENCES,
    forward_kl,
    jsd,
    reduce_tokens,
    reverse_kl,
    sequence_mean_weights,
    skew_kl,
    skew_reverse_kl,
    token_divergence,
    tvd,
)

__all__ = [
    "forward_kl",
    "reverse_kl",
    "jsd",
    "tvd",
    "skew_kl",
    "skew_reverse_kl",
    "token_divergence",
    "reduce_tokens",
    "sequence_mean_weights",
    "chunked_distill_loss",
    "chunked_cross_entropy",
    "DIVERGENCES",
]

from .distillm import AdaptiveOffPolicySchedule, DistiLLMConfig, DistiLLMObjective  # noqa: E402
from .distillm2 import DistiLLM2Config, DistiLLM2Objective, beta_at  # noqa: E402
from .kd import KDObjective  # noqa: E402
from .objective import BeforeTraining, DistillEnv, Objective, StepInfo, StepResult  # noqa: E402
from .replay import ReplayBuffer  # noqa: E402
from .skd import SKDConfig, SKDObjective, SKDResult, speculative_kd_sample  # noqa: E402
from .term import DistillLoss, DistillLossConfig  # noqa: E402

__all__ += [
    "AdaptiveOffPolicySchedule", "DistiLLMConfig", "DistiLLM2Config", "beta_at", "ReplayBuffer", "SKDConfig",
    "SKDResult", "speculative_kd_sample", "Objective", "KDObjective", "DistiLLMObjective", "DistiLLM2Objective",
    "SKDObjective", "DistillEnv", "StepInfo", "StepResult", "BeforeTraining", "DistillLoss", "DistillLossConfig",
]
