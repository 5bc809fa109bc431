"""LoRA / LoRA+ (SPEC §8): at init the adapted model equals the base; only adapters (and what the options keep) train;
merged equals unmerged; LoRA+ puts B in its own optimizer group at lora_plus_ratio x lr; bad settings are one line."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_rel

from pikv_train.cache import CacheConfig, build_policy
from pikv_train.errors import ConfigError
from pikv_train.models import Decoder, ModelConfig
from pikv_train.models.build import build_decoder
from pikv_train.models.lora import LoRAConfig, LoRALinear, apply_lora, merge_lora
from pikv_train.tasks.base import LORA_GROUP, OptimConfig, build_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _model() -> Decoder:
    torch.manual_seed(0)
    return Decoder(ModelConfig.preset("nano-moe", max_seq_len=32)).eval()


def _x():
    return torch.randint(0, 258, (2, 16), generator=torch.Generator().manual_seed(1))


def test_adapted_model_equals_the_base_at_init_and_adapts_the_chosen_projections_only():
    model = _model()
    with torch.no_grad():
        base = model.logits(model(_x()).hidden)
    names = apply_lora(model, LoRAConfig(rank=4, targets=["attention", "ffn"]))
    assert all(n.rsplit(".", 1)[-1] in ("q_proj", "kv_proj", "o_proj", "gate", "up", "down") for n in names)
    assert not any(".router." in n for n in names)  # a router's own `gate` Linear is not the FFN's
    assert any(".experts." in n for n in names)
    with torch.no_grad():
        assert torch.equal(model.logits(model(_x()).hidden), base)  # B = 0
    assert "blocks.0.attn.q_proj.weight" in model.state_dict() and "blocks.0.attn.q_proj.lora_A" in model.state_dict()


def test_only_adapters_train_and_lora_plus_gives_b_its_own_learning_rate():
    model = _model()
    model.cfg.lora = LoRAConfig(rank=4, lora_plus_ratio=16.0, train_router=True)
    apply_lora(model, model.cfg.lora)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, OptimConfig(lr=1e-2, warmup_steps=0), 10)["optimizer"]
    b_group = [g for g in opt.param_groups if g.get(LORA_GROUP)]
    assert len(b_group) == 1 and b_group[0]["lr"] == pytest.approx(16 * 1e-2)
    assert {id(p) for p in b_group[0]["params"]} == {id(m.lora_B) for m in model.modules() if isinstance(m, LoRALinear)}
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model.logits(model(_x()).hidden).logsumexp(-1).mean().backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.endswith(("lora_A", "lora_B")) or ".router." in n for n in changed)
    assert any(n.endswith("lora_B") for n in changed) and any(".router." in n for n in changed)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert "embed.weight" in frozen and "blocks.0.attn_norm.weight" in frozen  # norms frozen by default


def test_merged_equals_unmerged():
    model = _model()
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=["attention", "ffn"]))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.05)
        adapted = model.logits(model(_x()).hidden)
        assert merge_lora(model) > 0 and not any(isinstance(m, LoRALinear) for m in model.modules())
        merged = model.logits(model(_x()).hidden)
    assert_close_rel(merged, adapted, 1e-5)
    assert float((adapted - _model().logits(_model()(_x()).hidden)).abs().max()) > 1e-3  # the adapters did act


def test_bad_lora_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="targets \\['qproj'\\] are not projections"):
        ModelConfig.preset("nano-moe", lora={"targets": ["qproj"]})
    with pytest.raises(ConfigError, match="lora.rank"):
        ModelConfig.preset("nano-moe", lora={"rank": 0})
    with pytest.raises(ConfigError, match="must be pretrained: set student_init"):
        build_decoder(ModelConfig.preset("nano-moe", lora={"rank": 2}))
    from pikv_train.models.lora import check_with_cache

    with pytest.raises(ConfigError, match="drop kv_proj from student.lora.targets"):
        check_with_cache(LoRAConfig(), "svd")


@pytest.mark.parametrize("setting", ["h2o", "kivi", "h2o+sharding"])
def test_cache_policies_stay_active_while_adapters_train(setting):
    from pikv_train.cache.sharding import ShardingConfig, build_sharding

    model = _model()
    apply_lora(model, LoRAConfig(rank=4, targets=["attention", "ffn"]))
    cache = (CacheConfig(compressor={"name": "quantized", "bits": 2, "group_size": 4, "residual": 4})
             if setting == "kivi" else CacheConfig(policy="h2o", budget=0.25, chunk_size=4))
    model.set_cache_policy(build_policy(cache, model.cfg))
    if setting.endswith("sharding"):
        model.set_kv_sharding(build_sharding(ShardingConfig(enabled=True, read_mode="by_routing", n_sink=1, window=3,
                                                            read_shards=1), model.cfg))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.05)
        train = model.logits(model(_x()).hidden)
        from helpers import decode_tokenwise

        dec = decode_tokenwise(model, model.new_cache(), _x(), 5)
    assert_close_rel(dec, train, 1e-4)  # train == deploy with adapters in the projections


def test_compressors_that_ignore_the_kv_bias_are_refused_for_qwen2_bases():
    from pikv_train.models.lora import check_with_cache

    with pytest.raises(ConfigError, match="without its bias"):
        check_with_cache(None, "svd", qkv_bias=True)
    check_with_cache(None, "quantized", qkv_bias=True)  # works from the keys and values themselves
