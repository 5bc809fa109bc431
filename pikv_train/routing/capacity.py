"""Causal expert capacity: which routed assignments an over-full expert drops (SPEC §2).

Capacity is counted **per sequence**: each (sequence, expert) pair has ``C = ceil(k * L * cf / E)``
places, where ``L`` is a fixed reference length (the model's ``max_seq_len``; see
:attr:`RouterConfig.capacity_factor`), so C does not depend on the batch. A dropped assignment is not
processed by its expert (the token keeps its other experts and the residual). Both policies are causal:
whether token t of a sequence keeps an expert depends only on tokens ``<= t`` of the same sequence, so
perturbing later tokens or other sequences of the batch never changes it, and token-by-token decoding
(with the state kept in the inference cache, :func:`new_capacity_state`) makes the same decisions as the
parallel forward.

* ``position``: inside each sequence the assignments queue token-major (all of token t's assignments
  after those of tokens < t; a token's own k slots in its own rank order, although they always go to
  different experts so their order never matters). An assignment is kept iff fewer than C earlier
  assignments of its sequence went to its expert. This **bounds the load**: at most C assignments per
  (sequence, expert).
* ``probability``: an online top-C by the router probability (the pre-normalisation ``probs`` of the
  chosen expert, not the renormalised combine weight). Assignment (t, e) is kept iff fewer than C
  assignments to e at positions < t of the same sequence have a probability >= its own (equal
  probabilities rank the earlier token first). So every kept assignment is among the C most probable
  assignments to its expert in the prefix that ends at it, the most probable assignment of any queue is
  always kept, and a token is dropped only because C earlier tokens of its own sequence wanted the expert
  more. What it does **not** do is bound the load: an assignment that arrives later with a higher
  probability cannot evict one already processed (that would be acausal), so with n assignments to an
  expert the kept count is between min(n, C) and n (n when probabilities increase along the sequence);
  for probabilities in random order its expectation is ``C * (1 + H_n - H_C) ~ C * (1 + ln(n / C))``.
  What it bounds is the rank: no kept assignment has C more probable predecessors. Use ``position`` when
  a hard bound on expert work is needed.

Padding tokens (position -1, left padding in batched generation) hold no place in any queue and are
never dropped (their output is unused).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

POLICIES = ("position", "probability")
_PAIR_BUDGET = 1 << 24
"""Largest (queries x keys) comparison block of the probability policy, in elements."""


def capacity_slots(top_k: int, seq_len: int, capacity_factor: float, n_experts: int) -> int:
    """``C = ceil(top_k * seq_len * capacity_factor / n_experts)``: places per (sequence, expert)."""
    return math.ceil(top_k * seq_len * capacity_factor / n_experts)


def new_capacity_state(capacity: int, policy: str) -> dict:
    """Empty decoding state of one MoE layer: the assignments of earlier calls, per sequence.

    A plain dict of tensors (so snapshot / restore / byte accounting of ``cache.extra`` see tensors):
    ``pos`` (B, S) positions of the tokens seen (-1: padding or discarded), ``ids`` (B, S, K),
    ``live`` (B, S, K) bool (the assignment holds a queue place), ``prio`` (B, S, K) fp32 (probability
    policy only), plus ``capacity`` and ``policy`` for checks.
    """
    if policy not in POLICIES:
        raise ValueError(f"drop_policy must be 'position' or 'probability', got {policy!r}")
    return {"capacity": int(capacity), "policy": policy, "pos": None, "ids": None, "live": None, "prio": None}


def _trim(state: dict, first_pos: Tensor) -> None:
    """Forget stored assignments at positions >= each row's first new position (a rolled-back cache
    re-feeds those positions; in plain decoding nothing is forgotten)."""
    stale = state["pos"] >= first_pos[:, None]  # (B, S)
    if bool(stale.any()):
        state["pos"] = state["pos"].masked_fill(stale, -1)
        state["live"] = state["live"] & ~stale[..., None]


def _append(state: dict, pos: Tensor, ids: Tensor, live: Tensor, prio: Tensor | None) -> None:
    new = {"pos": pos, "ids": ids, "live": live, "prio": prio}
    for name, t in new.items():
        if t is None:
            continue
        state[name] = t if state[name] is None else torch.cat([state[name], t], dim=1)


def _position_rank(ids: Tensor, live: Tensor, n_experts: int) -> Tensor:
    """(B, T, K) number of earlier live assignments (token-major, same row, same expert) of each slot."""
    b, t, k = ids.shape
    flat = ids.reshape(b, t * k)
    key = torch.where(live.reshape(b, t * k), flat, torch.full_like(flat, n_experts))
    key = (key + torch.arange(b, device=ids.device)[:, None] * (n_experts + 1)).reshape(-1)  # (B*T*K,)
    sorted_key, perm = torch.sort(key, stable=True)  # stable: token-major order inside each queue
    counts = torch.bincount(sorted_key, minlength=b * (n_experts + 1))
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(key)
    rank[perm] = torch.arange(key.numel(), device=ids.device) - starts[sorted_key]
    return rank.reshape(b, t, k)


def _probability_rank(ids: Tensor, live: Tensor, prio: Tensor, keys: tuple[Tensor, Tensor, Tensor] | None = None
                      ) -> Tensor:
    """(B, T, K) number of live assignments of the same row and expert, at an earlier token, whose
    priority is >= the query's. Keys: the queries themselves (``keys=None``: earlier tokens of the chunk)
    or the (ids, live, prio) (B, S, K) of earlier calls (all earlier than every query). Compared in
    blocks of query tokens to bound memory."""
    b, t, k = ids.shape
    own = keys is None
    k_ids, k_live, k_prio = (ids, live, prio) if own else keys
    s = k_ids.shape[1]
    out = torch.zeros(b, t, k, dtype=torch.long, device=ids.device)
    block = max(1, _PAIR_BUDGET // max(1, b * k * s * k))
    for t0 in range(0, t, block):
        t1 = min(t, t0 + block)
        end = t1 if own else s  # a chunk's own keys: only tokens before the block's end can be earlier
        kk = k_ids[:, :end].reshape(b, 1, end * k)
        kl = k_live[:, :end].reshape(b, 1, end * k)
        kp = k_prio[:, :end].reshape(b, 1, end * k)
        qi = ids[:, t0:t1].reshape(b, -1, 1)
        qp = prio[:, t0:t1].reshape(b, -1, 1)
        beats = kl & (kk == qi) & (kp >= qp)  # (B, Tb*K, end*K)
        if own:  # strictly earlier tokens only
            kt = torch.arange(end, device=ids.device).repeat_interleave(k)[None, None, :]
            qt = torch.arange(t0, t1, device=ids.device).repeat_interleave(k)[None, :, None]
            beats = beats & (kt < qt)
        out[:, t0:t1] = beats.sum(-1).reshape(b, t1 - t0, k)
    return out


def apply_capacity(
    ids: Tensor,
    valid: Tensor,
    weights: Tensor,
    n_experts: int,
    capacity: int,
    policy: str,
    priority: Tensor | None = None,
    *,
    n_seq: int = 1,
    positions: Tensor | None = None,
    state: dict | None = None,
) -> tuple[Tensor, Tensor]:
    """Drop the assignments beyond their expert's capacity, causally and per sequence (module docstring).

    Args:
        ids, valid, weights: (N, K) routing decisions, N = n_seq * T tokens in sequence-major order.
        capacity: C, places per (sequence, expert).
        policy: "position" or "probability".
        priority: (N, K) router probability of each chosen expert (required by "probability").
        n_seq: number of sequences B in the N tokens.
        positions: (N,) or (B, T) absolute positions; -1 marks padding (holds no place, never dropped).
        state: decoding state from :func:`new_capacity_state`: earlier calls' assignments of the same
            sequences count as earlier tokens, and this call's assignments are appended (in place).
            None (training): the N tokens are whole sequences.
    Returns:
        (valid, weights) with dropped assignments cleared.
    """
    if policy not in POLICIES:
        raise ValueError(f"drop_policy must be 'position' or 'probability', got {policy!r}")
    if policy == "probability" and priority is None:
        raise ValueError("drop_policy='probability' needs the router probabilities of the chosen experts")
    n, k = ids.shape
    if n_seq < 1 or n % n_seq:
        raise ValueError(f"{n} tokens do not split into n_seq={n_seq} sequences")
    b, t = n_seq, n // n_seq
    dev = ids.device
    ids3, valid3 = ids.reshape(b, t, k), valid.reshape(b, t, k)
    if positions is None:
        if state is not None:
            raise ValueError("apply_capacity with a decoding state needs the tokens' absolute positions")
        pos = torch.arange(t, device=dev).expand(b, t)
        real = torch.ones(b, t, dtype=torch.bool, device=dev)
    else:
        pos = positions.reshape(b, t).to(dev)
        real = pos >= 0
    live = valid3 & real[..., None]  # (B, T, K) assignments that hold a queue place
    prio3 = None if priority is None or policy != "probability" else priority.detach().float().reshape(b, t, k)
    if state is not None:
        if state["capacity"] != capacity or state["policy"] != policy:
            raise ValueError(
                f"capacity state was built for C={state['capacity']} ({state['policy']}), now C={capacity} "
                f"({policy}); use a fresh inference cache"
            )
        if state["pos"] is not None:
            if state["pos"].shape[0] != b:
                raise ValueError(f"capacity state holds {state['pos'].shape[0]} sequences, this call has {b}")
            big = torch.iinfo(torch.long).max
            _trim(state, torch.where(real, pos, torch.full_like(pos, big)).min(1).values)
    has_past = state is not None and state["pos"] is not None
    if policy == "position":
        rank = _position_rank(ids3, live, n_experts)
        if has_past:
            past = torch.zeros(b, n_experts + 1, dtype=torch.long, device=dev)
            h_ids = torch.where(state["live"], state["ids"], torch.full_like(state["ids"], n_experts))
            past.scatter_add_(1, h_ids.reshape(b, -1), torch.ones_like(h_ids.reshape(b, -1)))
            rank = rank + past.gather(1, ids3.reshape(b, -1).clamp(0, n_experts - 1)).reshape(b, t, k)
    else:
        rank = _probability_rank(ids3, live, prio3)
        if has_past:
            rank = rank + _probability_rank(ids3, live, prio3, (state["ids"], state["live"], state["prio"]))
    keep = live & (rank < capacity)
    keep = torch.where(real[..., None], keep, valid3)  # padding: untouched
    if state is not None:
        _append(state, pos, ids3, live, prio3)
    keep = keep.reshape(n, k)
    return keep, weights * keep
