"""Speculative KD sampler: its defining behaviour on tiny models."""

from __future__ import annotations

import torch

from functools import partial

from pikv_train.distill.skd import SKDConfig as _SKDConfig, speculative_kd_sample

# Plain sampling (T = 1, no nucleus) unless a test says otherwise: the published defaults are checked below.
SKDConfig = partial(_SKDConfig, student_temperature=1.0, student_top_p=1.0, teacher_temperature=1.0, teacher_top_p=1.0)
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


# ------------------------------------------------------------------------ at the position limit (issue 11)
def _record_positions(model, seen: list[int]):
    plain = model.forward

    def forward(ids, *, positions=None, cache=None, **kw):
        if positions is not None:
            seen.append(int(positions.max()))
        return plain(ids, positions=positions, cache=cache, **kw)

    model.forward = forward
    return model


def _at_limit_pair(max_new: int):
    # Both models have exactly prompt + max_new_tokens positions: the preflight check accepts this.
    torch.manual_seed(0)
    limit = 8 + max_new
    student = _sharpen(Decoder(ModelConfig.preset("nano-moe", max_seq_len=limit)).eval())
    teacher = _sharpen(Decoder(ModelConfig.preset("nano", n_layer=3, max_seq_len=limit)).eval())
    return student, teacher, limit


def _limit_prompts():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 256, (n,), generator=g) for n in (8, 5, 8, 2)]


def test_accept_all_rows_stop_at_the_position_limit():
    max_new = 11  # not a multiple of gamma: the last round is truncated
    student, teacher, limit = _at_limit_pair(max_new)
    seen_s, seen_t = [], []
    _record_positions(student, seen_s), _record_positions(teacher, seen_t)
    res = speculative_kd_sample(student, teacher, _limit_prompts(), SKDConfig(gamma=5, top_k=258), max_new,
                                generator=torch.Generator().manual_seed(0))
    assert [len(r) for r in res.responses] == [max_new] * 4
    assert res.acceptance_rate == 1.0 and res.proposed == 4 * max_new  # no proposal beyond a row's room
    assert max(seen_s) <= limit - 1 and max(seen_t) <= limit - 1


def test_reject_all_rows_stop_at_the_position_limit_and_finished_rows_stop_advancing():
    max_new = 9
    student, teacher, limit = _at_limit_pair(max_new)
    plain_s = student.logits
    student.logits = lambda h: plain_s(h).index_fill(-1, torch.tensor([7, 256]), float("-inf"))  # never 7 or EOS
    # The teacher's top-1 is always 7 (which the student never proposes), except EOS (256) at position 11.
    eos_at = 11

    def teacher_logits(h):
        out = torch.zeros(*h.shape[:-1], 258)
        out[..., 7] = 30.0
        return out

    teacher.logits = teacher_logits
    seen_s, seen_t = [], []
    _record_positions(student, seen_s), _record_positions(teacher, seen_t)
    res = speculative_kd_sample(student, teacher, _limit_prompts(), SKDConfig(gamma=4, top_k=1, teacher_temperature=0.0),
                                max_new, generator=torch.Generator().manual_seed(0))
    assert res.accepted == 0 and res.replaced == 4 * max_new
    assert all(r.tolist() == [7] * max_new for r in res.responses)
    assert max(seen_s) <= limit - 1 and max(seen_t) <= limit - 1
    # Rows that finish early (EOS) stop advancing while the others go on: the teacher's top-1 is EOS when
    # fed position 10, so rows with prompts of 8, 5, 8 and 2 tokens end after 3, 6, 3 and 9 tokens.
    fed = []
    plain_forward = teacher.forward

    def forward(ids, *, positions=None, cache=None, **kw):
        fed.append(positions)
        return plain_forward(ids, positions=positions, cache=cache, **kw)

    def eos_at_10(h):
        out = teacher_logits(h)
        out[..., 256] = torch.where(fed[-1] == 10, 40.0, 0.0)  # (B, T) positions of this forward
        return out

    teacher.forward, teacher.logits = forward, eos_at_10
    prompts = _limit_prompts()
    res = speculative_kd_sample(student, teacher, prompts, SKDConfig(gamma=4, top_k=1, teacher_temperature=0.0),
                                max_new, eos_id=256, generator=torch.Generator().manual_seed(0))
    assert [r.tolist() for r in res.responses] == [[7] * 3 + [256], [7] * 6 + [256], [7] * 3 + [256], [7] * 9]
    for i, (p, r) in enumerate(zip(prompts, res.responses)):
        # Each round adds one token (all rejected); the last round fed at most gamma slots from the last `cur`.
        row_max = max(int(pos[i].max()) for pos in fed)
        assert row_max <= len(p) - 1 + len(r) - 1 + 3, (i, row_max)


def test_padded_vocabulary_is_never_proposed_sampled_or_accepted():
    torch.manual_seed(0)
    student = Decoder(ModelConfig.preset("nano-moe", vocab_size=300)).eval()
    teacher = Decoder(ModelConfig.preset("nano", vocab_size=300)).eval()
    for m in (student, teacher):  # both heads favour the padded ids 258..299 heavily
        plain = m.logits
        m.logits = lambda h, plain=plain: plain(h) + torch.cat([torch.zeros(258), torch.full((42,), 20.0)])
    prompts = _prompts()
    res = speculative_kd_sample(student, teacher, prompts, SKDConfig(gamma=3, top_k=5), 8, vocab_size=258,
                                generator=torch.Generator().manual_seed(0))
    assert all(int(r.max()) < 258 for r in res.responses)
    gen = generate(student, prompts, 8, vocab_size=258, generator=torch.Generator().manual_seed(0))
    assert int(gen.tokens[gen.generated].max()) < 258
    # Without the limit the padded ids are what gets sampled: the test would catch a missing mask.
    gen = generate(student, prompts, 8, generator=torch.Generator().manual_seed(0))
    assert int(gen.tokens[gen.generated].max()) >= 258


def test_defaults_are_the_skd_repository_training_config():
    cfg = _SKDConfig()
    assert (cfg.gamma, cfg.top_k, cfg.student_temperature, cfg.student_top_p, cfg.teacher_temperature,
            cfg.teacher_top_p) == (5, 25, 0.5, 0.5, 0.2, 0.5)
