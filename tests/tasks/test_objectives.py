"""DistiLLM, DistiLLM-2 and Speculative KD inside DistillationTask: defining behaviour on tiny models."""

from __future__ import annotations

import json
import random

import lightning as L
import pytest
import torch

from pikv_train.data import TextDataModule
from pikv_train.distill import (
    AdaptiveOffPolicySchedule,
    DistiLLM2Config,
    DistiLLMConfig,
    ReplayBuffer,
    SKDConfig,
    beta_at,
    skew_kl,
    skew_reverse_kl,
)
from pikv_train.errors import ConfigError
from pikv_train.models import ModelConfig
from pikv_train.tasks import DistillationTask, LanguageModelTask, TeacherConfig


def _trainer(tmp_path, steps=3, **kw):
    return L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path, **kw,
    )


def _prompt_dm(**kw):
    return TextDataModule(max_documents=8, mode="prompts", prompt_len=8, response_len=6, batch_size=3, **kw)


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher_obj")
    task = LanguageModelTask(model=ModelConfig.preset("nano"))
    trainer = _trainer(tmp, steps=2, limit_val_batches=1)
    trainer.fit(task, datamodule=TextDataModule(max_documents=8, seq_len=32, batch_size=4))
    trainer.save_checkpoint(tmp / "t.ckpt")
    return str(tmp / "t.ckpt")


def _task(teacher_ckpt, objective, student="nano-moe", **kw):
    return DistillationTask(student=ModelConfig.preset(student), teacher=TeacherConfig(checkpoint=teacher_ckpt),
                            objective=objective, **kw)


# ------------------------------------------------------------------------------------------ DistiLLM
def test_schedule_split_matches_the_published_rule():
    sched = AdaptiveOffPolicySchedule(DistiLLMConfig())
    sched.phi = 0.3
    draws = [(i + 0.5) / 10000 for i in range(10000)]
    picks = [sched.choose(r, progress=0.5, buffer_full=True) for r in draws]
    assert picks.count("fresh") / 1e4 == pytest.approx(0.15, abs=1e-3)
    assert picks.count("replay") / 1e4 == pytest.approx(0.15, abs=1e-3)
    assert picks.count("dataset") / 1e4 == pytest.approx(0.70, abs=1e-3)
    # While the buffer is not full every student-generated batch is fresh.
    picks = [sched.choose(r, progress=0.5, buffer_full=False) for r in draws]
    assert picks.count("fresh") / 1e4 == pytest.approx(0.30, abs=1e-3) and "replay" not in picks


def test_phi_rises_only_when_validation_loss_rises_by_more_than_eps():
    sched = AdaptiveOffPolicySchedule(DistiLLMConfig(loss_eps=0.1))
    assert not sched.on_validation(2.0)
    assert not sched.on_validation(2.05) and sched.phi == 0.0  # rise of 0.05 <= eps
    assert sched.on_validation(2.2) and sched.phi == pytest.approx(0.1)
    for v in (2.4, 2.6, 2.8, 3.0, 3.2, 3.4, 3.6, 3.8, 4.0, 4.2):
        sched.on_validation(v)
    assert sched.phi == 1.0  # capped


def test_phi_zero_never_samples(teacher_ckpt, tmp_path):
    task = _task(teacher_ckpt, "distillm")
    seen = []
    task.log_dict = lambda d, **kw: seen.append({k: float(v) for k, v in d.items() if k.startswith("kd/source")})
    _trainer(tmp_path, steps=4, limit_val_batches=0).fit(task, datamodule=_prompt_dm())
    assert len(task.replay) == 0
    assert seen and all(s["kd/source_dataset"] == 1.0 for s in seen if s)


def test_phi_one_generates_fills_replay_then_replays(teacher_ckpt, tmp_path):
    task = _task(teacher_ckpt, "distillm", distillm=DistiLLMConfig(init_phi=1.0, capacity=6))
    sources = []
    task.log_dict = lambda d, **kw: sources.append(
        next((k for k in ("kd/source_fresh", "kd/source_replay", "kd/source_dataset") if float(d.get(k, 0)) == 1.0), None)
    )
    _trainer(tmp_path, steps=6, limit_val_batches=0).fit(task, datamodule=_prompt_dm())
    sources = [s for s in sources if s]
    assert sources[:2] == ["kd/source_fresh", "kd/source_fresh"]  # 2 batches of 3 fill capacity 6
    assert len(task.replay) == 6 and "kd/source_dataset" not in sources
    assert "kd/source_replay" in sources[2:]
    # Replayed pairs are (prompt, student response) token ids: the prompt comes from the data.
    prompt, response = task.replay.items[0]
    assert len(prompt) == 8 and 1 <= len(response) <= 6


def test_replay_buffer_capacity_and_state_round_trip():
    buf = ReplayBuffer(capacity=3)
    buf.push([torch.tensor([i]) for i in range(5)], [torch.tensor([i, i]) for i in range(5)])
    assert len(buf) == 3 and buf.full and [p for p, _ in buf.items] == [[2], [3], [4]]  # oldest dropped
    again = ReplayBuffer(capacity=1)
    again.load_state_dict(buf.state_dict())
    assert list(again.items) == list(buf.items) and again.capacity == 3
    prompts, responses = buf.sample(4, random.Random(0))
    assert len(prompts) == 4 and all(len(r) == 2 for r in responses)


def test_sampler_state_is_checkpointed(teacher_ckpt, tmp_path):
    task = _task(teacher_ckpt, "distillm", distillm=DistiLLMConfig(init_phi=1.0, capacity=4))
    trainer = _trainer(tmp_path, steps=2, limit_val_batches=0)
    trainer.fit(task, datamodule=_prompt_dm())
    task.schedule.phi = 0.7
    trainer.save_checkpoint(tmp_path / "s.ckpt")
    ckpt = torch.load(tmp_path / "s.ckpt", weights_only=False)
    fresh = _task(teacher_ckpt, "distillm", distillm=DistiLLMConfig(capacity=4))
    fresh.on_load_checkpoint(ckpt)
    assert fresh.schedule.phi == 0.7 and list(fresh.replay.items) == list(task.replay.items)
    assert fresh.rng.random() == task.rng.random()


def test_on_policy_objective_needs_prompt_data(teacher_ckpt, tmp_path):
    task = _task(teacher_ckpt, "skd")
    with pytest.raises(ConfigError, match="set data.mode: prompts"):
        _trainer(tmp_path).fit(task, datamodule=TextDataModule(max_documents=8, seq_len=32, batch_size=2))


# ---------------------------------------------------------------------------------------- DistiLLM-2
def test_distillm2_pair_loss_from_data_columns_equals_the_formula(teacher_ckpt, tmp_path):
    rows = [{"prompt": f"def f{i}(x):", "chosen": f"    return x + {i}", "rejected": f"  pass {i}{i}"} for i in range(12)]
    f = tmp_path / "pairs.json"
    f.write_text(json.dumps(rows))
    dm = TextDataModule(path=str(f), prompt_field="prompt", response_field="chosen", student_response_field="rejected",
                        mode="prompts", prompt_len=16, response_len=16, batch_size=4)
    task = _task(teacher_ckpt, "distillm2", student="nano", distillm2=DistiLLM2Config(beta=0.7))
    trainer = _trainer(tmp_path, steps=1, limit_val_batches=0)
    dm.setup()
    trainer.strategy.connect(task)
    task.trainer = trainer
    trainer.datamodule = dm
    task.configure_model()
    logged = {}
    task.log = lambda *a, **k: None  # calling training_step outside the fit loop
    task.log_dict = lambda d, **k: logged.update(d)
    batch = next(iter(dm.train_dataloader()))
    task.training_step(batch, 0)
    loss = logged["train/loss"]

    from pikv_train.data.prompts import build_sequences

    def seq_mean_div(b, fn, **kw):
        s = task.student.logits(task.student(b["input_ids"]).hidden)
        t = task.teacher.logits(task.teacher(b["input_ids"]).hidden)
        return fn(student_logits=s, teacher_logits=t, mask=b["loss_mask"], reduction="sequence_mean", **kw)

    sb = build_sequences(batch["prompts"], batch["student_responses"], 257)
    expected = 1.3 * seq_mean_div(batch, skew_kl, alpha=0.1) + 0.7 * seq_mean_div(sb, skew_reverse_kl, alpha=0.1, detach_mixture=True)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_distillm2_beta_curriculum():
    cfg = DistiLLM2Config(beta_curriculum=True)
    assert [beta_at(cfg, t, 100) for t in (0, 25, 50, 100)] == [1.0, 1.25, 1.5, 1.5]
    assert beta_at(DistiLLM2Config(beta=0.8), 50, 100) == 0.8


def test_distillm2_online_generation_trains(teacher_ckpt, tmp_path):
    task = _task(teacher_ckpt, "distillm2")
    logged = {}
    task.log_dict = lambda d, **kw: logged.update({k: float(v) for k, v in d.items()})
    _trainer(tmp_path, steps=2, limit_val_batches=0).fit(task, datamodule=_prompt_dm())
    assert {"kd/skl", "kd/srkl", "kd/gen_len", "kd/teacher_gen_len"} <= set(logged)
    assert logged["kd/skl"] > 0 and logged["kd/srkl"] > 0


# --------------------------------------------------------------------------------------- Speculative KD
def test_skd_objective_logs_acceptance_and_trains(teacher_ckpt, tmp_path):
    task = _task(teacher_ckpt, "skd", skd=SKDConfig(gamma=3, top_k=258))
    logged = {}
    task.log_dict = lambda d, **kw: logged.update({k: float(v) for k, v in d.items()})
    before = [p.detach().clone() for p in task.student.parameters()]
    _trainer(tmp_path, steps=2, limit_val_batches=0).fit(task, datamodule=_prompt_dm())
    assert logged["kd/skd_acceptance"] == 1.0  # K = V: on-policy, every student token accepted
    assert logged["kd/gen_len"] == 6.0
    assert any(not torch.equal(a, b) for a, b in zip(before, task.student.parameters()))
