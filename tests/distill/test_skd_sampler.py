"""Speculative KD sampler: its defining behaviour on tiny models."""

from __future__ import annotations

import torch

from pikv_train.distill.skd import SKDConfig, speculative_kd_sample
from pikv_train.models import Decoder, ModelConfig, generate


def _sharpen(model, scale=20.0):
    # Random tiny models predict nearly uniform distributions; sharpening makes sampling depend on logits.
    plain = model.logits
    model.logits = lambda h: plain(h) * scale
    return model


def _pair(scale=20.0):
    torch.manual_seed(0)
    student = _sharpen(Decoder(ModelConfig.preset("nano-moe")).eval(), scale)
    return student, _sharpen(Decoder(ModelConfig.preset("nano", n_layer=3)).eval(), scale)


def _prompts():
    g = torch.Generator().manual_seed(42)
    return [torch.randint(0, 256, (n,), generator=g) for n in (5, 8, 3)]


def test_k_equal_vocab_accepts_every_student_token_and_equals_student_sampling():
    student, teacher = _pair()
    res = speculative_kd_sample(student, teacher, _prompts(), SKDConfig(gamma=4, top_k=258), 13,
                                generator=torch.Generator().manual_seed(3))
    assert res.acceptance_rate == 1.0 and res.replaced == 0
    ref = generate(student, _prompts(), 13, temperature=1.0, generator=torch.Generator().manual_seed(3))
    for i, r in enumerate(res.responses):
        assert torch.equal(r, ref.tokens[i, ref.prompt_len :]), i


def test_k_one_keeps_only_teacher_top1_student_tokens():
    student, teacher = _pair()
    prompts = _prompts()
    res = speculative_kd_sample(student, teacher, prompts, SKDConfig(gamma=3, top_k=1), 12,
                                generator=torch.Generator().manual_seed(0))
    assert all(len(r) == 12 for r in res.responses)
    assert res.accepted + res.replaced == 36
    # Every token of the final sequence is either the teacher's top-1 at its position (accepted student
    # tokens always are) or a teacher replacement; with teacher temperature -> 0 all are the teacher's argmax.
    res0 = speculative_kd_sample(student, teacher, prompts, SKDConfig(gamma=3, top_k=1, teacher_temperature=0.0), 12,
                                 generator=torch.Generator().manual_seed(0))
    for p, r in zip(prompts, res0.responses):
        seq = torch.cat([p, r])
        top1 = teacher.logits(teacher(seq[None]).hidden)[0].argmax(-1)  # (T,)
        assert torch.equal(top1[len(p) - 1 : -1], r)


def test_acceptance_counts_and_rate_between_extremes():
    student, teacher = _pair(scale=1.0)
    res = speculative_kd_sample(student, teacher, _prompts(), SKDConfig(gamma=5, top_k=25), 10,
                                generator=torch.Generator().manual_seed(1))
    assert 0.0 < res.acceptance_rate < 1.0
    assert all(len(r) == 10 for r in res.responses)
    assert res.accepted + res.replaced == 30


def test_eos_stops_a_row():
    student, teacher = _pair()
    for m in (student, teacher):
        m.logits = lambda h: torch.nn.functional.one_hot(torch.full(h.shape[:-1], 256), 258).float() * 30
    res = speculative_kd_sample(student, teacher, _prompts(), SKDConfig(gamma=3, top_k=5), 9, eos_id=256)
    assert [r.tolist() for r in res.responses] == [[256]] * 3


def test_k_equal_vocab_with_a_cache_policy_equals_sampling_with_the_deployed_cache():
    # The student proposes with its deployed (evicting) cache, the one generate() uses by default, and
    # K = V still consumes exactly the random draws of plain sampling (no restore is ever needed).
    from pikv_train.cache import CacheConfig, build_policy

    student, teacher = _pair()
    student.set_cache_policy(build_policy(CacheConfig(policy="streaming_llm", budget=6, n_sink=2), student.cfg))
    res = speculative_kd_sample(student, teacher, _prompts(), SKDConfig(gamma=4, top_k=258), 13,
                                generator=torch.Generator().manual_seed(3))
    assert res.acceptance_rate == 1.0
    ref = generate(student, _prompts(), 13, temperature=1.0, generator=torch.Generator().manual_seed(3))
    for i, r in enumerate(res.responses):
        assert torch.equal(r, ref.tokens[i, ref.prompt_len :]), i
