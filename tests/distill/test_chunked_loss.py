"""Chunked fused LM-head losses equal their unchunked counterparts (SPEC §5 "Chunked loss")."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rel

from pikv_train.distill import (
    DIVERGENCES,
    chunked_cross_entropy,
    chunked_distill_loss,
    sequence_mean_weights,
)
from pikv_train.models.head import LogitHead

pytestmark = pytest.mark.filterwarnings("ignore:skew_kl with detach_mixture")


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny tensors: intra-op threads only add contention on a shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

TOL = dict(rtol=1e-5, atol=1e-5)
D_S, D_T, V = 6, 5, 11

CASES = [
    ("fkl", {}),
    ("rkl", {}),
    ("tvd", {}),
    ("jsd", {"beta": 0.3}),
    ("skl", {"alpha": 0.1, "detach_mixture": False}),
    ("skl", {"alpha": 0.1, "detach_mixture": True}),
    ("srkl", {"alpha": 0.1, "detach_mixture": False}),
    ("srkl", {"alpha": 0.2, "detach_mixture": True}),
]
CASE_IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in h.items())}" for n, h in CASES]


def _inputs(n, seed=0, v_s=V, v_t=V, mask_p=0.7):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, D_S, generator=g)
    w = torch.randn(v_s, D_S, generator=g) / D_S**0.5
    th = torch.randn(n, D_T, generator=g)
    tw = torch.randn(v_t, D_T, generator=g) / D_T**0.5
    mask = torch.rand(n, generator=g) < mask_p
    return h, w, th, tw, mask


def _leaves(h, w):
    return h.clone().requires_grad_(True), w.clone().requires_grad_(True)


def _plain(name, h, w, th, tw, mask, vocab_size=None, reduction="mean", **kw):
    """Unchunked reference: full (N, V) logits then the pure divergence."""
    vs = vocab_size or w.shape[0]
    s_logits = (h @ w.t())[:, :vs]  # (N, V)
    t_logits = (th @ tw.t())[:, :vs]  # (N, V)
    return DIVERGENCES[name](
        student_logits=s_logits, teacher_logits=t_logits, mask=mask, reduction=reduction, **kw
    )


def _value_and_grads(loss, h, w):
    gh, gw = torch.autograd.grad(loss, (h, w))
    return loss.detach(), gh, gw


@pytest.mark.parametrize("name, hyper", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("n, chunk", [(37, 8), (1, 4), (16, 4)], ids=["n37c8", "n1", "n16c4"])
def test_chunked_equals_unchunked(name, hyper, n, chunk):
    h, w, th, tw, mask = _inputs(n, seed=n)
    mask[0] = True  # at least one token
    kw = dict(temperature=1.3, **hyper)
    h1, w1 = _leaves(h, w)
    ref = _value_and_grads(_plain(name, h1, w1, th, tw, mask, **kw), h1, w1)
    h2, w2 = _leaves(h, w)
    loss = chunked_distill_loss(h2, w2, th, tw, mask=mask, divergence=name, chunk_size=chunk, **kw)
    got = _value_and_grads(loss, h2, w2)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("name, hyper", CASES, ids=CASE_IDS)
def test_vocab_slicing_sum_reduction_and_no_mask(name, hyper):
    # Student head padded to 13 rows, teacher to 15; only the first 11 columns are real.
    h, w, th, tw, _ = _inputs(10, seed=3, v_s=13, v_t=15)
    kw = dict(temperature=2.0, t2_scale=True, reduction="sum", **hyper)
    h1, w1 = _leaves(h, w)
    ref = _value_and_grads(_plain(name, h1, w1, th, tw, None, vocab_size=11, **kw), h1, w1)
    h2, w2 = _leaves(h, w)
    loss = chunked_distill_loss(
        h2, w2, th, tw, divergence=name, chunk_size=3, vocab_size=11, **kw
    )
    got = _value_and_grads(loss, h2, w2)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, **TOL)
    assert got[2][11:].abs().max() == 0  # padded head rows get no gradient


@pytest.mark.parametrize("name", ["fkl", "srkl"])
def test_all_masked_and_empty_give_zero_loss_and_zero_grads(name):
    for n, mask in [(9, torch.zeros(9, dtype=torch.bool)), (0, None)]:
        h, w, th, tw, _ = _inputs(n, seed=5)
        h, w = _leaves(h, w)
        loss = chunked_distill_loss(h, w, th, tw, mask=mask, divergence=name, chunk_size=4)
        loss.backward()
        assert loss.item() == 0.0
        assert h.grad.shape == h.shape and w.grad.shape == w.shape
        assert torch.all(h.grad == 0) and torch.all(w.grad == 0)


def test_precomputed_teacher_logits_path():
    h, w, th, tw, mask = _inputs(20, seed=6, v_t=14)
    t_logits = th @ tw.t()  # (N, 14)
    h1, w1 = _leaves(h, w)
    a = chunked_distill_loss(h1, w1, th, tw, mask=mask, divergence="jsd", beta=0.5, vocab_size=V)
    h2, w2 = _leaves(h, w)
    b = chunked_distill_loss(
        h2, w2, teacher_logits=t_logits, mask=mask, divergence="jsd", beta=0.5, vocab_size=V,
        chunk_size=7,
    )
    for x, y in zip(_value_and_grads(a, h1, w1), _value_and_grads(b, h2, w2)):
        torch.testing.assert_close(x, y, **TOL)


def _transforming_head(tw):
    """A teacher head with everything a family may add after the projection; the cap visibly bends."""
    bias = torch.randn(tw.shape[0], generator=torch.Generator().manual_seed(1))
    return LogitHead(3.0 * tw, bias, scale=0.7, softcap=1.5)


@pytest.mark.parametrize("name, hyper", CASES[:4], ids=CASE_IDS[:4])
def test_teacher_head_with_bias_scale_and_softcap_equals_dense(name, hyper):
    # Teacher head padded to 15 rows; only the first 11 columns are compared.
    h, w, th, tw, mask = _inputs(23, seed=15, v_t=15)
    head = _transforming_head(tw)
    raw = th @ head.weight.t() + head.bias
    assert float((raw * head.scale).abs().max()) > 2 * head.softcap  # the cap is active
    h1, w1 = _leaves(h, w)
    ref = DIVERGENCES[name](
        student_logits=h1 @ w1.t(), teacher_logits=head(th)[:, :V], mask=mask, temperature=1.3, **hyper
    )
    ref = _value_and_grads(ref, h1, w1)
    h2, w2 = _leaves(h, w)
    loss = chunked_distill_loss(
        h2, w2, th, teacher_head=head, mask=mask, divergence=name, chunk_size=4, vocab_size=V, temperature=1.3,
        **hyper,
    )
    for a, b in zip(_value_and_grads(loss, h2, w2), ref):
        assert_close_rel(a, b, 1e-5)


def test_teacher_head_never_builds_all_teacher_logits():
    n, chunk = 300, 16
    h, w, th, tw, mask = _inputs(n, seed=16)
    rows = []

    class RecordingHead(LogitHead):
        def __call__(self, hidden, vocab=None):
            rows.append(hidden.shape[0])
            return super().__call__(hidden, vocab)

    head = _transforming_head(tw)
    rec = RecordingHead(head.weight, head.bias, head.scale, head.softcap)
    h1, w1 = _leaves(h, w)
    chunked_distill_loss(h1, w1, th, teacher_head=rec, mask=mask, chunk_size=chunk).backward()
    assert max(rows) <= chunk and sum(rows) == int(mask.sum())  # one chunk of teacher logits at a time
    h2, w2 = _leaves(h, w)
    chunked_distill_loss(h2, w2, th, teacher_head=head, mask=mask, chunk_size=n).backward()
    assert_close_rel(h1.grad, h2.grad, 1e-5)


def test_teacher_weight_is_a_plain_head_and_sources_are_exclusive():
    h, w, th, tw, mask = _inputs(12, seed=17)
    a = chunked_distill_loss(h, w, th, tw, mask=mask, chunk_size=5)
    b = chunked_distill_loss(h, w, th, teacher_head=LogitHead(tw), mask=mask, chunk_size=5)
    assert_close_rel(a, b, 1e-6)
    with pytest.raises(ValueError, match="exactly one teacher source"):
        chunked_distill_loss(h, w, th, tw, teacher_head=LogitHead(tw))
    with pytest.raises(ValueError, match="disagree on d_t"):
        chunked_distill_loss(h, w, th, teacher_head=LogitHead(torch.randn(V, D_T + 1)))
    with pytest.raises(ValueError, match="teacher_hidden is missing"):
        chunked_distill_loss(h, w, teacher_head=LogitHead(tw))


def test_teacher_receives_no_gradient():
    h, w, th, tw, mask = _inputs(8, seed=7)
    h, w = _leaves(h, w)
    th.requires_grad_(True)
    tw.requires_grad_(True)
    chunked_distill_loss(h, w, th, tw, mask=mask, chunk_size=3).backward()
    assert th.grad is None and tw.grad is None and h.grad is not None


def test_grad_output_scaling_frozen_head_and_no_grad_mode():
    h, w, th, tw, mask = _inputs(12, seed=8)
    h1, w1 = _leaves(h, w)
    (3.0 * chunked_distill_loss(h1, w1, th, tw, mask=mask, chunk_size=5)).backward()
    h2, w2 = _leaves(h, w)
    chunked_distill_loss(h2, w2, th, tw, mask=mask, chunk_size=5).backward()
    torch.testing.assert_close(h1.grad, 3.0 * h2.grad)
    torch.testing.assert_close(w1.grad, 3.0 * w2.grad)
    # Frozen LM head: only the hidden states get a gradient.
    h3 = h.clone().requires_grad_(True)
    chunked_distill_loss(h3, w, th, tw, mask=mask, chunk_size=5).backward()
    torch.testing.assert_close(h3.grad, h2.grad)
    # Validation under no_grad computes the value only.
    with torch.no_grad():
        v = chunked_distill_loss(h1, w1, th, tw, mask=mask, chunk_size=5)
    torch.testing.assert_close(v, _plain("fkl", h, w, th, tw, mask), **TOL)
    assert not v.requires_grad


def test_float_mask_as_sequence_mean_weights():
    b, t = 3, 5
    h, w, th, tw, _ = _inputs(b * t, seed=9)
    mask = torch.tensor([[1, 1, 1, 1, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    h1, w1 = _leaves(h, w)
    s_logits = (h1 @ w1.t()).view(b, t, V)
    t_logits = (th @ tw.t()).view(b, t, V)
    ref = DIVERGENCES["skl"](
        student_logits=s_logits, teacher_logits=t_logits, mask=mask, reduction="sequence_mean"
    )
    ref = _value_and_grads(ref, h1, w1)
    h2, w2 = _leaves(h, w)
    weights = sequence_mean_weights(mask).flatten()  # (B*T,)
    loss = chunked_distill_loss(
        h2, w2, th, tw, mask=weights, divergence="skl", reduction="sum", chunk_size=4
    )
    for a, c in zip(_value_and_grads(loss, h2, w2), ref):
        torch.testing.assert_close(a, c, **TOL)


@pytest.mark.parametrize("name", ["fkl", "srkl"])
def test_gradient_accumulation_with_sum_over_global_count(name):
    h, w, th, tw, mask = _inputs(40, seed=10)
    kw = dict(divergence=name, chunk_size=4)
    h1, w1 = _leaves(h, w)
    chunked_distill_loss(h1, w1, th, tw, mask=mask, reduction="mean", **kw).backward()
    # Four micro-batches of unequal token counts; each divides its sum by the global count.
    h2, w2 = _leaves(h, w)
    total = mask.sum()
    for sl in (slice(0, 7), slice(7, 20), slice(20, 21), slice(21, 40)):
        part = chunked_distill_loss(
            h2[sl], w2, th[sl], tw, mask=mask[sl], reduction="sum", **kw
        )
        (part / total).backward()
    torch.testing.assert_close(h2.grad, h1.grad, **TOL)
    torch.testing.assert_close(w2.grad, w1.grad, **TOL)


def test_chunked_cross_entropy_equals_torch():
    h, w, _, _, mask = _inputs(23, seed=11)
    targets = torch.randint(0, V, (23,), generator=torch.Generator().manual_seed(0))
    targets[3] = -100
    for reduction in ("mean", "sum"):
        h1, w1 = _leaves(h, w)
        ref = F.cross_entropy(h1 @ w1.t(), targets, reduction=reduction)
        ref = _value_and_grads(ref, h1, w1)
        h2, w2 = _leaves(h, w)
        got = chunked_cross_entropy(h2, w2, targets, chunk_size=5, reduction=reduction)
        for a, b in zip(_value_and_grads(got, h2, w2), ref):
            torch.testing.assert_close(a, b, **TOL)
    # With a mask: equals torch on the kept rows.
    h1, w1 = _leaves(h, w)
    ref = _value_and_grads(F.cross_entropy(h1[mask] @ w1.t(), targets[mask]), h1, w1)
    h2, w2 = _leaves(h, w)
    got = chunked_cross_entropy(h2, w2, targets, mask=mask, chunk_size=4)
    for a, b in zip(_value_and_grads(got, h2, w2), ref):
        torch.testing.assert_close(a, b, **TOL)


def test_combined_kd_ce_and_agreement_in_one_pass():
    h, w, th, tw, mask = _inputs(30, seed=12)
    targets = torch.randint(0, V, (30,), generator=torch.Generator().manual_seed(1))
    targets[mask.nonzero()[0]] = -100  # one KD token without a CE label
    h1, w1 = _leaves(h, w)
    s_logits, t_logits = h1 @ w1.t(), th @ tw.t()
    kd_ref = DIVERGENCES["rkl"](student_logits=s_logits, teacher_logits=t_logits, mask=mask)
    ce_ref = F.cross_entropy(s_logits[mask], targets[mask])
    ref = _value_and_grads(0.7 * kd_ref + 0.25 * ce_ref, h1, w1)
    agree_ref = (s_logits.argmax(-1) == t_logits.argmax(-1))[mask].sum()

    h2, w2 = _leaves(h, w)
    loss, parts = chunked_distill_loss(
        h2, w2, th, tw, mask=mask, divergence="rkl", chunk_size=7, targets=targets,
        kd_weight=0.7, ce_weight=0.25, return_parts=True,
    )
    for a, b in zip(_value_and_grads(loss, h2, w2), ref):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(parts["kd"], kd_ref.detach(), **TOL)
    torch.testing.assert_close(parts["ce"], ce_ref.detach(), **TOL)
    assert parts["top1_agree"].item() == agree_ref.item()
    assert parts["n_tokens"].item() == mask.sum().item()
    assert not any(p.requires_grad for p in parts.values())


def test_half_precision_inputs_accumulate_in_fp32():
    h, w, th, tw, mask = _inputs(16, seed=13)
    hb, wb = h.bfloat16().requires_grad_(True), w.bfloat16().requires_grad_(True)
    loss = chunked_distill_loss(hb, wb, th.bfloat16(), tw.bfloat16(), mask=mask, chunk_size=5)
    loss.backward()
    assert loss.dtype == torch.float32 and hb.grad.dtype == torch.bfloat16
    assert wb.grad.dtype == torch.bfloat16
    ref = _plain("fkl", hb.detach(), wb.detach(), th.bfloat16(), tw.bfloat16(), mask)
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-2, atol=1e-2)


def test_input_validation():
    h, w, th, tw, mask = _inputs(6, seed=14, v_t=12)
    with pytest.raises(ValueError, match="vocab"):
        chunked_distill_loss(h, w, th, tw)
    with pytest.raises(ValueError, match="reduction"):
        chunked_distill_loss(h, w, th, tw, vocab_size=V, reduction="none")
    with pytest.raises(ValueError, match="teacher"):
        chunked_distill_loss(h, w)
    with pytest.raises(KeyError):
        chunked_distill_loss(h, w, th, tw, vocab_size=V, divergence="nope")
