"""On-policy objectives with Hugging Face teachers (issue 11): Speculative KD and DistiLLM-2 decode with the
teacher's own KV cache (left padding, rollback of rejected proposals) and give the same sequences and
losses as a cache-free, one-row-at-a-time reference under greedy settings; both train end to end."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import assert_close_rel

transformers = pytest.importorskip("transformers")

from test_hf_teacher import _hf_teacher, _texts  # noqa: E402

from pikv_train.distill import DistillEnv, DistillLoss, DistillLossConfig, DistiLLM2Config, SKDConfig, StepInfo  # noqa: E402
from pikv_train.distill.divergences import forward_kl  # noqa: E402
from pikv_train.distill.skd import speculative_kd_sample  # noqa: E402
from pikv_train.models import Decoder, ModelConfig, generate  # noqa: E402
from pikv_train.models.hf_causal_lm import HFCausalLM  # noqa: E402

PADDED = 320


def _qwen2_teacher(folder, texts):
    """The other family: a Qwen2 model with the same kind of tokenizer."""
    from test_hf_teacher import _tokenizer

    tok = _tokenizer(texts, 300)
    cfg = transformers.Qwen2Config(vocab_size=PADDED, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(1)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return len(tok)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def hf_teacher(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    make = {"llama": lambda: _hf_teacher(folder, padded_vocab=PADDED, texts=_texts()),
            "qwen2": lambda: _qwen2_teacher(folder, _texts())}[request.param]
    real = make()
    teacher = HFCausalLM(str(folder)).eval()
    # Random tiny models are nearly uniform; sharpen the head so greedy decisions are far from ties.
    teacher.model.get_output_embeddings().weight.data *= 30.0
    return teacher, real, folder


def _student(real: int) -> Decoder:
    torch.manual_seed(0)
    student = Decoder(ModelConfig.preset("nano-moe", vocab_size=PADDED, max_seq_len=128)).eval()
    student.embed.weight.data *= 30.0  # tied head: sharp greedy choices
    return student


def _prompts(real: int):
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, real, (n,), generator=g) for n in (6, 3, 9)]  # different lengths: left padding


# ------------------------------------------------------------------------------ cache-free references
def _greedy_ref(model_logits, prompt: list[int], n: int, vocab: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model_logits(torch.tensor([seq]))[0, -1, :vocab].argmax()))
    return seq[len(prompt):]


def _skd_ref(student, hf_model, prompt: list[int], gamma: int, k: int, max_new: int, vocab: int) -> list[int]:
    """SKD for one row, recomputing full forwards without any cache (greedy student and teacher)."""
    s_logits = lambda ids: student.logits(student(ids).hidden)  # noqa: E731
    resp: list[int] = []
    while len(resp) < max_new:
        cur = list(prompt) + resp
        g = min(gamma, max_new - len(resp))
        props = _greedy_ref(s_logits, cur, g, vocab)
        t = hf_model(torch.tensor([cur + props[:-1]])).logits[0, len(cur) - 1 :, :vocab]  # (g, V) predicting props
        acc = 0
        while acc < g and props[acc] in t[acc].topk(k).indices.tolist():
            acc += 1
        resp += props[:acc] + ([int(t[acc].argmax())] if acc < g else [])
    return resp


def _env(student, teacher, real, response_len):
    return DistillEnv(student=student, teacher=teacher, vocab_size=real, eos_id=None, pad_id=0, response_len=response_len)


def _dense_seq_mean_fkl(student, hf_model, batch, real):
    s = student.logits(student(batch["input_ids"]).hidden)[..., :real]
    t = hf_model(batch["input_ids"]).logits[..., :real]
    return forward_kl(student_logits=s, teacher_logits=t, mask=batch["loss_mask"], reduction="sequence_mean")


# ------------------------------------------------------------------------------------------ the tests
def test_skd_with_a_hf_teacher_equals_the_cache_free_reference(hf_teacher):
    teacher, real, _ = hf_teacher
    student = _student(real)
    prompts = _prompts(real)
    cfg = SKDConfig(gamma=3, top_k=120, student_temperature=0.0, teacher_temperature=0.0)
    res = speculative_kd_sample(student, teacher, prompts, cfg, 10, vocab_size=real)
    with torch.no_grad():
        ref = [_skd_ref(student, teacher.model, p.tolist(), 3, 120, 10, real) for p in prompts]
    assert [r.tolist() for r in res.responses] == ref
    assert 0 < res.accepted < res.proposed  # both accepted and rejected proposals: rollback was exercised
    # The loss the task trains on equals the dense sequence-mean FKL from the teacher's own logits.
    from pikv_train.distill.skd import SKDObjective

    obj = SKDObjective(cfg)
    obj.bind(_env(student, teacher, real, 10))
    loss_fn = DistillLoss(student, teacher, DistillLossConfig(chunk_size=7), vocab_size=real)
    out = obj.loss({"prompts": prompts}, StepInfo(0, 1), loss_fn)
    batch = obj.training_batch({"prompts": prompts})[0]
    with torch.no_grad():
        expected = _dense_seq_mean_fkl(student, teacher.model, batch, real)
    assert_close_rel(out.total / out.count, expected, 1e-5)


def test_distillm2_online_pairs_with_a_hf_teacher_equal_the_cache_free_reference(hf_teacher):
    teacher, real, _ = hf_teacher
    student = _student(real)
    prompts = _prompts(real)
    gen = generate(teacher, prompts, 8, temperature=0.0, vocab_size=real)
    with torch.no_grad():
        ref = [_greedy_ref(lambda ids: teacher.model(ids).logits, p.tolist(), 8, real) for p in prompts]
    assert [gen.tokens[i][gen.generated[i]].tolist() for i in range(len(prompts))] == ref
    # Through the objective (greedy sampling settings): its teacher batch holds exactly these responses.
    from pikv_train.distill.distillm2 import DistiLLM2Objective

    obj = DistiLLM2Objective(DistiLLM2Config(pairs="online", temperature=0.0))
    obj.bind(_env(student, teacher, real, 8))
    teacher_batch, student_resp, _ = obj.responses({"prompts": prompts})
    for i, p in enumerate(prompts):
        assert teacher_batch["targets"][i, len(p) - 1 : len(p) + 7].tolist() == ref[i]
    # The pair loss equals the published formula on dense logits of the teacher's own forward.
    from pikv_train.data.prompts import build_sequences
    from pikv_train.distill.divergences import skew_kl, skew_reverse_kl

    obj.responses = lambda batch: (teacher_batch, student_resp, {})  # the same pairs for the formula below
    loss_fn = DistillLoss(student, teacher, DistillLossConfig(chunk_size=5), vocab_size=real)
    out = obj.loss({"prompts": prompts}, StepInfo(0, 1), loss_fn)
    student_batch = build_sequences(prompts, student_resp, 0)

    def seq_mean(b, fn, **kw):
        s = student.logits(student(b["input_ids"]).hidden)[..., :real]
        t = teacher.model(b["input_ids"]).logits[..., :real]
        return fn(student_logits=s, teacher_logits=t, mask=b["loss_mask"], reduction="sequence_mean", **kw)

    with torch.no_grad():
        expected = seq_mean(teacher_batch, skew_kl, alpha=0.1) + seq_mean(student_batch, skew_reverse_kl, alpha=0.1,
                                                                            detach_mixture=True)
    assert_close_rel(out.total / out.count, expected, 1e-5)


@pytest.mark.parametrize("objective", ["skd", "distillm2"])
def test_on_policy_objectives_train_with_a_hf_teacher(hf_teacher, objective, tmp_path):
    from pikv_train.data import TextDataModule
    from pikv_train.tasks import DistillationTask, TeacherConfig

    _, real, folder = hf_teacher
    dm = TextDataModule(tokenizer=str(folder), max_documents=2, mode="prompts", prompt_len=8, response_len=6,
                        batch_size=3)
    task = DistillationTask(student=ModelConfig.preset("nano-moe", vocab_size=real), objective=objective,
                            teacher=TeacherConfig(hf_path=str(folder)), skd=SKDConfig(gamma=3),
                            distillm2=DistiLLM2Config(pairs="online"))
    logged = {}
    task.log_dict = lambda d, **kw: logged.update({k: float(v) for k, v in d.items()})
    before = [p.detach().clone() for p in task.student.parameters()]
    L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
              default_root_dir=tmp_path).fit(task, datamodule=dm)
    assert logged["kd/gen_len"] == 6.0 or objective == "skd"
    assert ("kd/skd_acceptance" in logged) == (objective == "skd")
    assert torch.isfinite(torch.tensor(logged["train/loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, task.student.parameters()))
