"""DistiLLM-2 (Ko et al., ICML 2025): contrastive pair loss on teacher and student responses.

Per prompt, a teacher response y_T and a student response y_S. Loss per pair:

    (2 - beta) * mean_tokens SKL_alpha1(y_T) + beta * mean_tokens SRKL_alpha2(y_S)

where SKL pulls the student up on the teacher's response (gradient through the student inside the
mixture) and SRKL, with the student inside its mixture *detached*, pushes the student's own unlikely
tokens down; means are over each sequence's response tokens, then over pairs (sequence-mean).
Optional curriculum: beta_t = 1 + 0.5 * min(1, 2 t / T).

Where the pairs come from (``pairs``):

- ``offline`` (the published recipe): generated once, before training, from the initial student and the
  teacher (T = 0.8, top-p 0.95), one pair per training prompt (the repository generates for the whole
  training split; here for the prompts the run's steps will draw, which is the whole split once the run
  spans an epoch); stored as ``distillm2_pairs.jsonl`` in the run folder and read back on resume.
- ``online``: generated for each batch from the current student and the teacher.
- Data with a student-response column (``data.student_response_field``) supplies both responses itself
  (the reference response is the teacher's); then nothing is generated.

Every generation decodes with each model's own deployed cache (the student's policy and sharding) and
only real vocabulary ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from pikv_train.data.prompts import build_sequences
from pikv_train.errors import ConfigError
from pikv_train.models.generation import generate

from .objective import BeforeTraining, Objective, StepInfo, StepResult, responses_of, to_device
from .pairs_file import FILE_NAME, Pairs, read_pairs, write_pairs


@dataclass
class DistiLLM2Config:
    """DistiLLM-2 pair loss and response generation."""

    alpha1: float = 0.1
    """Skew of SKL on teacher responses."""
    alpha2: float = 0.1
    """Skew of SRKL on student responses (student inside the mixture detached)."""
    beta: float = 1.0
    """Weight balance: (2 - beta) * SKL + beta * SRKL."""
    beta_curriculum: bool = False
    """Use beta_t = 1 + 0.5 * min(1, 2 t / T) instead of a constant beta."""
    pairs: Literal["offline", "online"] = "offline"
    """offline: generate the pairs once before training from the initial student (published recipe);
    online: generate them for every batch from the current student."""
    temperature: float = 0.8
    """Sampling temperature of teacher and student responses (DistiLLM-2: 0.8)."""
    top_p: float = 0.95
    """Nucleus sampling threshold of teacher and student responses (DistiLLM-2: 0.95)."""
    max_new_tokens: int | None = None
    """Tokens generated per prompt (default: the data's response_len)."""
    generation_batch_size: int = 32
    """Prompts per generation batch when making the offline pairs."""

    def __post_init__(self) -> None:
        from pikv_train.distill.term import check_skew
        from pikv_train.errors import check_range

        k = "model.init_args.distillm2."
        check_skew(k + "alpha1", self.alpha1, "skl")
        check_skew(k + "alpha2", self.alpha2, "srkl")
        check_range(k + "beta", self.beta, lo=0, hi=2,
                    fix=f"set {k}beta in [0, 2] (the loss is (2 - beta) * SKL + beta * SRKL; both weights must be >= 0)")
        check_range(k + "temperature", self.temperature, lo=0, fix=f"set {k}temperature >= 0 (0 = greedy; DistiLLM-2: 0.8)")
        check_range(k + "top_p", self.top_p, lo=0, hi=1, lo_open=True, fix=f"set {k}top_p in (0, 1] (DistiLLM-2: 0.95)")
        check_range(k + "generation_batch_size", self.generation_batch_size, lo=1, fix=f"set {k}generation_batch_size >= 1")
        if self.max_new_tokens is not None:
            check_range(k + "max_new_tokens", self.max_new_tokens, lo=1, fix=f"set {k}max_new_tokens >= 1 or null")


def beta_at(cfg: DistiLLM2Config, step: int, total: int) -> float:
    """The beta used at optimizer step ``step`` of ``total``."""
    if not cfg.beta_curriculum:
        return cfg.beta
    return 1.0 + 0.5 * min(1.0, 2.0 * step / max(total, 1))


class DistiLLM2Objective(Objective):
    """The DistiLLM-2 pair loss; owns the offline pairs (when ``pairs: offline``)."""

    name = "distillm2"

    def __init__(self, cfg: DistiLLM2Config, seed: int = 0):
        super().__init__(cfg, seed)
        self.offline: Pairs | None = None

    # ------------------------------------------------------------------------ responses
    def generate_pairs(self, prompts: list[Tensor]) -> tuple[list[Tensor], list[Tensor], dict]:
        """(teacher responses, student responses, kd/ metrics) sampled now for ``prompts``."""
        env, cfg = self.env, self.cfg
        kw = dict(temperature=cfg.temperature, top_p=cfg.top_p, eos_id=env.eos_id, pad_id=env.pad_id,
                  vocab_size=env.vocab_size, generator=self.generator())
        dev_prompts = [p.to(env.device) for p in prompts]
        n = self.max_new_tokens()
        t_gen = generate(env.teacher, dev_prompts, n, **kw)
        s_gen = generate(env.student, dev_prompts, n, **kw)
        logs = {"kd/gen_len": float(s_gen.lengths.float().mean()),
                "kd/teacher_gen_len": float(t_gen.lengths.float().mean())}
        return responses_of(t_gen), responses_of(s_gen), logs

    def settings(self, response_len: int | None = None, identity: dict | None = None) -> dict:
        """What the offline pairs depend on: the sampling settings and the run's identity (teacher,
        initial student, seed). A run refuses a stored file made otherwise."""
        cfg = self.cfg
        n = cfg.max_new_tokens or response_len or self.max_new_tokens()
        return {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": n, **(identity or {})}

    def check_pairs_file(self, run_dir: Path, response_len: int | None, identity: dict | None = None) -> None:
        """Refuse, before anything is written, a stored pairs file made with other settings."""
        path = run_dir / FILE_NAME
        if self.cfg.pairs == "offline" and path.is_file():
            read_pairs(path, self.settings(response_len, identity))

    def before_training(self, ctx: BeforeTraining) -> None:
        if self.cfg.pairs != "offline" or ctx.train_prompts is None or ctx.data_pairs:
            return
        path = None if ctx.run_dir is None else ctx.run_dir / FILE_NAME
        settings = self.settings(identity=ctx.identity)
        if path is not None and path.is_file():
            self.offline = read_pairs(path, settings)
            missing = {tuple(p.tolist()) for p in ctx.train_prompts()} - self.offline.keys()
            if missing:
                raise ConfigError(
                    f"{str(path)!r} holds pairs for {len(self.offline)} prompts, but this run draws {len(missing)} "
                    "more (more steps than the run that wrote it?); offline pairs come from the initial student: "
                    "start again from it with the file deleted, or set distillm2.pairs: online"
                )
            return
        if ctx.global_step > 0:
            raise ConfigError(
                f"offline DistiLLM-2 pairs come from the initial student, but this run resumes at step "
                f"{ctx.global_step} without {FILE_NAME} in {str(ctx.run_dir)!r}; put the run's pairs file back, "
                "or resume with distillm2.pairs: online"
            )
        self.offline = self._generate_offline(ctx)
        if path is not None and ctx.rank == 0:
            write_pairs(path, settings, self.offline)

    def _generate_offline(self, ctx: BeforeTraining) -> Pairs:
        """Pairs for every distinct prompt training will draw, from the initial student; each rank
        generates a share and the shares are gathered, so every rank holds all pairs."""
        from tqdm.auto import tqdm

        unique = list({tuple(p.tolist()): p for p in ctx.train_prompts()}.values())
        mine = unique[ctx.rank :: ctx.world_size]
        bs = self.cfg.generation_batch_size
        pairs: Pairs = {}
        for i in tqdm(range(0, len(mine), bs), desc="DistiLLM-2 offline pairs", disable=ctx.rank != 0):
            chunk = mine[i : i + bs]
            teacher, student, _ = self.generate_pairs(chunk)
            pairs.update({tuple(p.tolist()): (t, s) for p, t, s in zip(chunk, teacher, student)})
        if ctx.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            shares: list = [None] * ctx.world_size
            torch.distributed.all_gather_object(shares, pairs)
            pairs = {k: v for share in shares for k, v in share.items()}
        return pairs

    def responses(self, batch: dict) -> tuple[dict, list[Tensor], dict]:
        """(teacher batch, student responses, kd/ metrics) for this batch's prompts."""
        env = self.env
        prompts = [p.cpu() for p in batch["prompts"]]
        if "student_responses" in batch:  # chosen (teacher) / rejected (student) read from the data
            return batch, [r.cpu() for r in batch["student_responses"]], {}
        if self.cfg.pairs == "offline":
            if self.offline is None:
                raise ConfigError(
                    "distillm2.pairs is offline but no pairs were generated before training; "
                    "train through Trainer.fit (which generates them), or set distillm2.pairs: online"
                )
            try:
                found = [self.offline[tuple(p.tolist())] for p in prompts]
            except KeyError:
                raise ConfigError(
                    "a training prompt has no offline DistiLLM-2 pair (the data changed since the pairs file was "
                    f"written); delete {FILE_NAME} in the run folder to generate them again"
                ) from None
            teacher, student, logs = [t for t, _ in found], [s for _, s in found], {}
        else:
            teacher, student, logs = self.generate_pairs(prompts)
        return to_device(build_sequences(prompts, teacher, env.pad_id), env.device), student, logs

    # ----------------------------------------------------------------------------- loss
    def loss(self, batch: dict, step: StepInfo, loss_fn) -> StepResult:
        cfg, env = self.cfg, self.env
        prompts = [p.cpu() for p in batch["prompts"]]
        teacher_batch, student_resp, logs = self.responses(batch)
        student_batch = to_device(build_sequences(prompts, student_resp, env.pad_id), env.device)
        beta = beta_at(cfg, step.step, step.total)
        skl, _, p_t, out_t = loss_fn(teacher_batch, "skl", sequence_mean=True, ce_weight=0.0, alpha=cfg.alpha1)
        srkl, _, p_s, out_s = loss_fn(student_batch, "srkl", sequence_mean=True, ce_weight=0.0, alpha=cfg.alpha2,
                                      detach_mixture=True)
        # Sums of per-sequence means; the unit of the mean is the pair.
        total = (2.0 - beta) * skl + beta * srkl
        pairs = torch.tensor(float(len(prompts)), device=total.device)
        parts = {"kd": (2.0 - beta) * p_t["kd"] + beta * p_s["kd"], "ce": p_t["ce"], "agreement": p_t["agreement"]}
        logs.update({"kd/skl": p_t["kd"], "kd/srkl": p_s["kd"], "kd/beta": beta})
        return StepResult(total, pairs, parts, [out_t, out_s], logs)
