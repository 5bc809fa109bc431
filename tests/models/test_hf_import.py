"""Starting a decoder from a Hugging Face folder (``hf_path``, pikv_train/hf/load.py) and sparse upcycling
(``upcycle``, pikv_train/models/upcycle.py): logits equal to the source model's, one-line refusals, and a tiny fit."""

from __future__ import annotations

import shutil

import pytest
import torch

from helpers import assert_close_rel, lm_recipe, run_cli, tiny_hf_teacher
from pikv_train.errors import ConfigError, MissingFileError
from pikv_train.models.build import build_decoder, resolve_config
from pikv_train.models.config import ModelConfig, MoEConfig
from pikv_train.models.upcycle import UpcycleConfig
from pikv_train.routing.base import RouterConfig

transformers = pytest.importorskip("transformers")
NO_LOGGER = ("--trainer.logger", "false")

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 500.0})  # not our defaults: both must be read
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
}


def save_hf(folder, family: str = "llama", tied: bool = False, **overrides):
    """A tiny randomly initialised ``family`` model saved into ``folder``; norms and (Qwen2) q/k/v biases are
    randomised too, so a mapping that dropped them would show. Returns the transformers model (eval)."""
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**TINY, **extra, "tie_word_embeddings": tied, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.5 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def logits(model, x):
    with torch.no_grad():
        return model.logits(model(x).hidden)


X = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_decoder_from_a_folder_gives_the_hugging_face_logits(tmp_path, family, tied):
    hf = save_hf(tmp_path, family, tied)
    ours = build_decoder(ModelConfig(hf_path=str(tmp_path))).eval()
    cfg = ours.cfg
    assert (cfg.hf_path, cfg.tie_embeddings, cfg.qkv_bias, cfg.vocab_size, cfg.max_seq_len) == (
        None, tied, family == "qwen2", TINY["vocab_size"], TINY["max_position_embeddings"])
    with torch.no_grad():
        assert_close_rel(logits(ours, X), hf(X).logits, 1e-5)


@pytest.mark.parametrize("overrides, words", [
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, "scaled RoPE"),
    ({"head_dim": 16}, "head_dim 16"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_what_our_decoder_cannot_hold_is_refused_in_one_line(tmp_path, overrides, words):
    save_hf(tmp_path, "llama", **overrides)
    with pytest.raises(ConfigError, match=words) as e:
        build_decoder(ModelConfig(hf_path=str(tmp_path)))
    assert "\n" not in str(e.value) and "supported: Llama, Mistral and Qwen2" in str(e.value)


def test_a_binding_sliding_window_and_other_families_are_refused(tmp_path):
    save_hf(tmp_path / "mistral", "mistral", sliding_window=16)
    with pytest.raises(ConfigError, match="sliding_window 16 < max_position_embeddings 64"):
        resolve_config(ModelConfig(hf_path=str(tmp_path / "mistral")))
    save_hf(tmp_path / "qwen", "qwen2", use_sliding_window=False, sliding_window=16)  # switched off: accepted
    assert resolve_config(ModelConfig(hf_path=str(tmp_path / "qwen"))).qkv_bias
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2)).save_pretrained(tmp_path / "g")
    with pytest.raises(ConfigError, match="model_type 'gpt2' is not supported"):
        resolve_config(ModelConfig(hf_path=str(tmp_path / "g")))


def test_settings_that_contradict_the_folder_are_refused(tmp_path):
    save_hf(tmp_path, "llama")
    path = str(tmp_path)
    assert resolve_config(ModelConfig(hf_path=path, d_model=32)).d_model == 32  # agreeing with the folder is fine
    # DistillationTask's default student (a YAML `student: {hf_path: ...}` is merged onto it) counts as unset.
    merged = resolve_config(ModelConfig.preset("student-moe", hf_path=path, upcycle=_upcycle()))
    assert (merged.d_model, merged.moe.n_experts, merged.moe.d_expert) == (32, 4, TINY["intermediate_size"])
    with pytest.raises(ConfigError, match=r"d_model=64 conflicts with 32 .*remove model.init_args"):
        resolve_config(ModelConfig(hf_path=path, d_model=64))
    with pytest.raises(ConfigError, match="moe is set, but .* dense model"):
        resolve_config(ModelConfig(hf_path=path, moe=MoEConfig(n_experts=3, d_expert=8)))
    with pytest.raises(ConfigError, match="set one of them"):
        build_decoder(ModelConfig(hf_path=path), init_from="x.ckpt")
    with pytest.raises(MissingFileError, match="no Hugging Face model folder"):
        resolve_config(ModelConfig(hf_path=str(tmp_path / "absent")))


def _upcycle(n_experts=4, top_k=2, noise=0.0, name="topk_balanced"):
    return UpcycleConfig(n_experts=n_experts, noise=noise, router=RouterConfig(name=name, top_k=top_k))


@pytest.mark.parametrize("name", ["base", "topk_balanced", "eplb"])
def test_identical_experts_under_renormalised_top_k_give_the_dense_logits(tmp_path, name):
    hf = save_hf(tmp_path, "qwen2")
    up = build_decoder(ModelConfig(hf_path=str(tmp_path), upcycle=_upcycle(name=name))).eval()
    assert up.cfg.upcycle is None and up.cfg.moe.n_experts == 4 and up.cfg.moe.d_expert == TINY["intermediate_size"]
    with torch.no_grad():
        assert_close_rel(logits(up, X), hf(X).logits, 1e-5)
    torch.manual_seed(0)
    noisy = build_decoder(ModelConfig(hf_path=str(tmp_path), upcycle=_upcycle(name=name, noise=0.05))).eval()
    assert (logits(noisy, X) - logits(up, X)).abs().max() > 1e-4


def test_upcycling_a_dense_pikv_checkpoint(tmp_path):
    """init_from of a dense pikv_train checkpoint, then upcycling; the result reloads as a plain MoE decoder."""
    from pikv_train.evaluate import load_decoder

    dense_cfg = ModelConfig.preset("nano")
    dense = build_decoder(dense_cfg).eval()
    ckpt = tmp_path / "dense.ckpt"
    torch.save({"pikv_task": "lm", "pikv_model_config": dense_cfg.to_dict(),
                "state_dict": {f"model.{k}": v for k, v in dense.state_dict().items()}}, ckpt)
    x = X % dense_cfg.vocab_size
    with pytest.raises(ConfigError, match="set .*moe: null"):
        ModelConfig.preset("nano-moe", upcycle=_upcycle())
    up = build_decoder(ModelConfig.preset("nano", upcycle=_upcycle(n_experts=3)), init_from=str(ckpt)).eval()
    assert_close_rel(logits(up, x), logits(dense, x), 1e-5)
    torch.save({"pikv_task": "lm", "pikv_model_config": up.cfg.to_dict(),
                "state_dict": {f"model.{k}": v for k, v in up.state_dict().items()}}, tmp_path / "up.ckpt")
    again = load_decoder(tmp_path / "up.ckpt")
    assert again.cfg.moe.n_experts == 3
    assert_close_rel(logits(again, x), logits(up, x), 1e-6)


def test_an_upcycled_student_runs_under_sharded_kv_and_a_cache_policy(tmp_path):
    from pikv_train.cache.config import CacheConfig, build_policy
    from pikv_train.cache.sharding import ShardingConfig, build_sharding

    save_hf(tmp_path, "llama")
    up = build_decoder(ModelConfig(hf_path=str(tmp_path), upcycle=_upcycle()))
    up.set_kv_sharding(build_sharding(ShardingConfig(enabled=True, n_sink=1, window=2), up.cfg))
    up.set_cache_policy(build_policy(CacheConfig(policy="h2o", budget=0.5), up.cfg))
    out = up(X)
    loss = up.logits(out.hidden).logsumexp(-1).mean() + out.router_loss
    loss.backward()
    assert torch.isfinite(loss) and up.blocks[0].ffn.router.gate.weight.grad is not None


def test_fit_from_a_hugging_face_folder_upcycled_and_reloaded_without_it(tmp_path):
    """A tiny fit of an upcycled student from a Hugging Face folder, data on the folder's tokenizer; its checkpoint
    reloads with load_decoder after the folder is gone."""
    from pikv_train.cli import check_checkpoint_fits
    from pikv_train.evaluate import load_decoder

    folder = tiny_hf_teacher(tmp_path / "hf")
    recipe = lm_recipe(tmp_path, steps=2, model=f"{{hf_path: {folder}, upcycle: {{n_experts: 2, router: {{top_k: 1}}}}}}")
    proc = run_cli("fit", "--config", str(recipe), *NO_LOGGER)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "using the model's tokenizer" in proc.stdout + proc.stderr
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    # Resuming compares the architecture the command resolves to (the folder's, upcycled) with the checkpoint's.
    model_cfg = {"class_path": "pikv_train.tasks.LanguageModelTask",
                 "init_args": {"model": {"hf_path": str(folder), "upcycle": {"n_experts": 2, "router": {"top_k": 1}}}}}
    check_checkpoint_fits(torch.load(ckpt, weights_only=False), ckpt, model_cfg)
    model_cfg["init_args"]["model"]["upcycle"]["n_experts"] = 3
    with pytest.raises(ConfigError, match="moe.n_experts 2 in the checkpoint vs 3 configured"):
        check_checkpoint_fits(torch.load(ckpt, weights_only=False), ckpt, model_cfg)
    shutil.rmtree(folder)
    model = load_decoder(ckpt)
    assert model.cfg.hf_path is None and model.cfg.moe.n_experts == 2 and model.cfg.vocab_size == 300
