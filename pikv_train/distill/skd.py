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

from pikv_train.data.prompts import build_sequences
from pikv_train.models.generation import default_cache, left_pad, sample_next

from .objective import Objective, StepInfo, StepResult, to_device


@dataclass
class SKDConfig:
    """Speculative KD sampler settings; the defaults are the SKD repository's training config
    (google-research ``speculative_kd/config/kd_train.yaml``: gamma 5, K 25, student T 0.5 / top-p 0.5,
    teacher T 0.2 / top-p 0.5).

    Two readings of that code are deliberate here: proposals are sampled with the *student* settings (the
    config's intent; the repository's Hugging Face assisted-generation plumbing ends up drawing them with
    the teacher's), and acceptance tests the teacher's top-K of its *untruncated* distribution (the paper's
    Algorithm 1; the repository takes top-K after its temperature / top-p warper).
    """

    gamma: int = 5
    """Tokens the student proposes per round."""
    top_k: int = 25
    """A proposal is accepted iff it is in the teacher's top-K (of the untruncated distribution)."""
    student_temperature: float = 0.5
    """Sampling temperature of student proposals."""
    student_top_p: float = 0.5
    """Nucleus threshold of student proposals."""
    teacher_temperature: float = 0.2
    """Sampling temperature of teacher replacements."""
    teacher_top_p: float = 0.5
    """Nucleus threshold of teacher replacements."""
    max_new_tokens: int | None = None
    """Response length limit (default: the data's response_len)."""

    def __post_init__(self) -> None:
        from pikv_train.errors import check_range

        k = "model.init_args.skd."
        check_range(k + "gamma", self.gamma, lo=1, fix=f"set {k}gamma >= 1 (tokens the student proposes per round; SKD: 5)")
        check_range(k + "top_k", self.top_k, lo=1, fix=f"set {k}top_k >= 1 (SKD: 25)")
        for who in ("student", "teacher"):
            check_range(f"{k}{who}_temperature", getattr(self, f"{who}_temperature"), lo=0,
                        fix=f"set {k}{who}_temperature >= 0 (0 = greedy)")
            check_range(f"{k}{who}_top_p", getattr(self, f"{who}_top_p"), lo=0, hi=1, lo_open=True,
                        fix=f"set {k}{who}_top_p in (0, 1]")
        if self.max_new_tokens is not None:
            check_range(k + "max_new_tokens", self.max_new_tokens, lo=1, fix=f"set {k}max_new_tokens >= 1 or null")


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
    pad_id: int = 0, vocab_size: int | None = None, generator: torch.Generator | None = None,
) -> SKDResult:
    """Interleaved student/teacher sampling for a batch of prompts (see module docstring).

    Args:
        vocab_size: ids at or beyond it (padded LM-head rows) are never proposed, accepted or sampled.
    """
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
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    proposed = accepted = replaced = 0
    while not bool(done.all()):
        # Proposals per row this round: gamma, cut to the row's remaining room (the last round is
        # truncated), 0 for finished rows. Slots past a row's count are fed with position -1 (padding),
        # so no row ever advances beyond prompt + max_new_tokens - 1 positions.
        room = torch.tensor([max_new_tokens - len(o) for o in out], device=dev)
        g_row = torch.where(done, torch.zeros_like(room), room.clamp(max=cfg.gamma))  # (B,)
        g = int(g_row.max())
        steps = torch.arange(g, device=dev)[None]  # (1, g)
        live = steps < g_row[:, None]  # (B, g) slot j is a real proposal step of its row
        snap = s_cache.snapshot()
        # 1. Student proposes g tokens autoregressively (feeding cur, p1 .. p_{g-1}).
        props, feed = [], cur
        for j in range(g):
            feed_pos = torch.where(live[:, j], cur_pos + j, torch.full_like(cur_pos, -1))
            logits = student.logits(student(feed[:, None], positions=feed_pos[:, None], cache=s_cache).hidden[:, -1])
            nxt = sample_next(logits, cfg.student_temperature, top_p=cfg.student_top_p, vocab_size=vocab_size,
                              generator=generator)
            props.append(nxt)
            feed = nxt
        props = torch.stack(props, 1)  # (B, g)
        # 2. Teacher scores [cur, p1 .. p_{g-1}] in one forward: logits predicting p1 .. p_g.
        block = torch.cat([cur[:, None], props[:, :-1]], 1)
        block_pos = torch.where(live, cur_pos[:, None] + steps, torch.full_like(steps, -1))
        t_logits = teacher.logits(teacher(block, positions=block_pos, cache=t_cache).hidden).float()  # (B, g, V)
        if vocab_size is not None:
            t_logits[..., vocab_size:] = float("-inf")  # padded rows are never in the top-K nor sampled
        # 3. Accept left to right while the proposal is in the teacher's top-K.
        k = min(cfg.top_k, t_logits.shape[-1] if vocab_size is None else vocab_size)
        kth = t_logits.topk(k, dim=-1).values[..., -1:]  # (B, g, 1)
        in_top = (t_logits.gather(-1, props[..., None]) >= kth)[..., 0] & live  # ties at the K-th count as inside
        n_acc = torch.cumprod(in_top.long(), dim=1).sum(1)  # (B,) leading accepted proposals, <= g_row
        rejected = (n_acc < g_row) & ~done  # (B,)
        # 4. Replacement from the teacher at the first rejected position.
        # (Only drawn when some row rejected, so K = V consumes exactly the random draws of plain sampling.)
        repl = props[:, -1]
        if bool(rejected.any()):
            rej = n_acc.clamp(max=g - 1)
            repl = sample_next(t_logits[torch.arange(b, device=dev), rej], cfg.teacher_temperature,
                               top_p=cfg.teacher_top_p, generator=generator)
        last = props[torch.arange(b, device=dev), (g_row - 1).clamp(min=0)]  # (B,) p_{g_row}
        new_cur = torch.where(rejected, repl, last)
        for i in range(b):
            if done[i]:
                continue
            na, gi = int(n_acc[i]), int(g_row[i])
            toks = props[i, :na].tolist() + ([int(repl[i])] if na < gi else [])
            if eos_id is not None and eos_id in toks:
                toks = toks[: toks.index(eos_id) + 1]
            kept_student = min(na, len(toks))
            proposed += gi
            accepted += kept_student
            replaced += len(toks) - kept_student
            out[i] += toks
            if len(out[i]) >= max_new_tokens or (eos_id is not None and toks and toks[-1] == eos_id):
                done[i] = True
        # 5. Caches keep [.., cur, p1 .. p_m] (m = accepted, at most g_row - 1): the tokens before the new
        # `cur`. Rows finished before this round keep what they had (m = -1: nothing of this round).
        n_keep = torch.where(rejected, n_acc, g_row - 1)  # (B,) m
        keep = cur_pos + n_keep
        t_cache.rollback(keep)
        if bool(rejected.any()):
            # The student's cache holds [cur, p1 .. p_{g-1}]: back to the round's start, then re-feed
            # [cur, p1 .. p_m] per row in one forward (shorter rows padded with position -1).
            s_cache.restore(snap)
            width = int(n_keep.max()) + 1
            steps_w = torch.arange(width, device=dev)[None]
            refeed = torch.cat([cur[:, None], props[:, : width - 1]], 1)  # (B, width)
            refeed_pos = torch.where(steps_w <= n_keep[:, None], cur_pos[:, None] + steps_w, torch.full_like(steps_w, -1))
            student(refeed, positions=refeed_pos, cache=s_cache)
        cur, cur_pos = torch.where(g_row > 0, new_cur, cur), keep + 1
    student.train(s_mode), teacher.train(t_mode)
    return SKDResult([torch.tensor(o, dtype=torch.long) for o in out], proposed, accepted, replaced)


class SKDObjective(Objective):
    """Speculative KD: interleaved student proposals / teacher corrections become the training batch,
    trained with forward KL, sequence-mean (as the SKD repository's loss)."""

    name = "skd"

    def training_batch(self, batch: dict) -> tuple[dict, dict]:
        env = self.env
        prompts = [p.to(env.device) for p in batch["prompts"]]
        res = speculative_kd_sample(env.student, env.teacher, prompts, self.cfg, self.max_new_tokens(),
                                    eos_id=env.eos_id, pad_id=env.pad_id, vocab_size=env.vocab_size,
                                    generator=self.generator())
        new = to_device(build_sequences([p.cpu() for p in prompts], [r.cpu() for r in res.responses], env.pad_id),
                        env.device)
        logs = {
            "kd/skd_acceptance": res.acceptance_rate,
            "kd/skd_replaced": float(res.replaced),
            "kd/gen_len": float(sum(len(r) for r in res.responses) / max(len(res.responses), 1)),
        }
        return new, logs

    def loss(self, batch: dict, step: StepInfo, loss_fn) -> StepResult:
        batch, logs = self.training_batch(batch)
        total, count, parts, out = loss_fn(batch, "fkl", sequence_mean=True)
        return StepResult(total, count, parts, [out], logs)
