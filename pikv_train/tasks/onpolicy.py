"""Per-step batch construction of the on-policy objectives (DistiLLM, DistiLLM-2, Speculative KD).

Each function takes the :class:`~pikv_train.tasks.distill.DistillationTask` and the data batch (prompts
mode: right-padded prompt + reference response, with the raw ``prompts`` list) and returns the batch
to train on (or the loss, for DistiLLM-2) plus ``kd/`` metrics.

Every student generation decodes with the student's deployed cache (``student.new_cache()``: the cache
policy and KV sharding it trains under, SPEC §7), so on-policy data is what the deployed student samples;
the teacher decodes with its own cache (a plain KV cache for a pikv_train teacher).
"""

from __future__ import annotations

import torch

from pikv_train.data.prompts import build_sequences
from pikv_train.distill.distillm2 import beta_at
from pikv_train.distill.skd import speculative_kd_sample
from pikv_train.models.generation import generate
from pikv_train.tasks.base import total_training_steps


def _as_rng_state(state):
    """random.Random state restored from a checkpoint (tuples may come back as lists)."""
    return tuple(tuple(x) if isinstance(x, list) else x for x in state)


def _tokenizer_ids(task) -> tuple[int | None, int]:
    tok = getattr(getattr(task.trainer, "datamodule", None), "tokenizer", None)
    return (tok.eos_id, tok.pad_id) if tok is not None else (None, 0)


def _max_new(task, batch, configured: int | None) -> int:
    return configured or int(batch["response_lens"].max())


def _responses(gen) -> list[torch.Tensor]:
    """Generated ids per row (without prompt padding or post-EOS padding)."""
    return [row[mask] for row, mask in zip(gen.tokens.cpu(), gen.generated.cpu())]


def _generator(task):
    # The seeded stream lives on the CPU; on accelerators sampling uses the device's default generator.
    return task.gen if task.device.type == "cpu" else None


def _to_device(task, batch: dict) -> dict:
    return {k: v.to(task.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _progress(task) -> float:
    return min(1.0, task.global_step / max(1, total_training_steps(task.trainer)))


def distillm_batch(task, batch) -> tuple[dict, dict]:
    """DistiLLM source choice: fresh student generations (with the student's deployed cache), a replay
    batch, or the dataset batch."""
    cfg = task.distillm_cfg
    source = task.schedule.choose(task.rng.random(), _progress(task), task.replay.full)
    eos, pad = _tokenizer_ids(task)
    prompts = [p.cpu() for p in batch["prompts"]]
    gen_len = 0.0
    if source == "fresh":
        gen = generate(task.student, [p.to(task.device) for p in prompts], _max_new(task, batch, cfg.max_new_tokens),
                       temperature=cfg.temperature, eos_id=eos, pad_id=pad, generator=_generator(task))
        responses = _responses(gen)
        task.replay.push(prompts, responses)
        gen_len = float(gen.lengths.float().mean())
        batch = _to_device(task, build_sequences(prompts, responses, pad))
    elif source == "replay":
        prompts, responses = task.replay.sample(len(prompts), task.rng)
        batch = _to_device(task, build_sequences(prompts, responses, pad))
    logs = {
        "kd/phi": task.schedule.phi,
        "kd/source_fresh": float(source == "fresh"),
        "kd/source_replay": float(source == "replay"),
        "kd/source_dataset": float(source == "dataset"),
        "kd/replay_size": float(len(task.replay)),
    }
    if source == "fresh":
        logs["kd/gen_len"] = gen_len
    return batch, logs


def distillm2_loss(task, batch):
    """DistiLLM-2 pair loss: (2 - beta) * SKL on teacher responses + beta * SRKL (detached mixture) on
    student responses, each sequence-mean. Responses come from data columns or are generated online, each
    model with its own deployed cache (the student's policy and sharding; the teacher's plain cache)."""
    cfg = task.distillm2_cfg
    eos, pad = _tokenizer_ids(task)
    prompts = [p.cpu() for p in batch["prompts"]]
    logs = {}
    if "student_responses" in batch:  # chosen (teacher) / rejected (student) read from the data
        teacher_batch = batch
        student_resp = [r.cpu() for r in batch["student_responses"]]
    else:
        n = _max_new(task, batch, cfg.max_new_tokens)
        dev_prompts = [p.to(task.device) for p in prompts]
        t_gen = generate(task.teacher, dev_prompts, n, temperature=cfg.temperature, top_p=cfg.top_p, eos_id=eos,
                         pad_id=pad, generator=_generator(task))
        s_gen = generate(task.student, dev_prompts, n, temperature=cfg.temperature, top_p=cfg.top_p, eos_id=eos,
                         pad_id=pad, generator=_generator(task))
        teacher_batch = _to_device(task, build_sequences(prompts, _responses(t_gen), pad))
        student_resp = _responses(s_gen)
        logs["kd/gen_len"] = float(s_gen.lengths.float().mean())
        logs["kd/teacher_gen_len"] = float(t_gen.lengths.float().mean())
    student_batch = _to_device(task, build_sequences(prompts, student_resp, pad))
    beta = beta_at(cfg, task.global_step, total_training_steps(task.trainer))
    skl, _, p_t, out_t = task.divergence_loss(teacher_batch, "skl", sequence_mean=True, ce_weight=0.0, alpha=cfg.alpha1)
    srkl, _, p_s, out_s = task.divergence_loss(student_batch, "srkl", sequence_mean=True, ce_weight=0.0,
                                               alpha=cfg.alpha2, detach_mixture=True)
    # Sums of per-sequence means; the unit of the mean is the pair.
    total = (2.0 - beta) * skl + beta * srkl
    pairs = torch.tensor(float(len(prompts)), device=total.device)
    parts = {"kd": (2.0 - beta) * p_t["kd"] + beta * p_s["kd"], "ce": p_t["ce"], "agreement": p_t["agreement"]}
    logs.update({"kd/skl": p_t["kd"], "kd/srkl": p_s["kd"], "kd/beta": beta})
    return total, pairs, parts, [out_t, out_s], logs


def skd_batch(task, batch) -> tuple[dict, dict]:
    """Speculative KD: interleaved student proposals (decoded with the student's deployed cache) / teacher
    corrections become the training batch."""
    cfg = task.skd_cfg
    eos, pad = _tokenizer_ids(task)
    prompts = [p.to(task.device) for p in batch["prompts"]]
    res = speculative_kd_sample(task.student, task.teacher, prompts, cfg, _max_new(task, batch, cfg.max_new_tokens),
                                eos_id=eos, pad_id=pad, generator=_generator(task))
    new = _to_device(task, build_sequences([p.cpu() for p in prompts], [r.cpu() for r in res.responses], pad))
    logs = {
        "kd/skd_acceptance": res.acceptance_rate,
        "kd/skd_replaced": float(res.replaced),
        "kd/gen_len": float(sum(len(r) for r in res.responses) / max(len(res.responses), 1)),
    }
    return new, logs
