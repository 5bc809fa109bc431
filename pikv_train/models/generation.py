"""Batched sampling with a KV cache object (temperature, top-k, top-p).

By default the cache is the model's deployed cache (``model.new_cache()``: its cache policy, KV sharding
and compression composed, SPEC §7), so a student samples with the attention it was trained under.
Prompts of different lengths are left-padded; padded slots get position -1 so the cache masks them
and RoPE positions of every row start at 0.
"""

from __future__ import annotations

from pikv_train.errors import ConfigError

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from pikv_train.cache.kv_cache import KVCache


@dataclass
class Generation:
    """tokens: (B, P + G) prompt (left-padded) + generated ids; generated: (B, P + G) bool, True on
    sampled tokens up to and including EOS; prompt_len: P (padded prompt width)."""

    tokens: Tensor
    generated: Tensor
    prompt_len: int

    @property
    def lengths(self) -> Tensor:
        """(B,) number of generated tokens per row."""
        return self.generated.sum(1)


def left_pad(prompts: list[Tensor], pad_id: int) -> tuple[Tensor, Tensor]:
    """Stack 1-D prompts into (B, P) left-padded ids and (B, P) positions (-1 on padding)."""
    p = max(len(x) for x in prompts)
    ids = torch.full((len(prompts), p), pad_id, dtype=torch.long, device=prompts[0].device)
    pos = torch.full_like(ids, -1)
    for i, x in enumerate(prompts):
        if len(x):
            ids[i, p - len(x):] = x
            pos[i, p - len(x):] = torch.arange(len(x), device=x.device)
    return ids, pos


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None, vocab_size: int | None = None) -> Tensor:
    """Sample one id per row from logits (B, V); temperature 0 means greedy. Columns at or beyond
    ``vocab_size`` (padded LM-head rows, no real token) are never chosen."""
    logits = logits.float()
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits = logits[..., :vocab_size]  # ids of the kept columns are unchanged
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p (the top token is always kept).
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def default_cache(model) -> KVCache:
    """The cache ``model`` is deployed with (``model.new_cache()``); a plain :class:`KVCache` for models
    without that method."""
    make = getattr(model, "new_cache", None)
    return make() if make is not None else KVCache(model.cfg.n_layer)


@torch.no_grad()
def generate(
    model,
    prompts: list[Tensor] | Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    pad_id: int = 0,
    cache_factory: Callable[[int], KVCache] | None = None,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
) -> Generation:
    """Sample continuations for a batch of prompts with one cache shared by the batch.

    Args:
        model: a :class:`~pikv_train.models.decoder.Decoder`.
        prompts: list of 1-D id tensors (any lengths), or a (B, P) tensor of equal-length prompts.
        max_new_tokens: tokens to sample per row (rows that emit ``eos_id`` stop early and are padded).
        cache_factory: builds the cache from the number of layers (e.g. ``KVCache`` for full attention, or
            ``policy.new_cache``). None (the default) decodes with the model's deployed cache,
            ``model.new_cache()`` (a plain :class:`KVCache` for a model without policy or sharding).
        vocab_size: sample only ids below it (the real vocabulary; padded LM-head rows are never sampled).
    """
    if isinstance(prompts, Tensor):
        prompts = list(prompts)
    ids, pos = left_pad(prompts, pad_id)
    b, p = ids.shape
    if p + max_new_tokens > model.cfg.max_seq_len:
        raise ConfigError(
            f"prompt ({p}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len={model.cfg.max_seq_len}; "
            "shorten the prompts or generate fewer tokens"
        )
    was_training = model.training
    model.eval()
    cache = default_cache(model) if cache_factory is None else cache_factory(model.cfg.n_layer)
    out = model(ids, positions=pos, cache=cache)
    next_pos = pos.max(1).values + 1  # (B,)
    logits = model.logits(out.hidden[:, -1])
    tokens, generated = [ids], [torch.zeros_like(ids, dtype=torch.bool)]
    done = torch.zeros(b, dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator, vocab_size)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        tokens.append(nxt[:, None])
        generated.append(~done[:, None])
        if eos_id is not None:
            done = done | (nxt == eos_id)
        if bool(done.all()):
            break
        out = model(nxt[:, None], positions=next_pos[:, None], cache=cache)
        next_pos = next_pos + 1
        logits = model.logits(out.hidden[:, -1])
    model.train(was_training)
    return Generation(tokens=torch.cat(tokens, 1), generated=torch.cat(generated, 1), prompt_len=p)
