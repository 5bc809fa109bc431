"""A shuffling sampler that can resume in the middle of an epoch.

The order of epoch ``e`` is a permutation drawn from ``seed + e``; after a restart the data module tells
the sampler how many batches of the current epoch were already consumed, and those are skipped, so a
resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class ResumableRandomSampler(Sampler[int]):
    """Seeded per-epoch permutation of ``range(n)`` that can skip the first ``skip`` items once."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed = n, seed
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        skip, self.skip = self.skip, 0  # only the first epoch after a restart is partial
        return iter(order[skip:])

    def __len__(self) -> int:
        return self.n - self.skip


def first_samples(n: int, seed: int, count: int, per_epoch: int | None = None) -> list[int]:
    """Distinct indices among the first ``count`` samples a fresh run draws from
    ``ResumableRandomSampler(n, seed)``: epoch ``e``'s order, of which the loader uses the first
    ``per_epoch`` samples (default n), epoch after epoch.

    Objectives that prepare data per training example (DistiLLM-2's offline pairs) prepare only these.
    Under DDP each rank takes a strided share of the same order, so ``count`` and ``per_epoch`` are global.
    """
    per_epoch = n if per_epoch is None else min(per_epoch, n)
    seen: dict[int, None] = {}
    epoch = 0
    while count > 0 and len(seen) < n:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        take = min(count, per_epoch)
        seen.update(dict.fromkeys(order[:take]))
        count -= take
        epoch += 1
    return list(seen)
