"""Prompt / response examples for on-policy distillation (DistiLLM, DistiLLM-2, Speculative KD).

An example is a prompt and a reference response (and, for DistiLLM-2 data read from columns, a second
"student" response). On the embedded corpus the examples are document windows: the first
``prompt_len`` tokens are the prompt and the next ``response_len`` tokens the reference continuation.

Batches are right-padded: ``input_ids = prompt + response + pad``, with ``loss_mask`` on response
targets only, so the training forward needs no padding mask (pads only ever follow real tokens).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset


class PromptDataset(Dataset):
    """A list of (prompt, response[, student_response]) token-id tensors."""

    def __init__(self, examples: list[dict[str, Tensor]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return self.examples[i]


def windows_from_stream(tokens: Tensor, doc_ends: list[int], prompt_len: int, response_len: int) -> list[dict]:
    """Cut each document of a token stream into non-overlapping prompt+response windows (no window spans
    two documents). tokens: (L,) ids; doc_ends: exclusive end offset of each document."""
    out, start, w = [], 0, prompt_len + response_len
    for end in doc_ends:
        for s in range(start, end - w + 1, w):
            out.append({"prompt": tokens[s : s + prompt_len], "response": tokens[s + prompt_len : s + w]})
        start = end
    return out


def build_sequences(prompts: list[Tensor], responses: list[Tensor], pad_id: int) -> dict[str, Tensor]:
    """Right-padded training batch from per-row prompts and responses.

    Returns input_ids, targets (B, T) and loss_mask (B, T) with True where the target is a response token,
    plus prompt_lens / response_lens (B,).
    """
    seqs = [torch.cat([p, r]) for p, r in zip(prompts, responses)]
    t = max(1, max(len(s) for s in seqs) - 1)
    b = len(seqs)
    ids = torch.full((b, t + 1), pad_id, dtype=torch.long)
    mask = torch.zeros(b, t, dtype=torch.bool)
    for i, (s, p, r) in enumerate(zip(seqs, prompts, responses)):
        ids[i, : len(s)] = s
        # Target position j predicts token j+1: response tokens are targets at [len(p)-1, len(p)+len(r)-1).
        mask[i, max(len(p) - 1, 0) : len(p) + len(r) - 1] = True
    return {
        "input_ids": ids[:, :-1],
        "targets": ids[:, 1:],
        "loss_mask": mask,
        "prompt_lens": torch.tensor([len(p) for p in prompts]),
        "response_lens": torch.tensor([len(r) for r in responses]),
    }


class PromptCollator:
    """Collate examples into a right-padded batch; keeps the raw prompts for generation."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, Tensor]]) -> dict:
        prompts = [it["prompt"].long() for it in items]
        batch = build_sequences(prompts, [it["response"].long() for it in items], self.pad_id)
        batch["prompts"] = prompts
        if "student_response" in items[0]:
            batch["student_responses"] = [it["student_response"].long() for it in items]
        return batch
