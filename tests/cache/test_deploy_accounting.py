"""What the deployed cache holds and reports: snapshot/restore instead of rollback for evicting caches, honest
bytes, one copy per key under sharding, statistics on the FlexAttention (CUDA) path, settings that would
silently do nothing."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import decode_tokenwise

from pikv_train.cache import CacheConfig, KVCache, build_policy
from pikv_train.cache.sharding import ShardingConfig, build_sharding
from pikv_train.errors import RollbackError
from pikv_train.models import Decoder, ModelConfig
from pikv_train.models.config import MoEConfig

T = 32
pytestmark = pytest.mark.usefixtures("one_thread")


def _moe(n_layer=3):
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=n_layer, n_head=4, n_kv_head=2, d_model=32, max_seq_len=T,
                      moe=MoEConfig(n_experts=4, d_expert=32))
    model = Decoder(cfg)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.q_proj.weight.mul_(20.0)
    return model.eval()


def test_evicting_cache_refuses_rollback_and_snapshot_restore_is_exact():
    model = _moe()
    model.set_cache_policy(build_policy(CacheConfig(policy="h2o", budget=0.25, chunk_size=1), model.cfg))
    x = torch.randint(0, 258, (2, T))
    cache = model.new_cache()
    with torch.no_grad():
        decode_tokenwise(model, cache, x[:, :12], 12)
        with pytest.raises(RollbackError, match="snapshot"):
            cache.rollback(torch.tensor([5, 5]))
        snap = cache.snapshot()
        pos = torch.arange(12, 20).expand(2, 8)
        first = model.logits(model(x[:, 12:20], positions=pos, cache=cache).hidden)
        model(torch.randint(0, 258, (2, 8)), positions=pos, cache=cache)  # a rejected speculative block
        cache.restore(snap)
        again = model.logits(model(x[:, 12:20], positions=pos, cache=cache).hidden)
    assert torch.equal(first, again)
    assert cache.policy is model.cache_policy  # the policy is shared, not copied


def test_bytes_stored_counts_positions_and_policy_state():
    model = _moe()
    x = torch.randint(0, 258, (1, T))
    plain = KVCache(model.cfg.n_layer)
    with torch.no_grad():
        decode_tokenwise(model, plain, x, 4)
    kv = model.cfg.n_layer * T * 2 * model.cfg.n_kv_head * model.cfg.head_dim * 4
    assert plain.bytes_stored() == kv + model.cfg.n_layer * T * 8  # + an int64 position per token and layer
    model.set_cache_policy(build_policy(CacheConfig(policy="h2o", budget=8), model.cfg))
    cache = model.new_cache()
    with torch.no_grad():
        decode_tokenwise(model, cache, x, 4)
    stored = sum(int(cache.head_lengths(i).sum()) for i in range(model.cfg.n_layer))
    assert stored == model.cfg.n_layer * model.cfg.n_kv_head * 8  # the budget: 8 keys per head
    # K/V + position + H2O's track (position, index, accumulated attention, keep flag) per key.
    assert cache.bytes_stored() == stored * (2 * model.cfg.head_dim * 4 + 8 + 8 + 8 + 8 + 1)


def test_sharded_deployed_cache_stores_each_key_once():
    model = _moe()
    model.set_kv_sharding(build_sharding(ShardingConfig(enabled=True, n_sink=1, window=2), model.cfg))
    x = torch.randint(0, 258, (2, T))
    cache = model.new_cache()
    with torch.no_grad():
        train = model.logits(model(x).hidden)
        dec = decode_tokenwise(model, cache, x, 5)
        copies = model.kv_sharding.new_cache(model.cfg.n_layer)  # the per-shard layout (a copy per shard)
        decode_tokenwise(model, copies, x, 5)
    torch.testing.assert_close(dec, train, rtol=1e-4, atol=1e-4 * float(train.abs().max()))
    n_kv = sum(int(cache.head_lengths(i).sum()) for i in range(model.cfg.n_layer))
    assert n_kv == model.cfg.n_layer * 2 * model.cfg.n_kv_head * T  # one entry per token, layer and kv-head
    assert cache.bytes_stored() < copies.bytes_stored()


def _sdpa_and_flex_stats(model) -> tuple[dict, dict]:
    """Hook statistics of one forward on the SDPA (CPU) path and on the FlexAttention (CUDA) path, run eagerly."""
    x = torch.randint(0, 258, (2, T))
    with torch.no_grad():
        ref = model(x).stats
        model.cache_policy.use_flex = True
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ref, model(x).stats


@pytest.mark.parametrize("name,kw", [("h2o", dict(chunk_size=4)), ("streaming_llm", {}), ("quest", dict(page_size=4, quest_dense_layers=0))])
def test_cache_statistics_are_logged_on_the_flexattention_path(name, kw):
    """The CUDA path builds no dense mask; its cache/* statistics come from the same mask_mod and equal the
    SDPA path's (run eagerly on CPU here)."""
    model = _moe(n_layer=2)
    model.set_cache_policy(build_policy(CacheConfig(policy=name, budget=0.5, **kw), model.cfg))
    ref, flex = _sdpa_and_flex_stats(model)
    keys = [k for k in ref if k.startswith("cache/")]
    assert {"cache/kept_fraction", "cache/budget_use", "cache/bytes_stored"} <= set(keys)
    for key in keys:
        torch.testing.assert_close(torch.as_tensor(flex[key]), torch.as_tensor(ref[key]), rtol=1e-6, atol=0)


def test_quest_on_a_model_with_too_few_layers_warns():
    with pytest.warns(UserWarning, match="quest_dense_layers"):
        build_policy(CacheConfig(policy="quest", budget=0.5, quest_dense_layers=2), ModelConfig.preset("nano"))


def test_duo_attention_penalty_keeps_its_weight_when_router_losses_are_off():
    from pikv_train.tasks import DistillationTask
    from pikv_train.tasks.distill import DistillLossConfig
    from pikv_train.tasks.teacher import TeacherConfig

    task = DistillationTask(student=ModelConfig.preset("nano-moe", n_head=4, n_kv_head=2),
                            teacher=TeacherConfig(checkpoint="unused.ckpt"),
                            loss=DistillLossConfig(router_loss_weight=0.0),
                            cache=CacheConfig(policy="duo_attention", budget=16, duo_l1_weight=0.5))
    task.log = task.log_dict = lambda *a, **k: None
    ids = torch.randint(0, 258, (2, T))

    def no_kd(batch, divergence, **kw):  # the divergence itself is tested elsewhere: isolate the penalty
        out = task.student(batch["input_ids"])
        zero = out.hidden.sum() * 0
        return zero, torch.tensor(1.0), {"kd": zero, "ce": zero, "agreement": zero}, out

    task.distill_loss = no_kd
    task.objective.env = object()  # bound: no teacher or data needed to isolate the penalty
    task.training_step({"input_ids": ids}, 0).backward()
    gates = task.student.cache_policy.gates
    # d/dg of 0.5 * mean|g| with g = 1: 0.5 / n_gates each (the L1 term alone, the KD term is zero)
    torch.testing.assert_close(gates.grad, torch.full_like(gates, 0.5 / gates.numel()))


def test_duo_attention_soft_gate_statistics_are_the_streaming_view_on_every_path():
    model = _moe(n_layer=2)
    model.set_cache_policy(build_policy(CacheConfig(policy="duo_attention", budget=8, n_sink=2), model.cfg))
    model.train()
    ref, flex = _sdpa_and_flex_stats(model)
    n = torch.arange(1, T + 1, dtype=torch.float32)
    expected = (n.clamp(max=8) / n).mean()  # 2 sinks + 6 recent keys per row
    torch.testing.assert_close(torch.as_tensor(ref["cache/kept_fraction"]), expected)
    torch.testing.assert_close(torch.as_tensor(flex["cache/kept_fraction"]), expected)


def test_flexgen_cache_with_sharding_refuses_rollback():
    model = _moe()
    model.set_kv_sharding(build_sharding(ShardingConfig(enabled=True, read_mode="by_score", read_shards=1), model.cfg))
    model.set_cache_policy(build_policy(CacheConfig(policy="flexgen", budget=8), model.cfg))
    cache = model.new_cache()
    with torch.no_grad():
        decode_tokenwise(model, cache, torch.randint(0, 258, (1, 12)), 12)
    with pytest.raises(RollbackError, match="snapshot"):
        cache.rollback(torch.tensor([5]))


def test_new_cache_works_as_a_cache_factory():
    model = _moe()
    model.set_cache_policy(build_policy(CacheConfig(policy="h2o", budget=0.25), model.cfg))
    assert model.new_cache(model.cfg.n_layer).budget == 8  # n_layer is not taken for a reference length
    with pytest.raises(ValueError, match="layers"):
        model.new_cache(2)


def test_a_chunk_size_above_the_recent_window_warns():
    pol = build_policy(CacheConfig(policy="lru", budget=16, chunk_size=32), ModelConfig.preset("nano"))
    with pytest.warns(UserWarning, match="chunk_size=32 exceeds the recent window"):
        assert pol.sizes(16)[3] == 6  # 4 sinks, then 12 keys split into a window of 6 and 6 heavy slots


def test_pikv_importance_target_is_the_same_on_the_flexattention_path():
    """PiKVRouter's importance head regresses on the attention mass under the policy's mask on every device."""
    from pikv_train.routing import RouterConfig

    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=T,
                      moe=MoEConfig(n_experts=4, d_expert=32, router=RouterConfig(name="pikv", top_k=2, k_min=1)))
    model = Decoder(cfg)
    model.set_cache_policy(build_policy(CacheConfig(policy="h2o", budget=0.25, chunk_size=4), cfg))
    model.train()
    x = torch.randint(0, 258, (2, T))
    with torch.no_grad():
        ref = [r.losses["importance"] for r in model(x).routing]
        model.cache_policy.use_flex = True
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flex = [r.losses["importance"] for r in model(x).routing]
    torch.testing.assert_close(torch.stack(flex), torch.stack(ref), rtol=1e-5, atol=0)


def test_per_shard_budgets_bound_what_the_sharded_cache_stores():
    """kv_sharding.shard_budget: each shard holds its most recent members only; the deployed cache drops a key
    no shard, sink or window shows any more, so it stores at most sinks + window + n_shards * shard_budget keys
    per head, and decoding still equals the training mask."""
    model = _moe()
    cfg = ShardingConfig(enabled=True, n_sink=1, window=2, shard_budget=3)
    model.set_kv_sharding(build_sharding(cfg, model.cfg))
    x = torch.randint(0, 258, (2, T))
    cache = model.new_cache()
    with torch.no_grad():
        train = model.logits(model(x).hidden)
        dec = decode_tokenwise(model, cache, x, 5)
        model.kv_sharding.cfg.shard_budget = None
        unbounded = model.logits(model(x).hidden)
    torch.testing.assert_close(dec, train, rtol=1e-4, atol=1e-4 * float(train.abs().max()))
    assert float((unbounded - train).abs().max()) > 1e-3 * float(train.abs().max())  # the budget really acts
    for layer in (1, 2):  # sharded layers (layer 0 has no previous router)
        assert int(cache.head_lengths(layer).max()) <= 1 + 2 + 4 * 3
    assert int(cache.head_lengths(0).min()) == T  # unsharded layer keeps everything
    with pytest.raises(ValueError, match="shard_budget"):
        build_sharding(ShardingConfig(enabled=True, shard_budget=2), model.cfg).new_cache(3)
    with pytest.raises(ValueError, match="shard_budget=0"):
        build_sharding(ShardingConfig(enabled=True, shard_budget=0), model.cfg)
