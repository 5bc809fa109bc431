"""Building a trainable decoder from its config: the architecture, its starting weights and its adapters, in one
place for both tasks (``LanguageModelTask.model``, ``DistillationTask.student``).

Order: the architecture (:class:`Decoder`), then the weights it starts from (a pikv_train checkpoint: ``student_init``
/ ``init_from``), then LoRA adapters (they wrap the loaded base weights, which freeze).
"""

from __future__ import annotations

from pikv_train.models.config import ModelConfig
from pikv_train.models.decoder import Decoder


def build_decoder(cfg: ModelConfig, init_from: str | None = None) -> Decoder:
    """The decoder of ``cfg`` with the weights of ``init_from`` (a pikv_train checkpoint) and ``cfg.lora``'s
    adapters."""
    model = Decoder(cfg)
    if init_from:
        from pikv_train.tasks.teacher import init_student_from

        init_student_from(model, init_from)
    if cfg.lora is not None:
        from pikv_train.models.lora import apply_lora

        apply_lora(model, cfg.lora)
    return model
