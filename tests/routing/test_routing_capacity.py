"""Causal expert capacity end to end (issue 10, item 5): on a small decoder with capacity dropping tokens,
earlier logits do not depend on later tokens nor on other sequences of the batch, and token-by-token
decoding with the inference cache equals the parallel forward."""

from __future__ import annotations

import pytest
import torch

from pikv_train.cache import KVCache
from pikv_train.models import Decoder, ModelConfig, MoEConfig
from pikv_train.models.generation import left_pad
from pikv_train.routing import RouterConfig

from helpers import assert_close_rel

T = 24


def _model(top_k=2, policy="position", cf=None, name="topk_balanced", kernel="eager", seed=0):
    torch.manual_seed(seed)
    # E = 4, max_seq_len = 64: C = ceil(k * 64 * cf / 4) = 4 for both k below, well under the ~6k
    # assignments an expert receives from a 24-token sequence, so drops start early in every sequence.
    cf = cf if cf is not None else 0.125 * 2 / top_k
    router = RouterConfig(name=name, top_k=top_k, capacity_factor=cf, drop_policy=policy, kernel=kernel,
                          p_threshold=0.7)
    cfg = ModelConfig(n_layer=2, n_head=2, n_kv_head=1, d_model=32, max_seq_len=64,
                      moe=MoEConfig(n_experts=4, d_expert=32, router=router))
    model = Decoder(cfg).eval()
    with torch.no_grad():  # peakier routers than the default init, so that probabilities differ clearly
        for b in model.blocks:
            b.ffn.router.gate.weight.mul_(30.0)
    return model


@torch.no_grad()
def _logits_and_drops(model, ids, **kw):
    out = model(ids, **kw)
    return model.logits(out.hidden), sum(float(r.stats["dropped"]) for r in out.routing)


def _close(a, b):
    assert_close_rel(a, b, 1e-5)


CASES = [(k, policy, name, kernel) for k in (1, 2) for policy in ("position", "probability")
         for name, kernel in (("topk_balanced", "eager"), ("topk_balanced", "reference"))]
CASES += [(2, "position", "adaptive", "eager"), (2, "probability", "adaptive", "eager")]


@pytest.mark.parametrize("k,policy,name,kernel", CASES)
def test_future_tokens_and_other_sequences_do_not_change_earlier_logits(k, policy, name, kernel):
    model = _model(k, policy, name=name, kernel=kernel)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2, T), generator=g)
    ref, drops = _logits_and_drops(model, ids)
    assert drops > 0
    # Only future tokens change (t >= 12): logits at t < 12 unchanged.
    fut = ids.clone()
    fut[:, 12:] = torch.randint(0, 256, (2, T - 12), generator=g)
    out, _ = _logits_and_drops(model, fut)
    _close(out[:, :12], ref[:, :12])
    # Only the other sequence changes (either one): the unchanged sequence's logits are unchanged.
    for changed in (0, 1):
        other = ids.clone()
        other[changed] = torch.randint(0, 256, (T,), generator=g)
        out, _ = _logits_and_drops(model, other)
        _close(out[1 - changed], ref[1 - changed])
    # A batch of one gives the same as inside the batch.
    alone, _ = _logits_and_drops(model, ids[:1])
    _close(alone[0], ref[0])


@pytest.mark.parametrize("k,policy,name,kernel", CASES)
def test_cached_decoding_equals_parallel_forward_with_capacity(k, policy, name, kernel):
    model = _model(k, policy, name=name, kernel=kernel)
    ids = torch.randint(0, 256, (3, T), generator=torch.Generator().manual_seed(2))
    full, drops = _logits_and_drops(model, ids)
    assert drops > 0
    cache = KVCache(model.cfg.n_layer)
    pos = torch.arange(T).expand(3, T)
    step, d = _logits_and_drops(model, ids[:, :5], positions=pos[:, :5], cache=cache)
    outs, dec_drops = [step], d
    for t in range(5, T):
        step, d = _logits_and_drops(model, ids[:, t : t + 1], positions=pos[:, t : t + 1], cache=cache)
        outs.append(step)
        dec_drops += d
    _close(torch.cat(outs, 1), full)
    assert dec_drops == drops
    assert ("moe_capacity", 0) in cache.extra and ("moe_capacity", 1) in cache.extra


@pytest.mark.parametrize("policy", ["position", "probability"])
def test_rolled_back_decoding_equals_parallel_forward(policy):
    # Speculative decoding feeds proposals, rolls the cache back and re-feeds: the capacity queues forget
    # the rolled-back positions.
    model = _model(2, policy)
    ids = torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(3))
    full, _ = _logits_and_drops(model, ids)
    cache = KVCache(model.cfg.n_layer)
    pos = torch.arange(T).expand(2, T)
    outs = [_logits_and_drops(model, ids[:, :10], positions=pos[:, :10], cache=cache)[0]]
    junk = torch.randint(0, 256, (2, 4), generator=torch.Generator().manual_seed(4))
    _logits_and_drops(model, junk, positions=pos[:, 10:14], cache=cache)
    cache.rollback(torch.full((2,), 9))
    for t in range(10, T):
        outs.append(_logits_and_drops(model, ids[:, t : t + 1], positions=pos[:, t : t + 1], cache=cache)[0])
    _close(torch.cat(outs, 1), full)


@pytest.mark.parametrize("policy", ["position", "probability"])
def test_left_padding_takes_no_capacity(policy):
    model = _model(2, policy)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (n,), generator=g) for n in (20, 9, 14)]
    ids, pos = left_pad(prompts, pad_id=257)
    batched = _logits_and_drops(model, ids, positions=pos, cache=KVCache(2))[0][:, -1]  # (B, V)
    for i, p in enumerate(prompts):
        _close(batched[i], _logits_and_drops(model, p[None])[0][0, -1])


def test_capacity_uses_max_seq_len_and_needs_cache_state():
    model = _model(2, "position", cf=0.5)
    router = model.blocks[0].ffn.router
    assert router.max_seq_len == 64 and router.capacity(5) == router.capacity(60) == 16  # ceil(2*64*.5/4)

    class NoExtra(KVCache):
        def __init__(self, n):
            super().__init__(n)
            del self.extra

    with pytest.raises(ValueError, match="extra"):
        model(torch.zeros(1, 3, dtype=torch.long), positions=torch.arange(3)[None], cache=NoExtra(2))
    model.blocks[0].ffn.router.cfg.capacity_factor = None
    model.blocks[1].ffn.router.cfg.capacity_factor = None
    model(torch.zeros(1, 3, dtype=torch.long), positions=torch.arange(3)[None], cache=NoExtra(2))  # dropless: fine
