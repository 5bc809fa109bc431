"""EPLB planner (DeepSeek's expert-parallel load balancer, global policy) as an analysis tool.

Given per-expert loads w_e (e.g. a moving average of routed token counts), G devices and R redundant
replicas:

1. **Replicate**: R times, give one more replica to the expert with the largest load per replica
   ``w_e / n_e`` (ties: lowest expert id). Each replica is assumed to serve ``w_e / n_e``.
2. **Pack**: sort the E + R replicas by load, descending (ties: lower expert id first), and put each on
   the least-loaded device (ties: lowest device id) that still has a free slot; every device gets
   exactly ``(E + R) / G`` replicas (balanced LPT).

The report compares the max/mean device load of the naive placement (no replicas, experts placed
contiguously, ``E / G`` per device; ``torch.tensor_split`` sizes when G does not divide E) with the plan.
Two replicas of one expert may land on the same device (as in DeepSeek's global policy); that is legal,
just useless. Pure CPU bookkeeping, no communication.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class EPLBPlan:
    """Result of :func:`plan_eplb` (P = E + R physical slots, S = P / G slots per device).

    replica_expert:     (P,) logical expert served by each physical slot (``phy2log``); slots are
                        device-major: device d owns slots ``d*S .. d*S + S - 1``.
    replica_device:     (P,) device of each slot (``slot // S``).
    expert_replicas:    (E,) number of replicas per expert (``logcnt``, each >= 1).
    expert_slots:       (E, max replicas) slot ids per expert, padded with -1 (``log2phy``).
    device_load_before: (G,) device loads of the naive contiguous placement.
    device_load_after:  (G,) device loads of the plan.
    ratio_before / ratio_after: max / mean device load (1.0 = perfect; 1.0 when all loads are 0).
    """

    replica_expert: Tensor
    replica_device: Tensor
    expert_replicas: Tensor
    expert_slots: Tensor
    device_load_before: Tensor
    device_load_after: Tensor
    ratio_before: float
    ratio_after: float

    @property
    def slots_per_device(self) -> int:
        return self.replica_expert.numel() // self.device_load_after.numel()


def _max_over_mean(device_load: Tensor) -> float:
    mean = float(device_load.mean())
    return float(device_load.max()) / mean if mean > 0 else 1.0


def plan_eplb(loads: Tensor, n_devices: int, n_redundant: int = 0) -> EPLBPlan:
    """Replicate hot experts and pack the replicas onto ``n_devices`` devices (see module docstring)."""
    loads = torch.as_tensor(loads).detach().to("cpu", torch.float64)
    if loads.dim() != 1 or loads.numel() == 0:
        raise ValueError(f"loads must be a non-empty 1-D (E,) tensor, got shape {tuple(loads.shape)}")
    if bool((loads < 0).any()) or not bool(torch.isfinite(loads).all()):
        raise ValueError("loads must be finite and non-negative")
    n_experts = loads.numel()
    if n_devices < 1 or n_redundant < 0:
        raise ValueError(f"need n_devices >= 1 and n_redundant >= 0, got {n_devices} and {n_redundant}")
    n_slots = n_experts + n_redundant
    if n_slots % n_devices:
        lo = n_slots - n_slots % n_devices - n_experts
        hint = f"n_redundant={n_redundant + n_devices - n_slots % n_devices}" + (f" or {lo}" if lo >= 0 else "")
        raise ValueError(
            f"n_experts + n_redundant = {n_slots} is not divisible by n_devices={n_devices}; use {hint}"
        )
    per_device = n_slots // n_devices

    # 1. Replication: greedy on the largest load per replica (first index wins ties).
    cnt = torch.ones(n_experts, dtype=torch.float64)
    for _ in range(n_redundant):
        cnt[int(torch.argmax(loads / cnt))] += 1  # argmax returns the first maximal index

    # 2. Balanced LPT packing.
    replica_load = (loads / cnt).tolist()
    items = [(replica_load[e], e) for e in range(n_experts) for _ in range(int(cnt[e]))]
    items.sort(key=lambda it: (-it[0], it[1]))
    dev_load = [0.0] * n_devices
    dev_fill = [0] * n_devices
    replica_expert = torch.empty(n_slots, dtype=torch.long)
    for load, e in items:
        d = min((g for g in range(n_devices) if dev_fill[g] < per_device), key=lambda g: (dev_load[g], g))
        replica_expert[d * per_device + dev_fill[d]] = e
        dev_fill[d] += 1
        dev_load[d] += load

    expert_replicas = cnt.long()
    expert_slots = torch.full((n_experts, int(expert_replicas.max())), -1, dtype=torch.long)
    fill = [0] * n_experts
    for slot, e in enumerate(replica_expert.tolist()):
        expert_slots[e, fill[e]] = slot
        fill[e] += 1

    before = torch.stack([chunk.sum() for chunk in torch.tensor_split(loads, n_devices)])
    after = torch.tensor(dev_load, dtype=torch.float64)
    return EPLBPlan(
        replica_expert=replica_expert,
        replica_device=torch.arange(n_slots) // per_device,
        expert_replicas=expert_replicas,
        expert_slots=expert_slots,
        device_load_before=before,
        device_load_after=after,
        ratio_before=_max_over_mean(before),
        ratio_after=_max_over_mean(after),
    )
