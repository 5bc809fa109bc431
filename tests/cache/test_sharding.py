"""Expert-sharded KV (SPEC §3): the training mask's rule, causality, and decode == masked parallel forward."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_rel

from pikv_train.cache.sharded_cache import ShardedKVCache
from pikv_train.cache.sharding import ExpertShardedKV, ShardingConfig, build_sharding, shard_membership
from pikv_train.models.config import ModelConfig, MoEConfig
from pikv_train.models.decoder import Decoder
from pikv_train.models.generation import generate
from pikv_train.models.hooks import AttentionContext
from pikv_train.routing import RouterConfig, RouterOutput


def _routing(ids, valid=None):
    ids = torch.as_tensor(ids)
    valid = torch.ones_like(ids, dtype=torch.bool) if valid is None else torch.as_tensor(valid)
    z = torch.zeros(ids.shape[0], 4)
    return RouterOutput(ids=ids, valid=valid, weights=valid.float(), logits=z, probs=z, counts=z[0], lse=z[:, 0])


def test_membership_and_rule_by_routing():
    # 6 tokens, 4 experts, 2 shards (expert e -> shard e % 2); no sinks, window 1 (diagonal only).
    ids = [[0, 2], [1, 3], [0, 1], [3, 3], [2, 0], [1, 1]]
    valid = [[True, True], [True, True], [True, False], [True, True], [True, True], [True, True]]
    r = _routing(ids, valid)
    member = shard_membership(r.ids, r.valid, 2)
    assert member.tolist() == [[True, False], [False, True], [True, False], [False, True], [True, False], [False, True]]
    hook = ExpertShardedKV(ShardingConfig(enabled=True, n_shards=2, n_sink=0, window=1), 4, 2, 1, 4)
    ctx = AttentionContext(layer_idx=1, positions=torch.arange(6)[None], routing_by_layer={0: r})
    q, k = torch.randn(1, 1, 6, 4), torch.randn(1, 1, 6, 4)
    mask = hook.training_mask(q, k, ctx)[0, 0]
    shard = [0, 1, 0, 1, 0, 1]
    want = [[j <= t and shard[j] == shard[t] for j in range(6)] for t in range(6)]
    assert mask.tolist() == want
    assert hook.training_mask(q, k, AttentionContext(layer_idx=0, positions=ctx.positions)) is None  # layer 0
    # Sinks and window add positional visibility.
    hook.cfg.n_sink, hook.cfg.window = 1, 2
    mask = hook.training_mask(q, k, AttentionContext(1, ctx.positions, {0: r}))[0, 0]
    want = [[j <= t and (shard[j] == shard[t] or j < 1 or t - j < 2) for j in range(6)] for t in range(6)]
    assert mask.tolist() == want


def test_by_score_picks_shard_with_best_mean_key_causally():
    hd = 2
    # Shard 0 keys point along +x, shard 1 along +y; queries along +y read shard 1 only.
    r = _routing([[0], [1], [0], [1], [0]])
    k = torch.tensor([[1.0, 0], [0, 1.0], [1.0, 0], [0, 1.0], [1.0, 0]])[None, None]
    q = torch.tensor([[0, 1.0]] * 5)[None, None]
    hook = ExpertShardedKV(ShardingConfig(enabled=True, n_sink=0, window=1, read_mode="by_score", read_shards=1), 2, 1, 1, hd)
    mask = hook.training_mask(q, k, AttentionContext(1, torch.arange(5)[None], {0: r}))[0, 0]
    # t=0: only shard 0 is non-empty (shard 1 empty -> -inf), so it reads shard 0; later rows read shard 1.
    assert mask[0].tolist() == [True, False, False, False, False]
    assert mask[2].tolist() == [False, True, True, False, False]  # shard 1 (j=1) + diagonal
    assert mask[4].tolist() == [False, True, False, True, True]


def _model(router="topk_balanced", top_k=2, n_experts=4, n_layer=3):
    torch.manual_seed(0)
    cfg = ModelConfig(
        n_layer=n_layer, n_head=4, n_kv_head=2, d_model=32, max_seq_len=64,
        moe=MoEConfig(n_experts=n_experts, d_expert=32, router=RouterConfig(name=router, top_k=top_k, k_min=1)),
    )
    return Decoder(cfg).eval()


@pytest.mark.parametrize(
    "router,kw",
    [
        ("topk_balanced", dict(read_mode="by_routing", n_sink=2, window=3)),
        ("topk_balanced", dict(read_mode="by_score", read_shards=2, n_sink=1, window=2)),
        ("pikv", dict(read_mode="by_routing", n_sink=0, window=1, n_shards=2)),
        ("topk_balanced", dict(read_mode="by_score", read_shards=1, n_sink=0, window=1)),
    ],
)
def test_decode_matches_masked_parallel_forward(router, kw):
    model = _model(router)
    cfg = ShardingConfig(enabled=True, **kw)
    hook = build_sharding(cfg, model.cfg)
    model.set_kv_sharding(hook)
    torch.manual_seed(1)
    ids = torch.randint(0, 258, (2, 20))
    with torch.no_grad():
        full = model(ids)
        ref = model.logits(full.hidden)
        frac = float(full.stats["router/kv_read_fraction"])
        assert 0 < frac < 1
        # Prefill 5 tokens, then one token at a time.
        cache = hook.new_cache(model.cfg.n_layer)
        pos = torch.arange(20).expand(2, 20)
        outs = [model(ids[:, :5], positions=pos[:, :5], cache=cache).hidden]
        for t in range(5, 20):
            outs.append(model(ids[:, t : t + 1], positions=pos[:, t : t + 1], cache=cache).hidden)
        got = model.logits(torch.cat(outs, 1))
    assert_close_rel(got, ref, 1e-5)
    # The sharded cache really reads less and stores by membership.
    assert 0 < cache.read_fraction() < 1
    full_bytes = model.cfg.n_layer * 2 * model.cfg.n_kv_head * model.cfg.head_dim * 4
    assert 0 < cache.bytes_per_token() < 3 * full_bytes
    assert set(cache.stats()) == {"router/kv_read_fraction", "cache/bytes_per_token"}


def test_sharded_cache_touches_only_read_shards_and_counts_bytes():
    # One row, 2 shards; a query routed to shard 0 only never concatenates shard 1's store.
    cfg = ShardingConfig(enabled=True, n_shards=2, n_sink=0, window=1)
    cache = ShardedKVCache(2, cfg, n_experts=2, rollback_slack=0)
    h, hd = 1, 2
    k = torch.arange(8.0).view(1, h, 4, hd)
    pos = torch.arange(4)[None]
    cache.record_routing(0, _routing([[0], [1], [1], [0]]))
    keys, _, mask = cache.update(1, torch.zeros(1, 1, 4, hd), k, k, pos)
    # Reads: window(4 columns) + shard 0 (2 tokens) + shard 1 (2 tokens): both shards read by someone.
    assert keys.shape[2] == 8
    assert mask.sum(-1).tolist() == [[[1, 1, 2, 2]]]  # t=2 sees 1,2; t=3 sees 0,3
    cache.record_routing(0, _routing([[0]]))
    keys, _, mask = cache.update(1, torch.zeros(1, 1, 1, hd), k[:, :, :1], k[:, :, :1], torch.tensor([[4]]))
    assert keys.shape[2] == 2 + 3  # window (truncated after the read) + shard 0 only (tokens 0, 3, 4)
    assert mask.sum().item() == 3  # 4 (window) + 0, 3 from shard 0
    # Bytes: layer 1 stores 5 shard entries + 1 window entry (layer 0 untouched in this direct test), each with
    # its K/V, an int64 position and 2 membership flags.
    assert cache.bytes_stored() == 6 * (2 * h * hd * 4 + 8 + 2)


def test_generate_with_sharded_cache_and_bad_config():
    model = _model()
    hook = build_sharding(ShardingConfig(enabled=True, window=2), model.cfg)
    model.set_kv_sharding(hook)
    g = generate(model, [torch.tensor([1, 2, 3]), torch.tensor([4, 5])], 4, temperature=0,
                 cache_factory=hook.cache_factory())
    assert g.tokens.shape == (2, 7)
    with pytest.raises(ValueError, match="window"):
        build_sharding(ShardingConfig(enabled=True, window=0), model.cfg)
    with pytest.raises(ValueError, match="n_shards"):
        build_sharding(ShardingConfig(enabled=True, n_shards=9), model.cfg)
    assert build_sharding(ShardingConfig(), model.cfg) is None


@pytest.mark.parametrize("read_mode", ["by_routing", "by_score"])
def test_rollback_equals_fresh_cache(read_mode):
    # Speculative decoding: append 4 proposals, roll back 3, continue; must equal never having seen them.
    model = _model()
    hook = build_sharding(ShardingConfig(enabled=True, n_sink=1, window=2, read_mode=read_mode, read_shards=2),
                          model.cfg)
    model.set_kv_sharding(hook)
    torch.manual_seed(2)
    ids = torch.randint(0, 258, (2, 12))
    junk = torch.randint(0, 258, (2, 4))
    pos = torch.arange(12).expand(2, 12)
    with torch.no_grad():
        a = hook.new_cache(model.cfg.n_layer)
        model(ids[:, :8], positions=pos[:, :8], cache=a)
        model(junk, positions=torch.arange(8, 12).expand(2, 4), cache=a)
        a.rollback(torch.tensor([8, 8]))  # keep positions <= 8 (the first proposal "accepted")
        b = hook.new_cache(model.cfg.n_layer)
        model(torch.cat([ids[:, :8], junk[:, :1]], 1), positions=pos[:, :9], cache=b)
        nxt = ids[:, 9:12]
        ha = model(nxt, positions=pos[:, 9:12], cache=a).hidden
        hb = model(nxt, positions=pos[:, 9:12], cache=b).hidden
    assert_close_rel(ha, hb, 1e-5)


@pytest.mark.parametrize("read_mode", ["by_routing", "by_score"])
def test_mask_is_causal(read_mode):
    # Changing token 7 never changes rows 0..6 of any layer's sharding mask.
    model = _model()
    masks = {}

    class Spy(ExpertShardedKV):
        def training_mask(self, q, k, ctx):
            m = super().training_mask(q, k, ctx)
            if m is not None:
                masks.setdefault(ctx.layer_idx, []).append(m)
            return m

    cfg = ShardingConfig(enabled=True, n_sink=1, window=1, read_mode=read_mode, read_shards=2)
    model.set_kv_sharding(Spy(cfg, 4, 2, model.cfg.n_kv_head, model.cfg.head_dim))
    torch.manual_seed(3)
    ids = torch.randint(0, 258, (1, 12))
    ids2 = ids.clone()
    ids2[0, 7:] = (ids2[0, 7:] + 1) % 258
    with torch.no_grad():
        model(ids)
        model(ids2)
    assert set(masks) == {1, 2}
    for a, b in masks.values():
        assert torch.equal(a[..., :7, :], b[..., :7, :])
