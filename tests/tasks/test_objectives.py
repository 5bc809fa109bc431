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


@pytest.mark.parametrize("losses, phi", [
    ([2.0, 2.15, 2.2, 2.3], 0.2),  # 2.15 >= 2.1 raises (reference -> 2.15); 2.2 < 2.25; 2.3 >= 2.25 raises
    ([2.0, 1.5, 1.65, 1.8], 0.0),  # never 0.1 above the pre-training reference 2.0
    ([2.0, 2.1], 0.1),  # exactly reference + eps raises (>=)
])
def test_phi_follows_the_distillm_repository_rule(losses, phi):
    sched = AdaptiveOffPolicySchedule(DistiLLMConfig(loss_eps=0.1))
    for v in losses:  # the first is the validation before training (the reference)
        sched.on_validation(v)
    assert sched.phi == pytest.approx(phi)


def test_phi_is_capped_at_one():
    sched = AdaptiveOffPolicySchedule(DistiLLMConfig(loss_eps=0.1))
    for v in [2.0 + 0.2 * i for i in range(15)]:
        sched.on_validation(v)
    assert sched.phi == 1.0


def test_the_reference_is_a_validation_pass_before_training(teacher_ckpt, tmp_path):
    torch.manual_seed(0)
    task = _task(teacher_ckpt, "distillm")
    task.objective.on_validation = lambda v: None  # keep the reference as the pre-training pass set it
    dm = _prompt_dm()
    # The same student before any step, scored by hand on the batches a validation covers (2 here).
    expected_task = _task(teacher_ckpt, "distillm")
    expected_task.student.load_state_dict(task.student.state_dict())
    expected_task.student.eval()
    dm.setup()
    nll = n = 0.0
    with torch.no_grad():
        for i, batch in enumerate(dm.val_dataloader()):
            if i == 2:
                break
            s = expected_task.student.logits(expected_task.student(batch["input_ids"]).hidden)
            m = batch["loss_mask"]
            nll += float(torch.nn.functional.cross_entropy(s[m], batch["targets"][m], reduction="sum"))
            n += float(m.sum())
    assert len(dm.val_dataloader()) > 2
    _trainer(tmp_path, steps=1, limit_val_batches=2).fit(task, datamodule=dm)
    assert task.objective.schedule.reference == pytest.approx(nll / n, rel=1e-5)


def test_no_validation_leaves_phi_without_reference_and_warns(teacher_ckpt, tmp_path):
    task = _task(teacher_ckpt, "distillm")
    with pytest.warns(UserWarning, match="phi never rises"):
        _trainer(tmp_path, steps=1, limit_val_batches=0).fit(task, datamodule=_prompt_dm())
    assert task.objective.schedule.reference is None


def test_replay_draws_distinct_pairs():
    buf = ReplayBuffer(capacity=5)
    buf.push([torch.tensor([i]) for i in range(5)], [torch.tensor([i]) for i in range(5)])
    for seed in range(20):
        prompts, _ = buf.sample(5, random.Random(seed))
        assert sorted(int(p) for p in prompts) == [0, 1, 2, 3, 4]  # without replacement
    with pytest.raises(ValueError, match="capacity"):
        buf.sample(6, random.Random(0))


def test_replay_capacity_below_batch_size_is_refused(teacher_ckpt, tmp_path):
    task = _task(teacher_ckpt, "distillm", distillm=DistiLLMConfig(capacity=2))
    with pytest.raises(ConfigError, match="distillm.capacity=2 is smaller than data.batch_size=3"):
        _trainer(tmp_path).fit(task, datamodule=_prompt_dm())


def test_phi_zero_never_samples(teacher_ckpt, tmp_path):
    task = _task(teacher_ckpt, "distillm")
    seen = []
    task.log_dict = lambda d, **kw: seen.append({k: float(v) for k, v in d.items() if k.startswith("kd/source")})
    _trainer(tmp_path, steps=4, limit_val_batches=0).fit(task, datamodule=_prompt_dm())
    assert len(task.objective.replay) == 0
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
    assert len(task.objective.replay) == 6 and "kd/source_dataset" not in sources
    assert "kd/source_replay" in sources[2:]
    # Replayed pairs are (prompt, student response) token ids: the prompt comes from the data.
    prompt, response = task.objective.replay.items[0]
    assert len(prompt) == 8 and 1 <= len(response) <= 6


def test_replay_buffer_capacity_and_state_round_trip():
    buf = ReplayBuffer(capacity=3)
    buf.push([torch.tensor([i]) for i in range(5)], [torch.tensor([i, i]) for i in range(5)])
    assert len(buf) == 3 and buf.full and [p for p, _ in buf.items] == [[2], [3], [4]]  # oldest dropped
    again = ReplayBuffer(capacity=1)
    again.load_state_dict(buf.state_dict())
    assert list(again.items) == list(buf.items) and again.capacity == 3
    prompts, responses = buf.sample(3, random.Random(0))
    assert len(prompts) == 3 and all(len(r) == 2 for r in responses)


def test_sampler_state_is_checkpointed(teacher_ckpt, tmp_path):
    task = _task(teacher_ckpt, "distillm", distillm=DistiLLMConfig(init_phi=1.0, capacity=4))
    trainer = _trainer(tmp_path, steps=2, limit_val_batches=0)
    trainer.fit(task, datamodule=_prompt_dm())
    task.objective.schedule.phi = 0.7
    trainer.save_checkpoint(tmp_path / "s.ckpt")
    ckpt = torch.load(tmp_path / "s.ckpt", weights_only=False)
    fresh = _task(teacher_ckpt, "distillm", distillm=DistiLLMConfig(capacity=4))
    fresh.on_load_checkpoint(ckpt)
    assert fresh.objective.schedule.phi == 0.7
    assert list(fresh.objective.replay.items) == list(task.objective.replay.items)
    assert fresh.objective.rng.random() == task.objective.rng.random()


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
    task = _task(teacher_ckpt, "distillm2", distillm2=DistiLLM2Config(pairs="online"))
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


# ------------------------------------------------------------------ generation settings (all on-policy)
def _bound(objective, response_len=12, vocab=258, **kw):
    """An objective bound to a tiny student/teacher pair, without a trainer."""
    from pikv_train.distill import DistillEnv
    from pikv_train.models.decoder import Decoder

    torch.manual_seed(0)
    student = Decoder(ModelConfig.preset("nano-moe", vocab_size=vocab)).eval()
    teacher = Decoder(ModelConfig.preset("nano", vocab_size=vocab)).eval()
    task = DistillationTask(student=ModelConfig.preset("nano-moe", vocab_size=vocab), objective=objective, **kw)
    task.objective.bind(DistillEnv(student=student, teacher=teacher, vocab_size=min(vocab, 258), eos_id=None,
                                   pad_id=257, response_len=response_len))
    return task.objective


def _varied_batch():
    g = torch.Generator().manual_seed(1)
    from pikv_train.data.prompts import build_sequences

    prompts = [torch.randint(0, 256, (8,), generator=g) for _ in range(3)]
    refs = [torch.randint(0, 256, (n,), generator=g) for n in (2, 3, 5)]  # references shorter than response_len
    return dict(build_sequences(prompts, refs, 257), prompts=prompts)


def _generated_lengths(objective, batch):
    from pikv_train.distill import DistillLoss, DistillLossConfig, StepInfo

    env = objective.env
    seen = []
    loss = DistillLoss(env.student, env.teacher, DistillLossConfig())

    def record(b, *a, **kw):
        seen.append(b)
        return loss(b, *a, **kw)

    objective.loss(batch, StepInfo(0, 10), record)
    return [b["response_lens"].tolist() for b in seen]


@pytest.mark.parametrize("objective, kw", [
    ("distillm", {"distillm": DistiLLMConfig(init_phi=1.0)}),
    ("distillm2", {"distillm2": DistiLLM2Config(pairs="online")}),
    ("skd", {"skd": SKDConfig(gamma=5, top_k=25)}),
])
def test_generation_length_is_the_data_response_len_not_the_batch_references(objective, kw):
    obj = _bound(objective, response_len=12, **kw)
    lengths = _generated_lengths(obj, _varied_batch())
    generated = lengths if objective != "distillm2" else lengths[1:]  # distillm2: [teacher, student] batches
    if objective == "distillm2":
        assert lengths[0] == [12, 12, 12]  # the teacher's responses too
    assert generated == [[12, 12, 12]]


def test_explicit_max_new_tokens_wins_over_response_len():
    obj = _bound("skd", response_len=12, skd=SKDConfig(max_new_tokens=4))
    assert _generated_lengths(obj, _varied_batch()) == [[4, 4, 4]]


@pytest.mark.parametrize("objective, kw", [
    ("distillm", {"distillm": DistiLLMConfig(init_phi=1.0)}),
    ("distillm2", {"distillm2": DistiLLM2Config(pairs="online")}),
    ("skd", {"skd": SKDConfig(gamma=3, top_k=5)}),
])
def test_on_policy_objectives_generate_only_real_vocabulary_ids(objective, kw):
    obj = _bound(objective, response_len=8, vocab=320, **kw)  # heads padded to 320 rows, 258 real tokens
    for m in (obj.env.student, obj.env.teacher):  # make the padded rows the likeliest by far
        plain = m.logits
        m.logits = lambda h, plain=plain: plain(h) + torch.cat([torch.zeros(258), torch.full((62,), 30.0)])
    seen = []
    from pikv_train.distill import DistillLoss, DistillLossConfig, StepInfo

    loss = DistillLoss(obj.env.student, obj.env.teacher, DistillLossConfig(), vocab_size=258)
    obj.loss(_varied_batch(), StepInfo(0, 10), lambda b, *a, **k: (seen.append(b), loss(b, *a, **k))[1])
    for b in seen:
        assert int(b["input_ids"].max()) < 258 and int(b["targets"].max()) < 258


def test_published_sampling_defaults():
    assert (DistiLLM2Config().pairs, DistiLLM2Config().temperature, DistiLLM2Config().top_p) == ("offline", 0.8, 0.95)
    assert (DistiLLMConfig().temperature, DistiLLMConfig().top_p) == (1.0, 1.0)


# ------------------------------------------------------------------------------ DistiLLM-2 offline pairs
def test_distillm2_offline_pairs_are_generated_once_stored_and_reused_on_resume(teacher_ckpt, tmp_path):
    from pikv_train.distill.pairs_file import FILE_NAME

    rows = [{"prompt": f"q{i}: what is {i} + {i}?", "answer": f"{2 * i}"} for i in range(10)]
    f = tmp_path / "qa.json"
    f.write_text(json.dumps(rows))

    def _dm():  # 10 prompts (prompts cut to 8 tokens are all distinct), so generating pairs for all is quick
        return TextDataModule(path=str(f), prompt_field="prompt", response_field="answer", mode="prompts",
                              prompt_len=8, response_len=6, batch_size=3, val_fraction=0.2)

    dm = _dm()
    task = _task(teacher_ckpt, "distillm2", distillm2=DistiLLM2Config(pairs="offline"))
    trained_on = []
    plain = task.objective.responses
    task.objective.responses = lambda b: (lambda r: (trained_on.append((b, r)), r)[1])(plain(b))
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        default_root_dir=tmp_path,
                        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "run" / "checkpoints")])
    trainer.fit(task, datamodule=dm)
    path = tmp_path / "run" / FILE_NAME
    lines = path.read_text().splitlines()
    header, rows = json.loads(lines[0]), [json.loads(x) for x in lines[1:]]
    assert header["settings"] == {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 6, "teacher": teacher_ckpt,
                                  "student_init": None, "seed": 0}
    # One pair per prompt the run's 2 steps x 3 prompts draw (the sampler's order), not the whole split.
    from pikv_train.data.sampler import ResumableRandomSampler

    drawn = list(ResumableRandomSampler(len(dm.train_set), seed=0))[:6]
    assert {tuple(r["prompt"]) for r in rows} == {tuple(dm.train_set[i]["prompt"].tolist()) for i in drawn}
    assert len(rows) < len(dm.train_set)
    # Training used the stored pairs: the teacher batch's responses are the file's teacher responses.
    stored = {tuple(r["prompt"]): r for r in rows}
    batch, (teacher_batch, student_resp, _) = trained_on[0]
    for i, p in enumerate(batch["prompts"]):
        row = stored[tuple(p.tolist())]
        assert student_resp[i].tolist() == row["student"]
        n = int(teacher_batch["response_lens"][i])
        assert teacher_batch["targets"][i, len(p) - 1 : len(p) - 1 + n].tolist() == row["teacher"]
    # A resumed run (same run folder) reads the file instead of generating again.
    again = _task(teacher_ckpt, "distillm2", distillm2=DistiLLM2Config(pairs="offline"))
    again.objective.generate_pairs = lambda prompts: pytest.fail("offline pairs generated again on resume")
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        default_root_dir=tmp_path,
                        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "run" / "checkpoints")])
    trainer.fit(again, datamodule=_dm())
    assert again.objective.offline is not None and len(again.objective.offline) == len(rows)
    # Other settings refuse the stored file rather than silently reuse it.
    other = _task(teacher_ckpt, "distillm2", distillm2=DistiLLM2Config(pairs="offline", temperature=1.0))
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        default_root_dir=tmp_path,
                        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "run" / "checkpoints")])
    with pytest.raises(ConfigError, match="holds pairs generated with"):
        trainer.fit(other, datamodule=_dm())


def test_first_samples_follow_the_sampler_epoch_after_epoch():
    from pikv_train.data.sampler import ResumableRandomSampler, first_samples

    orders = []
    for e in range(3):
        s = ResumableRandomSampler(10, seed=4)
        s.set_epoch(e)
        orders.append(list(s))
    # 4 samples used per epoch (e.g. limit_train_batches), 12 drawn: the first 4 of epochs 0, 1 and 2.
    expected = list(dict.fromkeys(orders[0][:4] + orders[1][:4] + orders[2][:4]))
    assert first_samples(10, 4, 12, per_epoch=4) == expected
    assert first_samples(10, 4, 3) == orders[0][:3]
    assert sorted(first_samples(10, 4, 25)) == list(range(10))


def _qa_dm(tmp_path, n=10):
    rows = [{"prompt": f"q{i}: what is {i} + {i}?", "answer": f"{2 * i}"} for i in range(n)]
    f = tmp_path / "qa.json"
    f.write_text(json.dumps(rows))
    return lambda: TextDataModule(path=str(f), prompt_field="prompt", response_field="answer", mode="prompts",
                                  prompt_len=8, response_len=6, batch_size=3, val_fraction=0.2)


def _ckpt_trainer(tmp_path, steps):
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path,
                     callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "run" / "checkpoints")])


def test_offline_pairs_refuse_another_teacher_more_steps_or_a_resume_without_the_file(teacher_ckpt, tmp_path):
    import shutil

    from pikv_train.distill.pairs_file import FILE_NAME

    dm = _qa_dm(tmp_path)
    _ckpt_trainer(tmp_path, 1).fit(_task(teacher_ckpt, "distillm2"), datamodule=dm())  # pairs for 3 prompts
    # Another teacher: the stored pairs are not its responses.
    other_teacher = tmp_path / "other.ckpt"
    shutil.copy(teacher_ckpt, other_teacher)
    with pytest.raises(ConfigError, match="holds pairs generated with"):
        _ckpt_trainer(tmp_path, 1).fit(_task(str(other_teacher), "distillm2"), datamodule=dm())
    # More steps than the run that wrote the file: prompts without pairs are refused up front.
    with pytest.raises(ConfigError, match="more steps than the run that wrote it"):
        _ckpt_trainer(tmp_path, 3).fit(_task(teacher_ckpt, "distillm2"), datamodule=dm())
    # A resumed student (step > 0) never makes "offline" pairs: they must come from the initial student.
    (tmp_path / "run" / FILE_NAME).unlink()
    task = _task(teacher_ckpt, "distillm2", distillm2=DistiLLM2Config(max_new_tokens=6))
    from pikv_train.distill import BeforeTraining

    with pytest.raises(ConfigError, match="resumes at step 5 without distillm2_pairs.jsonl"):
        task.objective.before_training(BeforeTraining(train_prompts=lambda: [torch.tensor([1, 2])],
                                                      run_dir=tmp_path / "run", global_step=5))


def test_the_reference_is_not_measured_again_on_resume():
    from pikv_train.distill import BeforeTraining
    from pikv_train.distill.distillm import DistiLLMObjective

    obj = DistiLLMObjective(DistiLLMConfig())
    obj.schedule.reference = 2.5  # restored from the checkpoint
    obj.before_training(BeforeTraining(val_loss=lambda: pytest.fail("reference measured again")))
    assert obj.schedule.reference == 2.5


def test_checkpoints_of_the_previous_layout_load(teacher_ckpt):
    # Before objectives were objects, the task saved {schedule: {phi, prev_val_loss}, replay, rng, gen}.
    old = DistillationTask(objective="distillm", teacher=TeacherConfig(checkpoint=teacher_ckpt))
    old.objective.rng.random()
    legacy = {"pikv_sampler": {"schedule": {"phi": 0.3, "prev_val_loss": 2.5},
                               "replay": {"capacity": 4, "items": [([1, 2], [3]), ([4], [5, 6])]},
                               "rng": list(old.objective.rng.getstate()), "gen": old.objective.gen.get_state()}}
    task = _task(teacher_ckpt, "distillm")
    task.on_load_checkpoint(legacy)
    sched, replay = task.objective.schedule, task.objective.replay
    assert (sched.phi, sched.reference) == (0.3, 2.5)
    assert list(replay.items) == [([1, 2], [3]), ([4], [5, 6])] and replay.capacity == 4
    assert task.objective.rng.random() == old.objective.rng.random()
    # Another objective takes what it has (its random streams) and ignores the rest.
    skd = _task(teacher_ckpt, "skd")
    skd.on_load_checkpoint(legacy)
    assert skd.objective.gen.get_state().equal(old.objective.gen.get_state())


def test_generating_objectives_are_refused_under_fsdp(teacher_ckpt):
    from types import SimpleNamespace

    FSDPStrategy = type("FSDPStrategy", (), {})
    task = _task(teacher_ckpt, "skd")
    task._trainer = SimpleNamespace(strategy=FSDPStrategy(), datamodule=None)
    with pytest.raises(ConfigError, match="use DDP"):
        task.preflight()
    task = _task(teacher_ckpt, "kd")
    task._trainer = SimpleNamespace(strategy=FSDPStrategy(), datamodule=None)
    task.preflight()  # kd generates nothing: fine under FSDP
