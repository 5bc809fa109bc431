"""DistillationTask: a frozen teacher guides a (PiKV MoE) student.

The teacher is a guest: built in ``configure_model``, frozen, in eval mode, run under ``no_grad``, never
in the optimizer, the hyper-parameters or the checkpoint. Losses never build full-vocabulary logits:
the student's LM head, the divergence and the optional CE run chunk by chunk
(:func:`pikv_train.distill.chunked_distill_loss`).
"""

from __future__ import annotations

from pikv_train.errors import ConfigError

import random
from dataclasses import dataclass
from typing import Literal

import torch
from torchmetrics import MeanMetric, SumMetric

from pikv_train.cache.config import CacheConfig, build_policy
from pikv_train.cache.sharding import ShardingConfig, build_sharding
from pikv_train.distill import (
    AdaptiveOffPolicySchedule,
    DistiLLM2Config,
    DistiLLMConfig,
    ReplayBuffer,
    SKDConfig,
    chunked_distill_loss,
    sequence_mean_weights,
)
from pikv_train.tasks.onpolicy import _as_rng_state, distillm2_loss, distillm_batch, skd_batch
from pikv_train.models.config import ModelConfig, MoEConfig
from pikv_train.models.decoder import Decoder
from pikv_train.tasks.base import OptimConfig, TaskBase, as_config, build_optimizer, total_training_steps
from pikv_train.tasks.checks import check_positions, check_vocab
from pikv_train.tasks.teacher import TeacherConfig, init_student_from, load_teacher


@dataclass
class DistillLossConfig:
    """Distillation loss: kd_weight * divergence(teacher || student) + ce_weight * CE + router losses."""

    divergence: Literal["fkl", "rkl", "jsd", "tvd", "skl", "srkl"] = "fkl"
    """Token-level divergence between the teacher's and the student's next-token distributions."""
    kd_weight: float = 1.0
    """Weight of the divergence."""
    ce_weight: float = 0.0
    """Weight of cross-entropy on the data's next tokens."""
    temperature: float = 1.0
    """Divides both logit sets inside the divergence (not the CE)."""
    t2_scale: bool = False
    """Multiply the divergence by temperature squared (Hinton); off by default."""
    beta: float = 0.5
    """JSD mixture weight beta (0 = forward KL, 1 = reverse KL)."""
    alpha: float = 0.1
    """Skew alpha of SKL / SRKL."""
    router_loss_weight: float = 1.0
    """Multiplier on the student's (already weighted) router losses; cache penalties (DuoAttention's gate L1,
    ``cache.duo_l1_weight``) keep their own weight."""
    chunk_size: int = 512
    """Tokens per chunk of the fused LM head + loss."""


def _student_default() -> ModelConfig:
    return ModelConfig(moe=MoEConfig())


class DistillationTask(TaskBase):
    """Train ``student`` to match ``teacher`` on the data's loss tokens.

    Args:
        student: the student architecture (a PiKV MoE decoder when ``moe`` is set).
        teacher: where to load the frozen teacher from.
        loss: the distillation objective.
        optim: optimizer and schedule for the student.
        cache: the KV cache policy the student trains and validates under (the teacher never uses one).
        kv_sharding: expert-sharded KV placement for the student (default: off).
        objective: ``kd`` (divergence on the data's tokens), ``distillm`` (SKL/SRKL + adaptive student
            generations and replay), ``distillm2`` (teacher/student response pairs), ``skd`` (speculative
            KD interleaved sampling, then forward KL). The last three need ``data.mode: prompts``.
        distillm / distillm2 / skd: settings of those objectives.
        seed: seed of the sampler's random streams (source choice, replay, generation).
        student_init: start the student from this checkpoint's weights (a LanguageModelTask checkpoint of
            the same architecture, e.g. a CE-trained "SFT" student, as DistiLLM and DistiLLM-2 do).
        nonfinite: on a NaN/inf loss or gradient, ``stop`` (raise, naming the step and loss terms; the last
            good checkpoint stays as it is) or ``skip`` the optimizer step.
        activation_checkpointing: recompute each decoder block in the backward instead of storing its
            activations (less memory, about a third more compute).
    """

    def __init__(
        self,
        student: ModelConfig = _student_default(),
        teacher: TeacherConfig = TeacherConfig(),
        loss: DistillLossConfig = DistillLossConfig(),
        optim: OptimConfig = OptimConfig(),
        cache: CacheConfig = CacheConfig(),
        kv_sharding: ShardingConfig = ShardingConfig(),
        objective: Literal["kd", "distillm", "distillm2", "skd"] = "kd",
        distillm: DistiLLMConfig = DistiLLMConfig(),
        distillm2: DistiLLM2Config = DistiLLM2Config(),
        skd: SKDConfig = SKDConfig(),
        seed: int = 0,
        student_init: str | None = None,
        nonfinite: Literal["stop", "skip"] = "stop",
        activation_checkpointing: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.nonfinite = nonfinite
        self.distillm_cfg = as_config(DistiLLMConfig, distillm)
        self.distillm2_cfg = as_config(DistiLLM2Config, distillm2)
        self.skd_cfg = as_config(SKDConfig, skd)
        self.schedule = AdaptiveOffPolicySchedule(self.distillm_cfg)
        self.replay = ReplayBuffer(self.distillm_cfg.capacity)
        # Sampler randomness (source draws, replay picks, generation) has its own seeded streams.
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.student = Decoder(as_config(ModelConfig, student))
        self.student.activation_checkpointing = activation_checkpointing
        if student_init:
            init_student_from(self.student, student_init)
        self.student.set_kv_sharding(build_sharding(as_config(ShardingConfig, kv_sharding), self.student.cfg))
        self.student.set_cache_policy(build_policy(as_config(CacheConfig, cache), self.student.cfg))
        self.teacher: Decoder | None = None
        self.shared_vocab: int | None = None  # set for Hugging Face teachers with padded LM heads
        self.teacher_cfg = as_config(TeacherConfig, teacher)
        self.loss_cfg = as_config(DistillLossConfig, loss)
        self.optim_cfg = as_config(OptimConfig, optim)
        # The checkpoint holds the student only; loading it must not require teacher keys.
        self.strict_loading = False
        self.val_kd = MeanMetric()
        self.val_agree = SumMetric()
        self.val_count = SumMetric()

    @property
    def student_model(self) -> Decoder:
        return self.student

    # ------------------------------------------------------------------ teacher
    def configure_model(self) -> None:
        if self.teacher is not None:
            return
        teacher = load_teacher(self.teacher_cfg)
        if self.teacher_cfg.hf_path is not None:
            self._check_hf_teacher(teacher)
        elif teacher.cfg.vocab_size != self.student.cfg.vocab_size:
            raise ConfigError(
                f"teacher vocab_size={teacher.cfg.vocab_size} differs from student vocab_size="
                f"{self.student.cfg.vocab_size}; both must use the same tokenizer (set student.vocab_size)"
            )
        # Stored outside the module tree's parameters for the optimizer, but as a submodule so that
        # .to(device) moves it; state_dict() below drops it from checkpoints.
        self.teacher = teacher.to(self.device)
        # Each rank loads its own copy; DDP must neither broadcast nor all-reduce it.
        self._ddp_params_and_buffers_to_ignore = [f"teacher.{n}" for n, _ in self.teacher.named_parameters()] + [
            f"teacher.{n}" for n, _ in self.teacher.named_buffers()
        ]

    def _check_hf_teacher(self, teacher) -> None:
        """Same tokenizer as the data; compare only the shared real vocabulary (padded heads are sliced)."""
        from pikv_train.tasks.hf_teacher import check_same_tokenizer

        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and getattr(dm, "tokenizer", None) is not None:
            check_same_tokenizer(teacher.tokenizer, dm.tokenizer)
        real = teacher.real_vocab_size
        if self.student.cfg.vocab_size < real:
            raise ConfigError(
                f"student vocab_size={self.student.cfg.vocab_size} is smaller than the teacher tokenizer's {real} "
                f"tokens; set student.vocab_size to at least {real}"
            )
        if self.hparams.objective == "skd" or (self.hparams.objective == "distillm2"):
            raise ConfigError(
                f"objective {self.hparams.objective!r} decodes with the teacher's KV cache, which Hugging Face "
                "teachers do not support here yet; use a pikv_train teacher checkpoint, or distillm / kd"
            )
        # Distill over the real shared vocabulary only: padded rows of either head are ignored.
        self.shared_vocab = real

    def setup(self, stage: str) -> None:
        self.preflight()

    def preflight(self) -> None:
        """Checks that need the data module and the teacher; the CLI runs them before anything is written."""
        check_vocab(self.trainer, self.student.cfg.vocab_size, "student")
        check_positions(self.trainer, self.student.cfg.max_seq_len, "student")
        dm = getattr(self.trainer, "datamodule", None)
        if self.hparams.objective != "kd" and dm is not None and getattr(dm.hparams, "mode", "prompts") != "prompts":
            raise ConfigError(
                f"objective {self.hparams.objective!r} samples responses to prompts; set data.mode: prompts "
                "(with data.prompt_len / data.response_len, or prompt/response fields)"
            )

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # Lightning restores training mode after validation: keep the guest frozen
        return self

    def state_dict(self, *args, **kwargs):
        sd = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        return type(sd)((k, v) for k, v in sd.items() if not k.startswith(prefix + "teacher."))

    # -------------------------------------------------------------------- steps
    @torch.no_grad()
    def teacher_hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T, d_t) final hidden states of the frozen teacher."""
        return self.teacher(input_ids).hidden

    def divergence_loss(self, batch, divergence: str, *, sequence_mean: bool = False, ce_weight: float | None = None,
                        **div_kw) -> tuple[torch.Tensor, torch.Tensor, dict, object]:
        """Student forward + fused chunked divergence (+ CE) on ``batch``'s loss tokens.

        Returns (summed loss, count of loss units, detached per-unit parts, student output). With
        ``sequence_mean`` each sequence's tokens are averaged first and the unit is the sequence
        (DistiLLM-2, SKD); otherwise the unit is the token.
        """
        cfg = self.loss_cfg
        t_hidden = self.teacher_hidden(batch["input_ids"])
        out = self.student(batch["input_ids"])
        mask = batch["loss_mask"]
        n_seq = (mask.sum(1) > 0).sum()
        # sequence_mean_weights averages over sequences too; times n_seq gives per-sequence means to sum.
        weights = (sequence_mean_weights(mask) * n_seq).flatten() if sequence_mean else mask.flatten().bool()
        total, parts = chunked_distill_loss(
            out.hidden.flatten(0, 1), self.student.head_weight,
            t_hidden.flatten(0, 1).to(out.hidden.dtype), self.teacher.head_weight.to(out.hidden.dtype),
            mask=weights, divergence=divergence, chunk_size=cfg.chunk_size, temperature=cfg.temperature,
            t2_scale=cfg.t2_scale, targets=batch["targets"].flatten(),
            ce_weight=cfg.ce_weight if ce_weight is None else ce_weight, kd_weight=cfg.kd_weight,
            reduction="sum", return_parts=True, vocab_size=self.shared_vocab, **div_kw,
        )
        count = n_seq if sequence_mean else mask.sum()
        n = mask.sum().clamp_min(1)
        parts = dict(parts, kd=parts["kd"] / (count.clamp_min(1)), ce=parts["ce"] / (count.clamp_min(1)),
                     agreement=parts["top1_agree"].float() / n)
        return total, count, parts, out

    def _div_kwargs(self) -> dict:
        cfg = self.loss_cfg
        return {"beta": cfg.beta} if cfg.divergence == "jsd" else {"alpha": cfg.alpha} if cfg.divergence in ("skl", "srkl") else {}

    def training_step(self, batch, batch_idx):
        objective = self.hparams.objective
        logs: dict[str, torch.Tensor | float] = {}
        if objective == "kd":
            total, count, parts, out = self.divergence_loss(batch, self.loss_cfg.divergence, **self._div_kwargs())
            outs = [out]
        elif objective == "distillm":
            batch, logs = distillm_batch(self, batch)
            cfg = self.distillm_cfg
            total, count, parts, out = self.divergence_loss(batch, cfg.divergence, alpha=cfg.alpha, detach_mixture=False)
            outs = [out]
        elif objective == "distillm2":
            total, count, parts, outs, logs = distillm2_loss(self, batch)
        else:  # skd
            batch, logs = skd_batch(self, batch)
            total, count, parts, out = self.divergence_loss(batch, "fkl", sequence_mean=True)
            outs = [out]
        # Router losses (weighted by router_loss_weight) and hook penalties with their own weights (e.g.
        # DuoAttention's gate L1, cache.duo_l1_weight), each averaged over the student forwards.
        router_loss = sum(self.log_routing(o) for o in outs) / len(outs)
        hook_penalty = sum(self.log_hook_stats(o) for o in outs) / len(outs)
        per_batch = self.loss_cfg.router_loss_weight * router_loss + hook_penalty
        mean_loss = total.detach() / count.clamp_min(1) + per_batch.detach()
        self.check_finite({"kd/loss": parts["kd"], "kd/ce": parts["ce"], "router/loss": router_loss.detach()})
        self.log_dict(
            {"train/loss": mean_loss, "kd/loss": parts["kd"], "kd/ce": parts["ce"], "kd/agreement": parts["agreement"],
             **{k: torch.as_tensor(v, dtype=torch.float32) for k, v in logs.items()}},
            on_step=True,
        )
        self.log("train/kd", parts["kd"], prog_bar=True, on_step=True, logger=False)
        return self.to_backward(total, count, per_batch=per_batch)

    def validation_step(self, batch, batch_idx):
        # Always FKL + CE at validation, whatever the training divergence: comparable across recipes.
        cfg = self.loss_cfg
        t_hidden = self.teacher_hidden(batch["input_ids"])
        out = self.student(batch["input_ids"])
        mask = batch["loss_mask"].flatten().bool()
        _, parts = chunked_distill_loss(
            out.hidden.flatten(0, 1), self.student.head_weight, t_hidden.flatten(0, 1).to(out.hidden.dtype),
            self.teacher.head_weight.to(out.hidden.dtype),
            mask=mask, divergence="fkl", chunk_size=cfg.chunk_size, targets=batch["targets"].flatten(),
            ce_weight=1.0, kd_weight=1.0, return_parts=True, reduction="sum", vocab_size=self.shared_vocab,
        )
        n = mask.sum()
        self.log_val_nll(parts["ce"], n)
        if n > 0:
            self.val_kd.update(parts["kd"] / n, weight=n)
        self.val_agree.update(parts["top1_agree"].float())
        self.val_count.update(n.float())

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.hparams.objective == "distillm" and not self.trainer.sanity_checking and hasattr(self, "last_eval_loss"):
            if self.schedule.on_validation(self.last_eval_loss):
                self.print(f"DistiLLM: validation loss rose by more than loss_eps; phi -> {self.schedule.phi:.2f}")
        if self.val_kd.update_count:
            self.log("val/kd", self.val_kd.compute())
            self.log("val/agreement", self.val_agree.compute() / self.val_count.compute().clamp_min(1))
        for m in (self.val_kd, self.val_agree, self.val_count):
            m.reset()

    def test_step(self, batch, batch_idx):
        self.validation_step(batch, batch_idx)

    def configure_optimizers(self):
        return build_optimizer(self.student, self.optim_cfg, total_training_steps(self.trainer))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["pikv_model_config"] = self.student.cfg.to_dict()
        checkpoint["pikv_task"] = "distill"
        # Sampler state, so a resumed run continues the same schedule (DistiLLM phi, replay buffer, RNGs).
        checkpoint["pikv_sampler"] = {
            "schedule": self.schedule.state_dict(), "replay": self.replay.state_dict(),
            "rng": self.rng.getstate(), "gen": self.gen.get_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("pikv_sampler")
        if state:
            self.schedule.load_state_dict(state["schedule"])
            self.replay.load_state_dict(state["replay"])
            self.rng.setstate(_as_rng_state(state["rng"]))
            self.gen.set_state(state["gen"])
