"""DistillationTask: a frozen teacher guides a (PiKV MoE) student.

The task only wires objects together and logs: the objective (``distill/``: kd, distillm, distillm2, skd)
owns its settings and state and builds each step's loss through a :class:`~pikv_train.distill.term.DistillLoss`,
which owns the student, the teacher and the loss settings. The teacher is a guest: built in
``configure_model``, frozen, in eval mode, run under ``no_grad``, never in the optimizer, the
hyper-parameters or the checkpoint. Losses never build full-vocabulary logits: the student's LM head, the
teacher's head and the divergence run chunk by chunk (:func:`pikv_train.distill.chunked_distill_loss`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import torch
from torchmetrics import MeanMetric, SumMetric

from pikv_train.cache.config import CacheConfig, build_policy
from pikv_train.cache.sharding import ShardingConfig, build_sharding
from pikv_train.distill import DistiLLM2Config, DistiLLMConfig, SKDConfig
from pikv_train.distill.distillm import DistiLLMObjective
from pikv_train.distill.distillm2 import DistiLLM2Objective
from pikv_train.distill.kd import KDObjective
from pikv_train.distill.objective import BeforeTraining, DistillEnv, Objective, StepInfo
from pikv_train.distill.skd import SKDObjective
from pikv_train.distill.term import DistillLoss, DistillLossConfig
from pikv_train.errors import ConfigError
from pikv_train.models.config import ModelConfig
from pikv_train.models.build import build_decoder
from pikv_train.models.lora import check_with_cache
from pikv_train.models.decoder import Decoder
from pikv_train.tasks.base import OptimConfig, TaskBase, as_config, build_optimizer, total_training_steps
from pikv_train.tasks.checks import check_cache_budget, check_positions, check_vocab
from pikv_train.tasks.teacher import TeacherConfig, load_teacher

__all__ = ["DistillationTask", "DistillLossConfig"]


def _limited(n_batches: int, limit: int | float | None) -> int:
    """Batches a loop runs under a Lightning ``limit_*_batches`` (a count, or a fraction of the loader)."""
    if isinstance(limit, int):
        return min(n_batches, limit)
    if limit is not None and limit < 1.0:
        return max(1, int(n_batches * limit)) if limit > 0 else 0
    return n_batches


def _student_default() -> ModelConfig:
    # The student of recipes/distill.yaml (configs/model/student_moe.yaml), so the README's sizes hold
    # for a run that does not name one.
    return ModelConfig.preset("student-moe")


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
        self.loss_cfg = as_config(DistillLossConfig, loss)
        self.objective: Objective = {
            "kd": lambda: KDObjective(self.loss_cfg, seed),
            "distillm": lambda: DistiLLMObjective(as_config(DistiLLMConfig, distillm), seed),
            "distillm2": lambda: DistiLLM2Objective(as_config(DistiLLM2Config, distillm2), seed),
            "skd": lambda: SKDObjective(as_config(SKDConfig, skd), seed),
        }[objective]()
        self.student = build_decoder(as_config(ModelConfig, student), student_init)
        self.student.activation_checkpointing = activation_checkpointing
        self.student.set_kv_sharding(build_sharding(as_config(ShardingConfig, kv_sharding), self.student.cfg))
        cache_cfg = as_config(CacheConfig, cache)
        check_with_cache(self.student.cfg.lora, getattr(cache_cfg.compressor, "name", "none"), self.student.cfg.qkv_bias)
        self.student.set_cache_policy(build_policy(cache_cfg, self.student.cfg))
        self.teacher = None
        self.shared_vocab: int | None = None  # set for Hugging Face teachers with padded LM heads
        self.distill_loss: DistillLoss | None = None
        self.teacher_cfg = as_config(TeacherConfig, teacher)
        if self.teacher_cfg.student_itself:
            self._teach_itself(objective)
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
    def _teach_itself(self, objective: str) -> None:
        """KV-Distill's setting: the uncompressed student teaches the compressed one; only the cache's trainable
        parts learn (the student's own weights are frozen, so the teacher does not move)."""
        key = "model.init_args.teacher."
        if self.teacher_cfg.checkpoint is not None or self.teacher_cfg.hf_path is not None:
            raise ConfigError(f"{key}student_itself=true with a {key}checkpoint/hf_path: the teacher is the student; "
                              "drop the other teacher setting")
        if self.student.cfg.lora is not None:
            raise ConfigError(f"{key}student_itself=true freezes the student's own weights, adapters included (they "
                              "are the teacher); drop model.init_args.student.lora, or give another teacher")
        if objective != "kd":
            raise ConfigError(f"{key}student_itself=true works with objective kd (the divergence on the data's "
                              f"tokens), not {objective}; set model.init_args.objective kd")
        hooks = [h for h in (self.student.cache_policy, self.student.kv_sharding) if h is not None]
        if self.student.cache_policy is None:
            warnings.warn(f"{key}student_itself=true without a cache policy or compressor: the student is its own "
                          "teacher unchanged and the loss is zero; set model.init_args.cache.compressor (e.g. "
                          "{name: distillation})", stacklevel=3)
        self._freeze_base()
        if not any(p.requires_grad for h in hooks for p in h.parameters()):
            warnings.warn(f"{key}student_itself=true: the cache has nothing trainable (the student's weights are frozen "
                          "in this mode), so nothing learns; use a trainable compressor (distillation, lora, lora_plus)",
                          stacklevel=3)

    def _freeze_base(self) -> None:
        """The student's own weights stay fixed (the teacher is them); again after any cache policy change, since a
        compressor leaving (e.g. LoRA folding its factors back) re-enables the projection it had frozen."""
        for name, p in self.student.named_parameters():
            if not name.startswith(("cache_policy.", "kv_sharding.")):
                p.requires_grad_(False)

    def configure_model(self) -> None:
        if self.teacher is not None:
            return
        if self.teacher_cfg.student_itself:
            from pikv_train.tasks.teacher import SelfTeacher

            self.teacher = SelfTeacher(self.student)
            self._ddp_params_and_buffers_to_ignore = []
            self.distill_loss = DistillLoss(self.student, self.teacher, self.loss_cfg, self.shared_vocab)
            return
        teacher = load_teacher(self.teacher_cfg)
        if self.teacher_cfg.hf_path is not None:
            self._check_hf_teacher(teacher)
        elif teacher.cfg.vocab_size != self.student.cfg.vocab_size:
            raise ConfigError(
                f"teacher vocab_size={teacher.cfg.vocab_size} differs from student vocab_size="
                f"{self.student.cfg.vocab_size}; both must use the same tokenizer (set student.vocab_size)"
            )
        if self._trainer is not None and isinstance(getattr(getattr(teacher, "cfg", None), "max_seq_len", None), int):
            check_positions(self._trainer, teacher.cfg.max_seq_len, "teacher")  # before the first batch meets it
        # Stored outside the module tree's parameters for the optimizer, but as a submodule so that
        # .to(device) moves it; state_dict() below drops it from checkpoints.
        self.teacher = teacher.to(self.device)
        # Each rank loads its own copy; DDP must neither broadcast nor all-reduce it.
        self._ddp_params_and_buffers_to_ignore = [f"teacher.{n}" for n, _ in self.teacher.named_parameters()] + [
            f"teacher.{n}" for n, _ in self.teacher.named_buffers()
        ]
        self.distill_loss = DistillLoss(self.student, self.teacher, self.loss_cfg, self.shared_vocab)

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
        # Distill over the real shared vocabulary only: padded rows of either head are ignored.
        self.shared_vocab = real

    def _env(self) -> DistillEnv:
        """What the objective needs from this run: the models and the token conventions."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        tok = getattr(dm, "tokenizer", None)
        hp = getattr(dm, "hparams", None)
        vocab = self.shared_vocab or min(self.student.cfg.vocab_size, self.teacher.cfg.vocab_size)
        if tok is not None:
            vocab = min(vocab, tok.vocab_size)  # a student head padded past the tokenizer never samples padding
        return DistillEnv(
            student=self.student, teacher=self.teacher, vocab_size=vocab,
            eos_id=getattr(tok, "eos_id", None), pad_id=getattr(tok, "pad_id", 0),
            response_len=getattr(hp, "response_len", None),
        )

    def setup(self, stage: str) -> None:
        self.preflight()

    def preflight(self) -> None:
        """Checks that need the data module and the teacher; the CLI runs them before anything is written."""
        check_vocab(self.trainer, self.student.cfg.vocab_size, "student")
        check_positions(self.trainer, self.student.cfg.max_seq_len, "student", "model.init_args.student.max_seq_len")
        check_cache_budget(self.trainer, self.student.cache_policy)
        dm = getattr(self.trainer, "datamodule", None)
        hp = getattr(dm, "hparams", None)
        name = self.objective.name
        if self.objective.needs_prompts and hp is not None and getattr(hp, "mode", "prompts") != "prompts":
            raise ConfigError(
                f"objective {name!r} samples responses to prompts; set data.mode: prompts "
                "(with data.prompt_len / data.response_len, or prompt/response fields)"
            )
        if self.objective.needs_prompts and hp is not None:
            new = getattr(self.objective.cfg, "max_new_tokens", None) or hp.response_len
            if hp.prompt_len + new > self.student.cfg.max_seq_len:
                raise ConfigError(
                    f"{name}: data.prompt_len ({hp.prompt_len}) + generated tokens ({new}) exceed the student's "
                    f"max_seq_len={self.student.cfg.max_seq_len}; lower {name}.max_new_tokens or data.prompt_len"
                )
        if self.objective.needs_prompts and self._trainer is not None and "FSDP" in type(self.trainer.strategy).__name__:
            raise ConfigError(
                f"objective {name!r} generates text, and generation runs a different number of forwards per rank, "
                "which FSDP's sharded blocks cannot do without hanging; use DDP (configs/trainer/gpu_ddp.yaml)"
            )
        if hasattr(self.objective, "check_pairs_file") and self._trainer is not None:
            self.objective.check_pairs_file(self._run_dir(), getattr(hp, "response_len", None), self._identity())
        if name == "distillm" and hp is not None and self.objective.cfg.capacity < hp.batch_size:
            raise ConfigError(
                f"distillm.capacity={self.objective.cfg.capacity} is smaller than data.batch_size={hp.batch_size}: "
                "a replay batch draws distinct pairs; raise distillm.capacity"
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
    def on_train_start(self) -> None:
        self.objective.bind(self._env())
        self.objective.before_training(self._before_training())

    def _before_training(self) -> BeforeTraining:
        dm = getattr(self.trainer, "datamodule", None)
        has_val = (dm is not None and getattr(dm, "val_set", None) is not None and len(dm.val_set) > 0
                   and self.trainer.limit_val_batches != 0)
        if self.objective.name == "distillm" and not has_val:
            warnings.warn("objective distillm without validation: phi never rises from distillm.init_phi; "
                          "set data.val_fraction > 0 and trainer.limit_val_batches > 0 for the adaptive schedule",
                          stacklevel=2)
        run_dir = self._run_dir()
        train_set = getattr(dm, "train_set", None)
        return BeforeTraining(
            val_loss=self.validation_loss if has_val else None,
            train_prompts=(lambda: self._prompts_to_train_on(dm)) if train_set is not None else None,
            run_dir=run_dir, rank=self.global_rank, world_size=self.trainer.world_size,
            data_pairs=bool(train_set) and "student_response" in train_set[0],
            global_step=self.global_step, identity=self._identity(),
        )

    def _identity(self) -> dict:
        """What prepared training data depends on besides the objective's settings."""
        t = self.teacher_cfg
        return {"teacher": t.hf_path or t.checkpoint, "student_init": self.hparams.student_init,
                "seed": self.hparams.seed}

    def _run_dir(self) -> Path:
        """The run's output folder: the checkpoints' parent (``out_dir``), else the trainer's root dir."""
        dirpath = getattr(self.trainer.checkpoint_callback, "dirpath", None)
        return Path(dirpath).parent if dirpath else Path(self.trainer.default_root_dir)

    def _prompts_to_train_on(self, dm) -> list:
        """The prompts this run's training steps will draw: the sampler's order epoch after epoch, as many
        samples per epoch as the train loader yields (drop_last, limit_train_batches, all ranks)."""
        import math

        from pikv_train.data.sampler import first_samples

        t, n, bs = self.trainer, len(dm.train_set), dm.hparams.batch_size
        per_rank = math.ceil(n / t.world_size)
        batches = per_rank // bs if n >= bs else 1  # the loader drops the last partial batch (full batches)
        batches = _limited(batches, t.limit_train_batches)
        per_epoch = max(1, batches * bs * t.world_size)
        count = total_training_steps(t) * t.accumulate_grad_batches * bs * t.world_size
        idx = first_samples(n, dm.hparams.shuffle_seed, count, per_epoch)
        return [dm.train_set[i]["prompt"] for i in idx]

    @torch.no_grad()
    def validation_loss(self) -> float:
        """The student's token-mean validation CE (``val/loss``) now, measured as a validation of this
        trainer measures it: each rank's share of the split (a distributed sampler's ``rank::world``), the
        first ``limit_val_batches`` of it, under the trainer's precision, summed over ranks."""
        from torch.utils.data import DataLoader, Subset

        t, dm = self.trainer, self.trainer.datamodule
        plain = dm.val_dataloader()
        share = Subset(dm.val_set, range(self.global_rank, len(dm.val_set), t.world_size))
        loader = DataLoader(share, batch_size=plain.batch_size, collate_fn=plain.collate_fn)
        n_batches = _limited(len(loader), t.limit_val_batches)
        was = self.student.training
        self.student.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # (NLL sum, tokens)
        with t.precision_plugin.val_step_context():
            for i, batch in enumerate(loader):
                if i >= n_batches:
                    break
                batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                parts = self.distill_loss.validation(batch)
                sums += torch.stack([parts["ce"].double(), parts["n"].double()])
        self.student.train(was)
        sums = t.strategy.reduce(sums, reduce_op="sum")
        return float(sums[0] / sums[1].clamp_min(1.0))

    def training_step(self, batch, batch_idx):
        if self.teacher_cfg.student_itself:
            self._freeze_base()
        if self.objective.env is None:  # a step outside Trainer.fit (tests, manual loops)
            self.objective.bind(self._env())
        step = StepInfo(self.global_step, total_training_steps(self.trainer) if self._trainer is not None else 1)
        res = self.objective.loss(batch, step, self.distill_loss)
        total, count, parts, outs = res.total, res.count, res.parts, res.outs
        # Router losses (weighted by router_loss_weight) and hook penalties with their own weights (e.g.
        # DuoAttention's gate L1, cache.duo_l1_weight), each averaged over the student forwards.
        router_loss = sum(self.log_routing(o) for o in outs) / len(outs)
        hook_penalty = sum(self.log_hook_stats(o) for o in outs) / len(outs)
        per_batch = self.loss_cfg.router_loss_weight * router_loss + hook_penalty
        mean_loss = total.detach() / count.clamp_min(1) + per_batch.detach()
        self.check_finite({"kd/loss": parts["kd"], "kd/ce": parts["ce"], "router/loss": router_loss.detach()})
        self.log_dict(
            {"train/loss": mean_loss, "kd/loss": parts["kd"], "kd/ce": parts["ce"], "kd/agreement": parts["agreement"],
             **{k: torch.as_tensor(v, dtype=torch.float32) for k, v in res.logs.items()}},
            on_step=True,
        )
        self.log("train/kd", parts["kd"], prog_bar=True, on_step=True, logger=False)
        return self.to_backward(total, count, per_batch=per_batch)

    def validation_step(self, batch, batch_idx):
        # Always FKL + CE at validation, whatever the training divergence: comparable across recipes.
        parts = self.distill_loss.validation(batch)
        n = parts["n"]
        self.log_val_nll(parts["ce"], n)
        if n > 0:
            self.val_kd.update(parts["kd"] / n, weight=n)
        self.val_agree.update(parts["top1_agree"].float())
        self.val_count.update(n.float())

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if not self.trainer.sanity_checking and hasattr(self, "last_eval_loss"):
            message = self.objective.on_validation(self.last_eval_loss)
            if message:
                self.print(message)
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
        # The objective's state, so a resumed run continues the same schedule (DistiLLM phi, replay, RNGs).
        checkpoint["pikv_objective"] = {"name": self.objective.name, "state": self.objective.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("pikv_objective")
        if saved is None and checkpoint.get("pikv_sampler"):
            # Checkpoints written before objectives were objects kept {schedule, replay, rng, gen} here.
            saved = {"name": self.objective.name, "state": checkpoint["pikv_sampler"]}
        if saved and saved.get("name") == self.objective.name:
            self.objective.load_state_dict(saved["state"])
