"""Speculative KD (Xu et al., ICLR 2025): batched interleaved sampling with KV caches for both models.

Per round, the student proposes ``gamma`` tokens (sampled one by one with its cache); the teacher scores
the whole block in one forward with its cache; proposals are accepted left to right while each lies in
the teacher's top-K of its *untruncated* distribution at that position; at the first rejection the
teacher samples the replacement token and the remaining proposals are discarded. If all gamma proposals
are accepted no extra teacher token is added. Rounds repeat until each row has ``max_new_tokens`` tokens
or emitted EOS. K = V accepts everything (on-policy KD); K = 1 keeps only student tokens that are the
teacher's top-1.

Caches: the student proposes with its deployed cache (``student.new_cache()``: the cache policy and KV
sharding it trains under, SPEC §7). An evicting policy cache cannot undo a rejected proposal by hiding
positions (the keys it evicted to make room are gone), so the student's cache is snapshotted before each
round and, when some row rejected, restored and fed the accepted tokens in one forward (exact: every
cache processes a multi-token update as it would token by token; rows with fewer accepted tokens are
padded with position -1). The teacher keeps its own cache (a plain :class:`KVCache` for a pikv_train
teacher) and rolls rejected positions back.

Invariant between rounds: both caches hold every accepted token except the last one (``cur``), whose
next-token logits are computed at the start of the next round.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pikv_train.models.generation import default_cache, left_pad, sample_next


@dataclass
class SKDConfig:
    """Speculative KD sampler settings (paper defaults gamma = 5, K = 25)."""

    gamma: int = 5
    """Tokens the student proposes per round."""
    top_k: int = 25
    """A proposal is accepted iff it is in the teacher's top-K (of the untruncated distribution)."""
    student_temperature: float = 1.0
    """Sampling temperature of student proposals."""
    teacher_temperature: float = 1.0
    """Sampling temperature of teacher replacements."""
    max_new_tokens: int | None = None
    """Response length limit (default: the data's response_len)."""


@dataclass
class SKDResult:
    """responses: per-row generated ids; proposed / accepted: student proposals made and kept
    (within the length limit); replaced: teacher replacement tokens."""

    responses: list[Tensor]
    proposed: int
    accepted: int
    replaced: int

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.proposed, 1)


@torch.no_grad()
def speculative_kd_sample(
    student, teacher, prompts: list[Tensor], cfg: SKDConfig, max_new_tokens: int, *, eos_id: int | None = None,
    pad_id: int = 0, generator: torch.Generator | None = None,
) -> SKDResult:
    """Interleaved student/teacher sampling for a batch of prompts (see module docstring)."""
    s_mode, t_mode = student.training, teacher.training
    student.eval(), teacher.eval()
    ids, pos = left_pad(prompts, pad_id)
    b, dev = ids.shape[0], ids.device
    s_cache, t_cache = default_cache(student), default_cache(teacher)
    # Prefill everything but the last prompt token, which becomes `cur`.
    if ids.shape[1] > 1:
        student(ids[:, :-1], positions=pos[:, :-1], cache=s_cache)
        teacher(ids[:, :-1], positions=pos[:, :-1], cache=t_cache)
    cur, cur_pos = ids[:, -1], pos[:, -1]  # (B,)
    out = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool)
    proposed = accepted = replaced = 0
    g = cfg.gamma
    while not bool(done.all()):
        snap = s_cache.snapshot()
        # 1. Student proposes gamma tokens autoregressively.
        props, feed, feed_pos = [], cur, cur_pos
        for j in range(g):
            logits = student.logits(student(feed[:, None], positions=feed_pos[:, None], cache=s_cache).hidden[:, -1])
            nxt = sample_next(logits, cfg.student_temperature, generator=generator)
            props.append(nxt)
            feed, feed_pos = nxt, feed_pos + 1
        props = torch.stack(props, 1)  # (B, gamma)
        # 2. Teacher scores [cur, p1 .. p_{gamma-1}] in one forward: logits predicting p1 .. p_gamma.
        block = torch.cat([cur[:, None], props[:, :-1]], 1)
        block_pos = cur_pos[:, None] + torch.arange(g, device=dev)[None]
        t_logits = teacher.logits(teacher(block, positions=block_pos, cache=t_cache).hidden).float()  # (B, g, V)
        # 3. Accept left to right while the proposal is in the teacher's top-K.
        k = min(cfg.top_k, t_logits.shape[-1])
        kth = t_logits.topk(k, dim=-1).values[..., -1:]  # (B, g, 1)
        in_top = t_logits.gather(-1, props[..., None]) >= kth  # ties at the K-th value count as inside
        n_acc = torch.cumprod(in_top[..., 0].long(), dim=1).sum(1)  # (B,) leading accepted proposals
        # 4. Replacement from the teacher at the first rejected position.
        # (Only drawn when some row rejected, so K = V consumes exactly the random draws of plain sampling.)
        repl = props[:, -1]
        if bool((n_acc < g).any()):
            rej = n_acc.clamp(max=g - 1)
            repl = sample_next(t_logits[torch.arange(b, device=dev), rej], cfg.teacher_temperature, generator=generator)
        new_cur = torch.where(n_acc < g, repl, props[:, -1])
        for i in range(b):
            if done[i]:
                continue
            room = max_new_tokens - len(out[i])
            na = int(n_acc[i])
            toks = props[i, :na].tolist() + ([int(repl[i])] if na < g else [])
            toks = toks[:room]
            if eos_id is not None and eos_id in toks:
                toks = toks[: toks.index(eos_id) + 1]
            kept_student = min(na, len(toks))
            proposed += min(g, room)
            accepted += kept_student
            replaced += len(toks) - kept_student
            out[i] += toks
            if len(out[i]) >= max_new_tokens or (eos_id is not None and toks and toks[-1] == eos_id):
                done[i] = True
        # 5. Caches keep [.., cur, p1 .. p_m] (m = accepted, at most g - 1): the tokens before the new `cur`.
        n_keep = torch.where(n_acc < g, n_acc, torch.full_like(n_acc, g - 1))  # (B,) m
        keep = cur_pos + n_keep
        t_cache.rollback(keep)
        if bool((n_acc < g).any()):
            # The student's cache holds [cur, p1 .. p_{g-1}]: back to the round's start, then re-feed
            # [cur, p1 .. p_m] per row in one forward (shorter rows padded with position -1).
            s_cache.restore(snap)
            width = int(n_keep.max()) + 1
            steps = torch.arange(width, device=dev)[None]
            refeed = torch.cat([cur[:, None], props[:, : width - 1]], 1)  # (B, width)
            refeed_pos = torch.where(steps <= n_keep[:, None], cur_pos[:, None] + steps, torch.full_like(steps, -1))
            student(refeed, positions=refeed_pos, cache=s_cache)
        cur, cur_pos = new_cur, keep + 1
    student.train(s_mode), teacher.train(t_mode)
    return SKDResult([torch.tensor(o, dtype=torch.long) for o in out], proposed, accepted, replaced)
