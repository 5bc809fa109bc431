"""The PiKV hybrid compressor (SPEC §6): full / 4-bit / 2-bit / evicted by the PiKVRouter's importance under one
byte budget. Decoding == training over routers, budgets and sharding; what the cache holds; the allocation rule."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import decode_tokenwise

from pikv_train.cache import CacheConfig, build_policy
from pikv_train.cache.compression import PiKVCompressor
from pikv_train.cache.sharding import ShardingConfig, build_sharding
from pikv_train.errors import ConfigError
from pikv_train.models import Decoder, ModelConfig
from pikv_train.models.config import MoEConfig
from pikv_train.routing import RouterConfig

T = 48
COMP = dict(name="pikv", group_size=4, recent=4, tier_every=4)
pytestmark = pytest.mark.usefixtures("one_thread")


def _model(router="pikv", byte_budget=0.3, sharding=None):
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=3, n_head=4, n_kv_head=2, d_model=32, max_seq_len=T,
                      moe=MoEConfig(n_experts=4, d_expert=32, router=RouterConfig(name=router, top_k=2, k_min=1)))
    model = Decoder(cfg)
    with torch.no_grad():  # peaky attention, and importance scores that differ between tokens
        for blk in model.blocks:
            blk.attn.q_proj.weight.mul_(20.0)
            blk.attn.kv_proj.weight[: cfg.n_kv_head * cfg.head_dim].mul_(20.0)
            if router == "pikv":
                blk.ffn.router.importance_head.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(3))
    if sharding:
        model.set_kv_sharding(build_sharding(ShardingConfig(enabled=True, read_mode=sharding, n_sink=1, window=3,
                                                            read_shards=1), cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.set_cache_policy(build_policy(CacheConfig(compressor={**COMP, "byte_budget": byte_budget}), cfg))
    return model.eval()


CASES = [("pikv", 0.8, None), ("pikv", 0.3, "by_score"), ("pikv", 0.1, "by_routing"),
         ("topk_balanced", 0.3, None), ("topk_balanced", 0.1, "by_score"), ("pikv", 0.3, None)]


@pytest.mark.parametrize("router,budget,sharding", CASES)
def test_pikv_decodes_as_it_trained(router, budget, sharding):
    """SPEC §7: token-by-token decoding with the PiKV cache equals the training forward: no eviction (0.8), tiers
    then eviction (0.3), eviction from the start (0.1); with the router's importance and the attention fallback."""
    model = _model(router, budget, sharding)
    x = torch.randint(0, 258, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        train = model.logits(model(x).hidden)
        cache = model.new_cache()
        dec = decode_tokenwise(model, cache, x, 7)
        model.set_cache_policy(None)
        plain = model.logits(model(x).hidden)
    scale = float(train.abs().max())
    torch.testing.assert_close(dec, train, rtol=1e-4, atol=1e-4 * scale)
    assert float((plain - train).abs().max()) > 1e-3 * scale
    held = cache.head_lengths(2)
    assert (held == T).all() if budget == 0.8 else (held < T).all()  # eviction only below the 2-bit floor


def test_eviction_keeps_the_payload_within_the_byte_budget():
    model = _model("pikv", 0.3)
    comp = model.cache_policy.compressor
    x = torch.randint(0, 258, (1, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache = model.new_cache()
        decode_tokenwise(model, cache, x, 1)
    full, _, low = comp.token_bytes(4)
    for layer in range(3):
        for st in cache.store[layer][0]:
            store = st["kv"]
            payload = store.nbytes() - store.imp.numel() * 8 - store.tier.numel()
            # decided at position 44 (the last boundary): <= 30% of 44 tokens at full precision, + 4 tokens since
            assert payload <= 0.3 * 44 * full + 4 * full
            assert store.tier.tolist().count(0) == 4 + 4  # only the recent window + the tokens since, at full
            assert len(st["pos"]) == 8 + int((0.3 * 44 * full - 4 * full) // low)  # the rest at 2 bits, no more


def test_each_decision_evicts_the_least_important_candidates():
    cfg = ModelConfig(n_layer=1, n_head=4, n_kv_head=2, d_model=32, max_seq_len=T)
    from pikv_train.cache.compression import CompressorConfig

    comp = PiKVCompressor(CompressorConfig.from_any({**COMP, "byte_budget": 0.3}), cfg)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, h, T, 8, generator=g) for h in (4, 2, 2))
    imp = torch.rand(2, T, generator=g)
    ver = comp.versions(0, k, v, q=q, importance=imp)
    ev, tier = ver.chunk_evicted, ver.chunk_tier  # (B, H_kv, nC, T)
    j = torch.arange(T)
    n_checked = 0
    for ci in range(1, ev.shape[2]):
        s0 = 4 * ci
        new = ev[:, :, ci] & ~ev[:, :, ci - 1]
        stay = (j < s0 - 4) & ~ev[:, :, ci]  # candidates that stayed
        for b in range(2):
            for h in range(2):
                if new[b, h].any() and stay[b, h].any():
                    assert float(imp[b][new[b, h]].max()) <= float(imp[b][stay[b, h]].min())
                    n_checked += 1
        assert not (ev[:, :, ci - 1] & ~ev[:, :, ci]).any()  # an evicted token never returns
        assert ((tier[:, :, ci] >= tier[:, :, ci - 1]) | ev[:, :, ci]).all()  # tiers only go down
    assert n_checked > 5
    assert torch.equal(ev[:, 0], ev[:, 1])  # one static importance per token: the kv-heads agree


def test_allocation_rule():
    cfg = ModelConfig(n_layer=1, n_head=2, n_kv_head=1, d_model=32)  # head_dim 16
    from pikv_train.cache.compression import CompressorConfig

    comp = PiKVCompressor(CompressorConfig.from_any({**COMP, "byte_budget": 0.5}), cfg)
    full, mid, low = comp.token_bytes(4)  # 128, 2 * (8 + 32) = 80, 2 * (4 + 32) = 72
    assert (full, mid, low) == (128, 80, 72)
    x, keep = comp.allocate(130, None, torch.tensor(10), torch.tensor(80), 4)  # 8320 >= 1280 + 5760: no eviction
    assert int(keep) == 80 and int(x) == (8320 - 1280 - 5760) // (128 + 80 - 2 * 72) == 20
    x, keep = comp.allocate(100, None, torch.tensor(10), torch.tensor(40), 4)  # x capped at half the candidates
    assert int(keep) == 40 and int(x) == 20
    x, keep = comp.allocate(40, None, torch.tensor(10), torch.tensor(30), 4)  # 2560 < 1280 + 2160: evict
    assert int(x) == 0 and int(keep) == (2560 - 1280) // 72


def test_the_log_says_when_the_tiers_fall_back_to_accumulated_attention():
    with pytest.warns(UserWarning, match="no importance head; the tiers rank by accumulated attention"):
        _model_with_warnings("topk_balanced")
    with pytest.warns(UserWarning, match="layer 0 has no router before it"):
        _model_with_warnings("pikv")


def _model_with_warnings(router):
    cfg = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=T,
                      moe=MoEConfig(n_experts=4, d_expert=32, router=RouterConfig(name=router, top_k=2, k_min=1)))
    model = Decoder(cfg)
    model.set_cache_policy(build_policy(CacheConfig(compressor=COMP), cfg))
    return model


def test_pikv_beside_another_policy_is_a_one_line_error():
    with pytest.raises(ConfigError, match="compressor.name=pikv chooses which tokens stay") as e:
        CacheConfig(policy="h2o", compressor="pikv").validate()
    assert "\n" not in str(e.value)
