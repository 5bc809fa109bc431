"""Divergences (SPEC §5): golden values, gradients, padding, temperature, masking, reductions."""

import math

import pytest
import torch

from pikv_train.distill import (
    DIVERGENCES,
    forward_kl,
    jsd,
    reduce_tokens,
    reverse_kl,
    sequence_mean_weights,
    skew_kl,
    skew_reverse_kl,
    token_divergence,
    tvd,
)

F64 = torch.float64

# SKL with a detached mixture warns that it has no student gradient; that is tested explicitly.
pytestmark = pytest.mark.filterwarnings("ignore:skew_kl with detach_mixture")


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny tensors: intra-op threads only add contention on a shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

# (name, hyper-parameters) covering every divergence and both mixture-gradient conventions.
CASES = [
    ("fkl", {}),
    ("rkl", {}),
    ("tvd", {}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.1}),
    ("skl", {"alpha": 0.1, "detach_mixture": False}),
    ("skl", {"alpha": 0.3, "detach_mixture": True}),
    ("srkl", {"alpha": 0.1, "detach_mixture": False}),
    ("srkl", {"alpha": 0.3, "detach_mixture": True}),
]
CASE_IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in h.items())}" for n, h in CASES]


def _golden_logits():
    """TRL's inputs: teacher p = [0.9, 0.1], student q = [0.1, 0.9], logits = log-probs."""
    p = torch.tensor([0.9, 0.1], dtype=F64).log()
    q = torch.tensor([0.1, 0.9], dtype=F64).log()
    return q, p


# ------------------------------------------------------------------------------------------------
# Independent probability-space reference (float64). `q_mix` is the student inside the mixture,
# so passing a constant there realises the stop-gradient convention for finite differences.
# ------------------------------------------------------------------------------------------------
def _kl(a, b):
    return (a * (a.log() - b.log())).sum(-1)


def _reference(name, s, t, q_mix_logits=None, beta=0.5, alpha=0.1, detach_mixture=False):
    q, p = s.softmax(-1), t.softmax(-1)
    qm = q if q_mix_logits is None else q_mix_logits.softmax(-1)
    if name == "fkl":
        return _kl(p, q)
    if name == "rkl":
        return _kl(q, p)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "jsd":
        m = beta * p + (1 - beta) * qm
        return beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    if name == "skl":
        return _kl(p, alpha * p + (1 - alpha) * qm)
    if name == "srkl":
        return _kl(q, (1 - alpha) * p + alpha * qm)
    raise KeyError(name)


# ------------------------------------------------------------------------------------------------
# Golden values
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fn, kwargs, expected",
    [
        (forward_kl, {}, 1.757780),
        (reverse_kl, {}, 1.757780),
        (jsd, {"beta": 0.5}, 0.368064),
        (jsd, {"beta": 0.1}, 0.146311),
        (jsd, {"beta": 0.9}, 0.146311),
        (skew_kl, {"alpha": 0.1}, 1.238081),
        (skew_reverse_kl, {"alpha": 0.1}, 1.238081),
        (skew_kl, {"alpha": 0.2}, 0.917394),
        (skew_kl, {"alpha": 0.5}, 0.368064),
        (tvd, {}, 0.8),
    ],
)
def test_golden_values_float64(fn, kwargs, expected):
    q, p = _golden_logits()
    value = fn(student_logits=q, teacher_logits=p, **kwargs)
    assert value.dtype == F64
    assert abs(value.item() - expected) < 1e-6
    # Closed form FKL = RKL = 0.8 ln 9 pins the "true KL, not cross-entropy" convention.
    if fn in (forward_kl, reverse_kl):
        assert abs(value.item() - 0.8 * math.log(9)) < 1e-12


def test_golden_values_also_hold_for_detached_mixture():
    q, p = _golden_logits()
    for fn in (skew_kl, skew_reverse_kl):
        v = fn(student_logits=q, teacher_logits=p, alpha=0.1, detach_mixture=True)
        assert abs(v.item() - 1.238081) < 1e-6


def test_jsd_endpoints_are_exactly_fkl_and_rkl():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 4, 17, generator=g), torch.randn(3, 4, 17, generator=g)
    kw = dict(student_logits=s, teacher_logits=t)
    assert torch.equal(jsd(**kw, beta=0.0), forward_kl(**kw))
    assert torch.equal(jsd(**kw, beta=1.0), reverse_kl(**kw))
    # Skew endpoints reduce to the plain KLs (up to rounding of the log-space mixture).
    torch.testing.assert_close(skew_kl(**kw, alpha=0.0), forward_kl(**kw))
    torch.testing.assert_close(skew_reverse_kl(**kw, alpha=0.0), reverse_kl(**kw))
    assert skew_kl(**kw, alpha=1.0).abs().item() < 1e-6  # KL(p || p)


@pytest.mark.parametrize("name, hyper", CASES, ids=CASE_IDS)
def test_values_match_probability_space_reference(name, hyper):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 3, 7, generator=g, dtype=F64)
    t = torch.randn(2, 3, 7, generator=g, dtype=F64)
    got = token_divergence(name, s, t, **hyper)
    torch.testing.assert_close(got, _reference(name, s, t, **hyper), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Gradients vs float64 finite differences
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, hyper", CASES, ids=CASE_IDS)
def test_gradients_match_finite_differences(name, hyper):
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 3, 5, generator=g, dtype=F64, requires_grad=True)
    t = torch.randn(2, 3, 5, generator=g, dtype=F64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    fn = DIVERGENCES[name]
    if not hyper.get("detach_mixture", False):
        # Full gradient (student and teacher) of the function itself.
        assert torch.autograd.gradcheck(
            lambda s_, t_: fn(student_logits=s_, teacher_logits=t_, mask=mask, **hyper), (s, t)
        )
        return
    # Stop-gradient: the student inside the mixture is a constant at the evaluation point, so the
    # gradient must equal the finite-difference gradient of the reference with that constant.
    hyper_ref = {k: v for k, v in hyper.items() if k != "detach_mixture"}
    s0, t0 = s.detach().clone(), t.detach()
    loss = fn(student_logits=s, teacher_logits=t0, mask=mask, **hyper)
    (grad,) = torch.autograd.grad(loss, s)

    def ref(s_):
        vals = _reference(name, s_, t0, q_mix_logits=s0, **hyper_ref)
        return vals[mask].mean()

    fd = torch.zeros_like(s0)
    eps = 1e-6
    for i in range(s0.numel()):
        d = torch.zeros(s0.numel(), dtype=F64)
        d[i] = eps
        d = d.view_as(s0)
        fd.view(-1)[i] = (ref(s0 + d) - ref(s0 - d)) / (2 * eps)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-8)
    # And the reference itself is correct in autograd terms.
    assert torch.autograd.gradcheck(ref, (s0.clone().requires_grad_(),))


@pytest.mark.parametrize("name", ["skl", "srkl"])
def test_detach_mixture_changes_the_gradient(name):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(4, 9, generator=g, dtype=F64, requires_grad=True)
    t = torch.randn(4, 9, generator=g, dtype=F64)
    fn = DIVERGENCES[name]
    grads = {}
    for det in (False, True):
        value = fn(student_logits=s, teacher_logits=t, alpha=0.1, detach_mixture=det)
        (grads[det],) = torch.autograd.grad(value, s)
        grads[(det, "v")] = value.detach()
    assert torch.equal(grads[(False, "v")], grads[(True, "v")])  # same value ...
    assert (grads[False] - grads[True]).abs().max() > 1e-3  # ... different gradient
    if name == "skl":  # the student only appears inside SKL's mixture
        assert grads[True].abs().max() == 0


def test_skl_detached_mixture_warns():
    s, t = torch.randn(2, 5, requires_grad=True), torch.randn(2, 5)
    with pytest.warns(UserWarning, match="zero gradient"):
        skew_kl(student_logits=s, teacher_logits=t, detach_mixture=True).backward()


# ------------------------------------------------------------------------------------------------
# Padded (-inf) vocabulary columns
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, hyper", CASES, ids=CASE_IDS)
def test_neg_inf_columns_contribute_nothing_and_stay_finite(name, hyper):
    g = torch.Generator().manual_seed(4)
    s = torch.randn(3, 8, generator=g, dtype=F64)
    t = torch.randn(3, 8, generator=g, dtype=F64)
    expected = token_divergence(name, s[:, :6], t[:, :6], **hyper)
    # Columns 6-7: -inf in both (padding). Column 6 of row 0 becomes finite-but-negligible in the
    # student only (-60: its probability is effectively zero).
    s_pad, t_pad = s.clone(), t.clone()
    s_pad[:, 6:] = float("-inf")
    t_pad[:, 6:] = float("-inf")
    s_pad[0, 6] = -60.0
    t_pad[1, 7] = -60.0  # and the mirror case: finite-but-negligible in the teacher only
    s_pad.requires_grad_(True)
    t_pad.requires_grad_(True)
    got = token_divergence(name, s_pad, t_pad, **hyper)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    gs, gt = torch.autograd.grad(got.sum(), (s_pad, t_pad))
    assert torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert gs[1:, 6:].abs().max() < 1e-20 and gt[:, 6:].abs().max() < 1e-20


def test_neg_inf_columns_fp32_reduced_functions():
    s = torch.randn(2, 5, 10)
    t = torch.randn(2, 5, 10)
    s[..., -3:] = float("-inf")
    t[..., -3:] = float("-inf")
    s.requires_grad_(True)
    for name, hyper in CASES:
        value = DIVERGENCES[name](student_logits=s, teacher_logits=t, **hyper)
        (grad,) = torch.autograd.grad(value, s)
        assert torch.isfinite(value) and torch.isfinite(grad).all(), name


# ------------------------------------------------------------------------------------------------
# Temperature, T² scaling, dtype
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, hyper", CASES[:6], ids=CASE_IDS[:6])
def test_temperature_divides_both_logit_sets(name, hyper):
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(4, 11, generator=g, dtype=F64), torch.randn(4, 11, generator=g, dtype=F64)
    fn = DIVERGENCES[name]
    tempered = fn(student_logits=s, teacher_logits=t, temperature=2.0, **hyper)
    manual = fn(student_logits=s / 2.0, teacher_logits=t / 2.0, **hyper)
    torch.testing.assert_close(tempered, manual)
    scaled = fn(student_logits=s, teacher_logits=t, temperature=2.0, t2_scale=True, **hyper)
    torch.testing.assert_close(scaled, 4.0 * manual)
    # T = 1: the flag changes nothing.
    plain = fn(student_logits=s, teacher_logits=t, **hyper)
    unit = fn(student_logits=s, teacher_logits=t, t2_scale=True, **hyper)
    torch.testing.assert_close(unit, plain)


def test_half_precision_inputs_are_computed_in_fp32():
    s = torch.randn(3, 16).bfloat16()
    t = torch.randn(3, 16).bfloat16()
    value = forward_kl(student_logits=s, teacher_logits=t)
    assert value.dtype == torch.float32
    expected = forward_kl(student_logits=s.float(), teacher_logits=t.float())
    torch.testing.assert_close(value, expected)


# ------------------------------------------------------------------------------------------------
# Masking and reductions
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, hyper", CASES, ids=CASE_IDS)
def test_masked_positions_contribute_nothing(name, hyper):
    g = torch.Generator().manual_seed(6)
    s = torch.randn(2, 5, 7, generator=g)
    t = torch.randn(2, 5, 7, generator=g)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    s_garbage = torch.where(mask[..., None], s, 1e4 * torch.randn(2, 5, 7, generator=g))
    s_garbage.requires_grad_(True)
    fn = DIVERGENCES[name]
    value = fn(student_logits=s_garbage, teacher_logits=t, mask=mask, **hyper)
    expected = fn(student_logits=s[mask], teacher_logits=t[mask], **hyper)
    torch.testing.assert_close(value, expected)
    (grad,) = torch.autograd.grad(value, s_garbage)
    assert grad[~mask].abs().max() == 0
    none = fn(student_logits=s_garbage, teacher_logits=t, mask=mask, reduction="none", **hyper)
    assert none.shape == (2, 5) and none[~mask].abs().max() == 0
    float_mask = fn(student_logits=s_garbage, teacher_logits=t, mask=mask.float(), **hyper)
    torch.testing.assert_close(float_mask, value)


def test_all_masked_gives_zero_without_nan():
    s = torch.randn(2, 3, 6, requires_grad=True)
    t = torch.randn(2, 3, 6)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    for red in ("mean", "sum", "sequence_mean"):
        for name, hyper in CASES:
            value = DIVERGENCES[name](
                student_logits=s, teacher_logits=t, mask=mask, reduction=red, **hyper
            )
            (grad,) = torch.autograd.grad(value, s)
            assert value.item() == 0.0 and torch.isfinite(grad).all() and grad.abs().max() == 0


def test_reduction_golden_token_mean_vs_sequence_mean():
    # Per-token values {1,1,1,1} (sequence 1) and {3} (sequence 2), the rest padding.
    values = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    assert reduce_tokens(values, mask, "mean").item() == pytest.approx(1.4, abs=1e-7)
    assert reduce_tokens(values, mask, "sequence_mean").item() == pytest.approx(2.0, abs=1e-7)
    assert reduce_tokens(values, mask, "sum").item() == pytest.approx(7.0, abs=1e-7)
    assert torch.equal(reduce_tokens(values, mask, "none"), values * mask)
    # A fully masked sequence does not count towards the sequence mean.
    values3 = torch.cat([values, torch.full((1, 4), 5.0)])
    mask3 = torch.cat([mask, torch.zeros(1, 4, dtype=torch.bool)])
    assert reduce_tokens(values3, mask3, "sequence_mean").item() == pytest.approx(2.0, abs=1e-7)
    # Weighted sum with sequence_mean_weights realises the same sequence mean on flat tokens.
    w = sequence_mean_weights(mask3)
    assert reduce_tokens(values3.flatten(), w.flatten(), "sum").item() == pytest.approx(2.0)
    with pytest.raises(ValueError):
        reduce_tokens(values, mask, "batchmean")


def test_sequence_mean_through_public_function():
    g = torch.Generator().manual_seed(7)
    s, t = torch.randn(3, 4, 9, generator=g), torch.randn(3, 4, 9, generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    per_tok = forward_kl(student_logits=s, teacher_logits=t, reduction="none")
    expected = (per_tok[0].mean() + per_tok[1, 0]) / 2
    got = forward_kl(student_logits=s, teacher_logits=t, mask=mask, reduction="sequence_mean")
    torch.testing.assert_close(got, expected)


def test_registry_matches_public_functions_and_aliases():
    g = torch.Generator().manual_seed(8)
    s, t = torch.randn(5, 12, generator=g), torch.randn(5, 12, generator=g)
    assert set(DIVERGENCES) == {"fkl", "rkl", "jsd", "tvd", "skl", "srkl"}
    for name, hyper in CASES:
        per_tok = token_divergence(name, s, t, temperature=1.5, **hyper)
        assert per_tok.shape == (5,)
        reduced = DIVERGENCES[name](
            student_logits=s, teacher_logits=t, temperature=1.5, reduction="none", **hyper
        )
        torch.testing.assert_close(per_tok, reduced)
    torch.testing.assert_close(token_divergence("forward_kl", s, t), token_divergence("fkl", s, t))
    torch.testing.assert_close(
        token_divergence("skew_reverse_kl", s, t), token_divergence("srkl", s, t)
    )
    with pytest.raises(KeyError):
        token_divergence("nope", s, t)
    with pytest.raises(ValueError):
        token_divergence("fkl", s, t[:, :5])
