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


def first_samples(n: int, seed: int, count: int) -> list[int]:
    """Indices of the first ``count`` samples a fresh run draws from ``ResumableRandomSampler(n, seed)``,
    epoch after epoch (each index once; all of ``range(n)`` when ``count`` spans an epoch or more).

    Objectives that prepare data per training example (DistiLLM-2's offline pairs) prepare only these.
    Under DDP each rank takes a strided share of this same order, so ``count`` is the global sample count.
    """
    if count >= n:
        return list(range(n))
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:count].tolist()
