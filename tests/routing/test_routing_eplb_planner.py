"""EPLB planner: greedy replication of hot experts + balanced packing onto devices."""

from __future__ import annotations

import pytest
import torch

from pikv_train.routing import plan_eplb


def check_consistent(plan, n_experts, n_devices):
    per = plan.slots_per_device
    assert plan.replica_expert.numel() == per * n_devices
    assert torch.bincount(plan.replica_device, minlength=n_devices).tolist() == [per] * n_devices
    counts = torch.bincount(plan.replica_expert, minlength=n_experts)
    assert (counts >= 1).all() and torch.equal(counts, plan.expert_replicas)
    for e in range(n_experts):
        slots = plan.expert_slots[e][plan.expert_slots[e] >= 0]
        assert slots.numel() == counts[e] and (plan.replica_expert[slots] == e).all()
    torch.testing.assert_close(plan.device_load_before.sum(), plan.device_load_after.sum())


def test_skewed_histogram_replicate_and_pack():
    loads = torch.tensor([100.0, 10, 10, 10, 10, 10, 10, 10])
    plan = plan_eplb(loads, n_devices=4, n_redundant=4)
    check_consistent(plan, 8, 4)
    assert plan.expert_replicas.tolist() == [5, 1, 1, 1, 1, 1, 1, 1]  # 100/5 = 20 per replica
    assert plan.device_load_before.tolist() == [110.0, 20.0, 20.0, 20.0]
    # five 20s over four devices: some device holds two (+ a 10) -> 50 is optimal
    assert plan.device_load_after.max().item() == 50.0
    assert plan.ratio_before == pytest.approx(110 / 42.5)
    assert plan.ratio_after == pytest.approx(50 / 42.5)


def test_packing_only_and_trivial_cases():
    plan = plan_eplb(torch.tensor([4.0, 3.0, 2.0, 1.0]), n_devices=2)
    check_consistent(plan, 4, 2)
    assert plan.device_load_before.tolist() == [7.0, 3.0]
    assert plan.device_load_after.tolist() == [5.0, 5.0] and plan.ratio_after == 1.0
    plan = plan_eplb(torch.zeros(4), n_devices=2)
    assert plan.ratio_before == plan.ratio_after == 1.0
    plan = plan_eplb(torch.tensor([3.0, 1.0]), n_devices=1, n_redundant=1)
    assert plan.expert_replicas.tolist() == [2, 1] and plan.ratio_after == 1.0


def test_random_skew_never_worse():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        loads = torch.rand(16, generator=g) ** 4 * 100
        plan = plan_eplb(loads, n_devices=4, n_redundant=4)
        check_consistent(plan, 16, 4)
        assert plan.ratio_after <= plan.ratio_before + 1e-9


def test_bad_settings():
    with pytest.raises(ValueError, match=r"not divisible by n_devices=3; use n_redundant=1"):
        plan_eplb(torch.ones(8), n_devices=3)
    with pytest.raises(ValueError, match="n_devices >= 1"):
        plan_eplb(torch.ones(8), n_devices=0)
    with pytest.raises(ValueError, match="non-negative"):
        plan_eplb(torch.tensor([1.0, -1.0]), n_devices=1)
    with pytest.raises(ValueError, match="1-D"):
        plan_eplb(torch.ones(2, 2), n_devices=1)
