"""Each router's defining rule on hand-made logits (x = identity rows, gate.weight = logits^T)."""

from __future__ import annotations

import math

import pytest
import torch

from pikv_train.routing import (
    ROUTERS,
    AdaptiveRouter,
    BaseRouter,
    EPLBRouter,
    HierarchicalRouter,
    PiKVRouter,
    RouterConfig,
    TopKBalancedRouter,
    apply_capacity,
    build_router,
)


def make(cls, logits, **cfg):
    """Router whose logits on x = eye(N) are exactly ``logits`` (N, E); returns (router, x)."""
    logits = torch.as_tensor(logits, dtype=torch.float32)
    n, e = logits.shape
    r = cls(n, e, RouterConfig(**cfg))
    with torch.no_grad():
        r.gate.weight.copy_(logits.t())
    return r, torch.eye(n)


def log_rows(*rows):
    """Logits whose softmax is each row normalised (rows of positive values)."""
    return torch.tensor(rows, dtype=torch.float64).log().float()


# ---------------------------------------------------------------- Base / TopKBalanced


def test_base_topk_and_weights():
    r, x = make(BaseRouter, log_rows([0.1, 0.5, 0.15, 0.25]), top_k=2)
    out = r(x)
    assert out.ids.tolist() == [[1, 3]]
    torch.testing.assert_close(out.weights, torch.tensor([[0.5 / 0.75, 0.25 / 0.75]]))
    assert out.valid.all() and out.loss.item() == 0.0
    r.cfg.normalize_weights = False
    torch.testing.assert_close(r(x).weights, torch.tensor([[0.5, 0.25]]))


def test_switch_and_z_loss_hand_computed():
    p0, p1 = [0.4, 0.3, 0.2, 0.1], [0.1, 0.3, 0.2, 0.4]
    logits = log_rows(p0, p1) + torch.tensor([[1.0], [2.0]])  # logsumexp = 1 and 2
    r, x = make(TopKBalancedRouter, logits, top_k=2, aux_loss_weight=1e-2, z_loss_weight=1e-3)
    out = r(x)
    assert [sorted(t) for t in out.ids.tolist()] == [[0, 1], [1, 3]]
    assert out.counts.tolist() == [1.0, 2.0, 0.0, 1.0]
    # f = [.25, .5, 0, .25], P = [.25, .3, .2, .25] -> E * sum f P = 4 * (.0625 + .15 + 0 + .0625) = 1.1
    torch.testing.assert_close(out.losses["aux"], torch.tensor(1e-2 * 1.1))
    torch.testing.assert_close(out.losses["z"], torch.tensor(1e-3 * (1 + 4) / 2))
    torch.testing.assert_close(out.loss, torch.tensor(1e-2 * 1.1 + 1e-3 * 2.5))


def test_apply_capacity_both_policies():
    ids = torch.tensor([[0, 1], [1, 0]])
    valid = torch.ones(2, 2, dtype=torch.bool)
    weights = torch.tensor([[0.6, 0.4], [0.3, 0.7]])
    probs = torch.tensor([[0.3, 0.2], [0.1, 0.4]])  # pre-normalisation probabilities of the chosen experts
    # position, token-major: t0 takes e0 and e1 (both its slots), so both of t1's assignments drop.
    keep, w = apply_capacity(ids, valid, weights, 2, 1, "position")
    assert keep.tolist() == [[True, True], [False, False]]
    torch.testing.assert_close(w, torch.tensor([[0.6, 0.4], [0.0, 0.0]]))
    # probability (online top-1): t0 is first on both queues; t1 keeps e0 (.4 > .3), drops e1 (.1 < .2).
    keep, w = apply_capacity(ids, valid, weights, 2, 1, "probability", priority=probs)
    assert keep.tolist() == [[True, True], [False, True]]
    # it ranks by the probabilities, not by the renormalised weights (which would give t1 both: .7 > .6, ...)
    keep, _ = apply_capacity(ids, valid, weights, 2, 1, "probability", priority=torch.tensor([[0.3, 0.2], [0.1, 0.1]]))
    assert keep.tolist() == [[True, True], [False, False]]
    # invalid slots never take capacity
    keep, _ = apply_capacity(ids, torch.tensor([[False, True], [True, True]]), weights, 2, 1, "position")
    assert keep.tolist() == [[False, True], [False, True]]
    with pytest.raises(ValueError, match="drop_policy"):
        apply_capacity(ids, valid, weights, 2, 1, "random")
    with pytest.raises(ValueError, match="probabilities"):
        apply_capacity(ids, valid, weights, 2, 1, "probability")


def test_capacity_is_token_major_not_slot_major():
    # Issue 10: slot-major queues dropped t0's 2nd choice (e1) because of t1's 1st choice; token-major
    # keeps it whatever t1 does.
    valid, w = torch.ones(2, 2, dtype=torch.bool), torch.ones(2, 2)
    for later in ([1, 2], [2, 1]):
        keep, _ = apply_capacity(torch.tensor([[0, 1], later]), valid, w, 3, 1, "position")
        assert keep[0].tolist() == [True, True]


def test_capacity_is_per_sequence():
    # Two sequences of 2 tokens, all on expert 0, C = 1: each sequence keeps its first token.
    ids = torch.zeros(4, 1, dtype=torch.long)
    valid, w = torch.ones(4, 1, dtype=torch.bool), torch.ones(4, 1)
    keep, _ = apply_capacity(ids, valid, w, 2, 1, "position", n_seq=2)
    assert keep[:, 0].tolist() == [True, False, True, False]
    # Left padding (position -1) holds no place and is never dropped.
    pos = torch.tensor([[-1, 0], [0, 1]])
    keep, _ = apply_capacity(ids, valid, w, 2, 1, "position", n_seq=2, positions=pos)
    assert keep[:, 0].tolist() == [True, True, True, False]


def test_probability_capacity_online_top_c():
    # One queue (expert 0) with C = 2: kept iff fewer than 2 earlier assignments are at least as probable.
    p = torch.tensor([0.5, 0.3, 0.4, 0.2, 0.6, 0.55, 0.55])[:, None]
    ids, valid = torch.zeros(7, 1, dtype=torch.long), torch.ones(7, 1, dtype=torch.bool)
    keep, _ = apply_capacity(ids, valid, torch.ones(7, 1), 1, 2, "probability", priority=p)
    # .5 .3 kept (first two); .4 (beats .3) kept; .2 dropped (.5, .3, .4 above); .6 kept;
    # .55 kept (only .6 above); the second .55 drops (.6 and the earlier, equal .55 rank above it).
    assert keep[:, 0].tolist() == [True, True, True, False, True, True, False]


def test_capacity_state_continues_and_forgets_rolled_back_positions():
    from pikv_train.routing import new_capacity_state

    torch.manual_seed(0)
    for policy in ("position", "probability"):
        ids = torch.randint(0, 3, (2, 10, 1))
        ids = torch.cat([ids, (ids + 1) % 3], -1)  # two distinct experts per token
        prio = torch.rand(2, 10, 2)
        valid, w = torch.ones(2, 10, 2, dtype=torch.bool), torch.ones(2, 10, 2)
        pos = torch.arange(10).expand(2, 10)
        full, _ = apply_capacity(ids.reshape(20, 2), valid.reshape(20, 2), w.reshape(20, 2), 3, 3, policy,
                                 prio.reshape(20, 2), n_seq=2, positions=pos)
        state = new_capacity_state(3, policy)
        steps = []
        for t in range(10):
            if t == 6:  # a speculative round that is rolled back: positions 6.. are fed again
                junk = torch.full((2, 1, 2), 0)
                apply_capacity(junk.reshape(2, 2), valid[:, :1].reshape(2, 2), w[:, :1].reshape(2, 2), 3, 3,
                               policy, torch.ones(2, 2), n_seq=2, positions=pos[:, 6:7], state=state)
            k, _ = apply_capacity(ids[:, t], valid[:, t], w[:, t], 3, 3, policy, prio[:, t], n_seq=2,
                                  positions=pos[:, t : t + 1], state=state)
            steps.append(k)
        assert torch.equal(torch.stack(steps, 1).reshape(20, 2), full)
        assert not full.all()  # drops happened


@pytest.mark.parametrize("policy,kept", [("position", [0]), ("probability", [0, 1, 2])])
def test_router_capacity_drops(policy, kept):
    # 4 tokens all prefer expert 0; C = ceil(1 * 4 * 0.5 / 2) = 1 (L = the call's length: no model).
    # position keeps the first; probability (online top-1 over .6, .7, .9, .8) keeps each new maximum, so
    # the most probable token (t2) is kept and t3 (.8 < .9) drops.
    logits = log_rows([0.6, 0.4], [0.7, 0.3], [0.9, 0.1], [0.8, 0.2])
    r, x = make(TopKBalancedRouter, logits, top_k=1, capacity_factor=0.5, drop_policy=policy,
                normalize_weights=False)
    out = r(x)
    assert out.valid[:, 0].tolist() == [i in kept for i in range(4)]
    assert out.stats["dropped"].item() == 4 - len(kept)
    assert out.counts.tolist() == [4.0, 0.0]  # counts are before drops
    assert (out.weights[~out.valid] == 0).all()


def test_probability_policy_top1_keeps_most_probable_token():
    # top_k = 1, renormalised weights are all 1: ranking by them would equal the position policy.
    torch.manual_seed(0)
    logits = torch.randn(12, 3) + torch.tensor([3.0, 0.0, 0.0])  # most tokens queue on expert 0
    r, x = make(TopKBalancedRouter, logits, top_k=1, capacity_factor=0.25, drop_policy="probability")
    out = r(x)
    p = logits.softmax(-1)
    for e in range(3):
        queue = (out.ids[:, 0] == e).nonzero()[:, 0]
        if len(queue) > r.capacity(12):
            assert out.valid[queue[p[queue, e].argmax()], 0]
    assert out.stats["dropped"] > 0
    r.cfg.drop_policy = "position"
    assert not torch.equal(r(x).valid, out.valid)


# ---------------------------------------------------------------- Adaptive


ADAPTIVE_P = [
    [0.7, 0.1, 0.1, 0.1],  # .7 >= .6 -> k=1
    [0.4, 0.3, 0.2, 0.1],  # .4, .7 -> k=2
    [0.3, 0.22, 0.2, 0.28],  # .3, .58, .8 -> k=3
    [0.1, 0.1, 0.1, 0.7],  # k=1 (expert 3)
    [0.35, 0.25, 0.2, 0.2],  # .35, .6 (exactly) -> k=2
]


def test_adaptive_k_per_token_and_weights():
    r, x = make(AdaptiveRouter, log_rows(*ADAPTIVE_P), top_k=3, k_min=1, p_threshold=0.6)
    out = r(x)
    k = out.valid.sum(-1).tolist()
    assert k == [1, 2, 3, 1, 2] and out.extras["k"].tolist() == k
    assert out.ids[0, 0] == 0 and out.ids[3, 0] == 3 and out.ids[2].tolist() == [0, 3, 1]
    torch.testing.assert_close(out.weights[1], torch.tensor([0.4 / 0.7, 0.3 / 0.7, 0.0]))
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(5))
    torch.testing.assert_close(out.stats["mean_k"], torch.tensor(9 / 5))
    # Switch loss: f over the 9 actual assignments.
    assert out.counts.tolist() == [4.0, 3.0, 0.0, 2.0]
    p_mean = torch.tensor(ADAPTIVE_P).mean(0)
    expected = 1e-2 * 4 * (torch.tensor([4.0, 3.0, 0.0, 2.0]) / 9 * p_mean).sum()
    torch.testing.assert_close(out.losses["aux"], expected)


def test_adaptive_clamps():
    r, x = make(AdaptiveRouter, log_rows(*ADAPTIVE_P), top_k=3, k_min=2, p_threshold=0.6)
    assert r(x).valid.sum(-1).tolist() == [2, 2, 3, 2, 2]
    r, x = make(AdaptiveRouter, log_rows(*ADAPTIVE_P), top_k=2, k_min=1, p_threshold=0.6)
    assert r(x).valid.sum(-1).tolist() == [1, 2, 2, 1, 2]
    r, x = make(AdaptiveRouter, log_rows(*ADAPTIVE_P), top_k=4, k_min=1, p_threshold=1.0)
    assert r(x).valid.sum(-1).tolist() == [4, 4, 4, 4, 4]


# ---------------------------------------------------------------- PiKV


def make_pikv(importance, logits, **cfg):
    r, x = make(PiKVRouter, logits, **cfg)
    s = torch.tensor(importance, dtype=torch.float64)
    with torch.no_grad():
        r.importance_head.weight.copy_(torch.log(s / (1 - s)).float()[None])
        r.importance_head.bias.zero_()
    return r, x


def test_pikv_k_by_importance():
    imp = [0.9, 0.2, 0.5, 0.49]
    r, x = make_pikv(imp, log_rows([0.5, 0.3, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.2, 0.3, 0.5]),
                     top_k=2, k_min=1, importance_threshold=0.5)
    out = r(x)
    assert out.valid.sum(-1).tolist() == [2, 1, 2, 1] and out.extras["k"].tolist() == [2, 1, 2, 1]
    assert out.ids[:, 0].tolist() == [0, 0, 2, 2]
    torch.testing.assert_close(out.weights[0], torch.tensor([0.625, 0.375]))
    torch.testing.assert_close(out.weights[1], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(out.extras["importance"], torch.tensor(imp))
    torch.testing.assert_close(out.stats["importance"], torch.tensor(sum(imp) / 4))
    torch.testing.assert_close(out.stats["frac_k_max"], torch.tensor(0.5))
    # t0 {0,1}, t1 {0}, t2 {2,1}, t3 {2}: Switch f over the 6 actual assignments
    assert out.counts.tolist() == [2.0, 2.0, 2.0]
    torch.testing.assert_close(out.losses["aux"], torch.tensor(1e-2 * 3 * (2 / 6) * (0.35 + 0.3 + 0.35)))


def test_pikv_importance_loss_trains_head_only():
    r, x = make_pikv([0.9, 0.2], log_rows([0.5, 0.5], [0.5, 0.5]), top_k=2, importance_loss_weight=0.5)
    out = r(x)
    target = torch.tensor([1.0, 0.0], requires_grad=True)
    loss = r.importance_loss(out.extras["importance"], target)
    torch.testing.assert_close(loss, torch.tensor(0.5 * (0.1**2 + 0.2**2) / 2))
    loss.backward()
    assert target.grad is None
    assert r.importance_head.weight.grad.abs().sum() > 0 and r.gate.weight.grad is None


def test_attention_mass_target():
    a = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]])
    attn = torch.stack([a, a]).unsqueeze(0).requires_grad_()  # (1, 2, 3, 3)
    m = PiKVRouter.attention_mass_target(attn)
    assert m.shape == (1, 3) and not m.requires_grad
    torch.testing.assert_close(m, torch.tensor([[1.7 / 3, 0.8 / 2, 0.5]]))
    rel = torch.tensor([[2.6 / 3, 1.9 / 2, 1.5]])
    torch.testing.assert_close(PiKVRouter.attention_mass_target(attn, relative=True), rel / (1 + rel))
    uniform = torch.tril(torch.ones(4, 4)) / torch.arange(1, 5.0)[:, None]
    torch.testing.assert_close(PiKVRouter.attention_mass_target(uniform[None, None], relative=True),
                               torch.full((1, 4), 0.5))


# ---------------------------------------------------------------- EPLB router


def test_eplb_selects_by_biased_score_weights_by_unbiased():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    r, x = make(EPLBRouter, logits, top_k=2, score_fn="sigmoid", route_scale=2.5)
    assert r(x).ids.tolist() == [[0, 1]]
    r.bias.copy_(torch.tensor([-1.0, 0.0, 0.5, 0.0]))
    out = r(x)
    assert out.ids.tolist() == [[2, 1]]  # s+b = [-.12, .73, 1.0, .27]
    s = torch.sigmoid(logits[0])
    torch.testing.assert_close(out.weights[0], 2.5 * s[[2, 1]] / (s[2] + s[1]))
    torch.testing.assert_close(out.extras["scores"], torch.sigmoid(logits))
    torch.testing.assert_close(out.probs, torch.sigmoid(logits) / torch.sigmoid(logits).sum())


def test_eplb_bias_update_ema_and_stateless_forward():
    r = EPLBRouter(8, 4, RouterConfig(top_k=2, bias_update_rate=0.01, load_ema=0.5))
    assert "bias" not in dict(r.named_parameters()) and "bias" in r.state_dict()
    r.train()
    before = {k: v.clone() for k, v in r.state_dict().items()}
    r(torch.randn(16, 8))
    assert all(torch.equal(before[k], v) for k, v in r.state_dict().items())
    with pytest.raises(RuntimeError, match="no loads"):
        r.plan()
    r.on_after_optimizer_step(torch.tensor([10.0, 2.0, 4.0, 0.0]))  # mean 4
    torch.testing.assert_close(r.bias, torch.tensor([-0.01, 0.01, 0.0, 0.01]))
    torch.testing.assert_close(r.load_ema, torch.tensor([10.0, 2.0, 4.0, 0.0]))
    r.on_after_optimizer_step(torch.tensor([0.0, 2.0, 4.0, 10.0]))
    torch.testing.assert_close(r.bias, torch.tensor([-0.0, 0.02, 0.0, 0.0]))
    torch.testing.assert_close(r.load_ema, torch.tensor([5.0, 2.0, 4.0, 5.0]))
    assert r.n_load_updates.item() == 2


def test_eplb_loss_free_by_default_and_optional_aux():
    x = torch.randn(6, 8)
    r = EPLBRouter(8, 4, RouterConfig(top_k=2, aux_loss_weight=0.5, z_loss_weight=0.0))
    assert r(x).losses == {}
    r = EPLBRouter(8, 4, RouterConfig(top_k=2, eplb_aux_loss_weight=1e-4))
    assert set(r(x).losses) == {"aux", "z"}


def test_eplb_bias_balances_skewed_load():
    torch.manual_seed(0)
    r = EPLBRouter(16, 8, RouterConfig(top_k=2, score_fn="sigmoid", bias_update_rate=0.02))
    with torch.no_grad():
        r.gate.weight.normal_()
        r.gate.weight[0] += 1.0  # expert 0 is hot for almost everyone
    x = torch.randn(256, 16) + 0.5
    first = r(x).stats["load_max_over_mean"].item()
    for _ in range(60):
        r.on_after_optimizer_step(r(x).counts)
    assert first > 2.5 and r(x).stats["load_max_over_mean"].item() < 1.5
    assert r.bias[0] < 0


def test_eplb_group_limit_and_plan():
    r = EPLBRouter(8, 8, RouterConfig(top_k=2, n_groups=4, topk_groups=1, n_devices=4, n_redundant=4))
    out = r(torch.randn(10, 8))
    assert (out.ids // 2 == out.ids[:, :1] // 2).all()  # both experts from the single kept group
    r.on_after_optimizer_step(torch.tensor([100.0, 10, 10, 10, 10, 10, 10, 10]))
    plan = r.plan()
    assert plan.ratio_after < plan.ratio_before
    assert plan.expert_replicas.tolist() == [5, 1, 1, 1, 1, 1, 1, 1]


# ---------------------------------------------------------------- Hierarchical


def test_hierarchical_keeps_groups_by_top2_sum():
    # groups of 2: g0 = [.26, .01] (best max, sum .27), g1 = [.15, .14] (.29), g2 = [.145, .135] (.28), g3 (.06)
    v = [0.26, 0.01, 0.15, 0.14, 0.145, 0.135, 0.04, 0.02]
    r, x = make(HierarchicalRouter, log_rows(v), top_k=3, n_groups=4, topk_groups=2)
    out = r(x)
    assert out.extras["kept_groups"].tolist() == [[False, True, True, False]]
    assert out.ids.tolist() == [[2, 4, 3]]
    torch.testing.assert_close(out.weights[0], torch.tensor([0.15, 0.145, 0.14]) / 0.435)
    assert set(out.losses) == {"aux", "z"}


@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid"])
def test_hierarchical_experts_only_from_kept_groups(score_fn):
    torch.manual_seed(1)
    r = HierarchicalRouter(8, 12, RouterConfig(top_k=3, n_groups=4, topk_groups=2, score_fn=score_fn))
    with torch.no_grad():
        r.gate.weight.normal_()
    out = r(torch.randn(32, 8))
    s = out.logits.softmax(-1) if score_fn == "softmax" else torch.sigmoid(out.logits)
    gs = s.reshape(32, 4, 3).topk(2, -1).values.sum(-1)
    kept = gs.topk(2, -1).indices
    assert (out.extras["kept_groups"].nonzero()[:, 1].reshape(32, 2).sort(-1).values == kept.sort(-1).values).all()
    assert torch.gather(out.extras["kept_groups"], 1, out.ids // 3).all()
    # among kept experts the chosen are the top-3 scores
    masked = s.masked_fill(~out.extras["kept_groups"].repeat_interleave(3, -1), -1.0)
    assert torch.equal(out.ids.sort(-1).values, masked.topk(3, -1).indices.sort(-1).values)
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(32))


# ---------------------------------------------------------------- errors / registry


@pytest.mark.parametrize("cls,cfg,msg", [
    (BaseRouter, dict(top_k=5), "top_k"),
    (AdaptiveRouter, dict(top_k=2, k_min=3), "k_min"),
    (PiKVRouter, dict(top_k=2, k_min=0), "k_min"),
    (AdaptiveRouter, dict(p_threshold=0.0), "p_threshold"),
    (AdaptiveRouter, dict(p_threshold=1.5), "p_threshold"),
    (HierarchicalRouter, dict(n_groups=3), "divide"),
    (HierarchicalRouter, dict(n_groups=2, topk_groups=3), "topk_groups"),
    (HierarchicalRouter, dict(top_k=3, n_groups=4, topk_groups=1), "cannot hold"),
    (HierarchicalRouter, dict(score_fn="relu"), "score_fn"),
    (EPLBRouter, dict(n_devices=3), "divisible"),
    (EPLBRouter, dict(n_groups=3), "divide"),
])
def test_bad_settings_raise(cls, cfg, msg):
    with pytest.raises(ValueError, match=msg):
        cls(8, 4, RouterConfig(**cfg))


ALL = ["base", "topk_balanced", "adaptive", "pikv", "eplb", "hierarchical"]
EXTRA = {"hierarchical": dict(n_groups=2, topk_groups=1), "eplb": dict(score_fn="sigmoid", n_groups=2, topk_groups=1)}


def test_registry_and_exports():
    import pikv_train.routing as routing

    assert sorted(ROUTERS) == sorted(ALL)
    for name in ["BaseRouter", "TopKBalancedRouter", "AdaptiveRouter", "PiKVRouter", "EPLBRouter",
                 "HierarchicalRouter"]:
        assert hasattr(routing, name)
    for name in ALL:
        assert type(build_router(RouterConfig(name=name), 8, 4)) is ROUTERS[name]
    with pytest.raises(ValueError, match="unknown router"):
        build_router(RouterConfig(name="nope"), 8, 4)  # type: ignore[arg-type]


def _router(name, **cfg):
    torch.manual_seed(0)
    r = build_router(RouterConfig(name=name, **{**EXTRA.get(name, {}), **cfg}), 8, 4)
    with torch.no_grad():
        r.gate.weight.normal_()
    return r


@pytest.mark.parametrize("name", ALL)
def test_causal(name):
    r = _router(name)
    if name == "eplb":
        r.bias.copy_(torch.tensor([0.1, -0.2, 0.0, 0.3]))
    x = torch.randn(6, 8)
    out = r(x)
    for _ in range(3):
        x2 = x.clone()
        x2[-1] = torch.randn(8) * 5
        out2 = r(x2)
        for f in ("ids", "valid", "weights"):
            assert torch.equal(getattr(out, f)[:-1], getattr(out2, f)[:-1]), f


@pytest.mark.parametrize("name", ALL)
def test_gradients_reach_gate(name):
    # every token uses 2 experts so the renormalised weights carry a gradient
    r = _router(name, p_threshold=1.0, importance_threshold=0.0, z_loss_weight=1e-3)
    x = torch.randn(6, 8)
    out = r(x)
    (out.weights * torch.randn(6, 2)).sum().backward()
    g = r.gate.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    r.zero_grad()
    out = r(x)
    if name == "base":
        assert out.loss.item() == 0.0
        return
    out.loss.backward()
    assert r.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ALL)
def test_empty_batch(name):
    out = _router(name)(torch.zeros(0, 8))
    assert out.ids.shape == (0, 2) and out.counts.sum() == 0 and torch.isfinite(out.loss)


def test_capacity_on_dynamic_k_router():
    r = _router("adaptive", p_threshold=0.9, capacity_factor=0.5)
    out = r(torch.randn(16, 8))
    assert (out.counts.sum() - out.valid.sum()).item() == out.stats["dropped"].item()
    cap = math.ceil(2 * 16 * 0.5 / 4)
    assert torch.bincount(out.ids[out.valid], minlength=4).max() <= cap


def test_pikv_importance_head_is_trained_on_detached_attention_mass():
    from pikv_train.models import Decoder, ModelConfig, MoEConfig
    from pikv_train.routing import RouterConfig

    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, n_kv_head=1, d_model=32, max_seq_len=64,
                      moe=MoEConfig(n_experts=4, d_expert=32, router=RouterConfig(name="pikv", top_k=2)))
    model = Decoder(cfg).train()
    out = model(torch.randint(0, 256, (2, 24)))
    assert all("importance" in r.losses for r in out.routing)
    out.router_loss.backward()
    head = model.blocks[0].ffn.router
    grads = [p.grad for n, p in head.named_parameters() if "importance" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    # Eval / decoding computes no target and no loss.
    model.eval()
    assert all("importance" not in r.losses for r in model(torch.randint(0, 256, (1, 8))).routing)
