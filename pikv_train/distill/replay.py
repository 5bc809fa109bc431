"""DistiLLM's replay buffer: token ids of student-generated (prompt, response) pairs, no logits.

The teacher re-scores a replayed pair every time it is drawn, as in DistiLLM (the buffer stores no
teacher outputs). Each DDP rank keeps its own buffer; its contents are saved in checkpoints.
"""

from __future__ import annotations

import random
from collections import deque

import torch
from torch import Tensor


class ReplayBuffer:
    """FIFO buffer of at most ``capacity`` (prompt, response) pairs of token ids.

    Args:
        capacity: maximum number of pairs (sequences) held; the oldest are dropped first.
    """

    def __init__(self, capacity: int = 1000):
        if capacity < 1:
            raise ValueError(f"replay capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.items: deque[tuple[list[int], list[int]]] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def full(self) -> bool:
        return len(self.items) >= self.capacity

    def push(self, prompts: list[Tensor], responses: list[Tensor]) -> None:
        for p, r in zip(prompts, responses):
            self.items.append((p.tolist(), r.tolist()))

    def sample(self, n: int, rng: random.Random) -> tuple[list[Tensor], list[Tensor]]:
        """Draw n distinct pairs uniformly, without replacement (as the DistiLLM repository's
        ``random.sample``); n must not exceed the buffer's size."""
        if n > len(self.items):
            raise ValueError(
                f"cannot draw {n} distinct pairs from a replay buffer of {len(self.items)}; "
                "set distillm.capacity to at least the batch size"
            )
        idx = rng.sample(range(len(self.items)), n)
        pairs = [self.items[i] for i in idx]
        return [torch.tensor(p, dtype=torch.long) for p, _ in pairs], [torch.tensor(r, dtype=torch.long) for _, r in pairs]

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "items": [list(x) for x in self.items]}

    def load_state_dict(self, state: dict) -> None:
        self.capacity = int(state["capacity"])
        self.items = deque((tuple(x) for x in state["items"]), maxlen=self.capacity)
