"""Export to Hugging Face architectures (SPEC §8): the transformers model's logits equal the student's (<= 1e-5
relative, fp32) on a left-padded batch, for Llama, Mixtral and Qwen2-MoE (shared expert, raw weights); students
without an exact equivalent are refused in one line."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_rel

from pikv_train.errors import ConfigError
from pikv_train.hf import save_folder, to_hf
from pikv_train.models import Decoder, ModelConfig
from pikv_train.models.config import MoEConfig
from pikv_train.routing import RouterConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _student(kind: str, tie: bool = True, shared: bool = False, normalize: bool = True, **router) -> Decoder:
    torch.manual_seed(0)
    moe = None if kind == "dense" else MoEConfig(n_experts=4, d_expert=24, shared_expert=shared, router=RouterConfig(
        name=kind, top_k=2, normalize_weights=normalize, **router))
    cfg = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=40, max_seq_len=64, rope_base=500.0,
                      tie_embeddings=tie, moe=moe)
    model = Decoder(cfg)
    with torch.no_grad():  # norms away from 1, routers that really choose
        for blk in model.blocks:
            blk.attn_norm.weight.uniform_(0.5, 1.5)
            blk.ffn_norm.weight.uniform_(0.5, 1.5)
            if moe is not None:
                blk.ffn.router.gate.weight.normal_(0, 1.0)
    return model.eval()


CASES = {  # id: (router, tie, extra settings, expected class)
    "dense": ("dense", True, {}, "LlamaForCausalLM"),
    "dense-untied": ("dense", False, {}, "LlamaForCausalLM"),
    "topk_balanced": ("topk_balanced", True, {}, "MixtralForCausalLM"),
    "base-untied": ("base", False, {}, "MixtralForCausalLM"),
    "shared-expert": ("topk_balanced", True, {"shared": True}, "Qwen2MoeForCausalLM"),
    "raw-weights": ("base", False, {"normalize": False}, "Qwen2MoeForCausalLM"),
    "shared-raw": ("topk_balanced", False, {"shared": True, "normalize": False}, "Qwen2MoeForCausalLM"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exported_model_gives_the_students_logits_on_a_left_padded_batch(case):
    kind, tie, extra, cls = CASES[case]
    model = _student(kind, tie, **extra)
    hf = to_hf(model)
    assert type(hf).__name__ == cls
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 258, (n,), generator=g) for n in (11, 7)]
    with torch.no_grad():
        ours = [model.logits(model(s[None]).hidden)[0] for s in seqs]
        ids = torch.zeros(2, 11, dtype=torch.long)
        mask = torch.zeros(2, 11, dtype=torch.long)
        for i, s in enumerate(seqs):  # left padding
            ids[i, 11 - len(s):], mask[i, 11 - len(s):] = s, 1
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        theirs = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    for i, s in enumerate(seqs):
        assert_close_rel(theirs[i, 11 - len(s):], ours[i], 1e-5)


@pytest.mark.parametrize("router,kw,match", [("adaptive", {}, "router adaptive has no equivalent"),
                                             ("eplb", {}, "router eplb has no equivalent"),
                                             ("topk_balanced", {"capacity_factor": 1.25}, "expert capacity")])
def test_students_without_an_exact_equivalent_are_refused(router, kw, match):
    with pytest.raises(ConfigError, match=match) as e:
        to_hf(_student(router, **kw))
    msg = str(e.value)
    assert "\n" not in msg and "exportable: dense students (Llama)" in msg
    assert "Mixtral" in msg and "Qwen2-MoE" in msg


@pytest.mark.parametrize("case", ["dense", "base-untied", "shared-raw"])
def test_saved_folder_loads_with_plain_transformers_and_gives_the_same_logits(case, tmp_path):
    import transformers

    kind, tie, extra, cls = CASES[case]
    model = _student(kind, tie, **extra)
    save_folder(model, tmp_path / "hf")
    assert {"config.json", "model.safetensors", "generation_config.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()  # no trust_remote_code
    assert type(hf).__name__ == cls
    x = torch.randint(0, 258, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close_rel(hf(input_ids=x).logits, model.logits(model(x).hidden), 1e-5)


@pytest.mark.parametrize("moe", [False, True])
def test_students_with_qkv_biases_export_to_qwen2_families(moe, tmp_path):
    import transformers

    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=40, max_seq_len=64, qkv_bias=True,
                      moe=MoEConfig(n_experts=4, d_expert=24, router=RouterConfig(name="topk_balanced", top_k=2))
                      if moe else None)
    model = Decoder(cfg)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.q_proj.bias.normal_(0, 0.5)
            blk.attn.kv_proj.bias.normal_(0, 0.5)
    model.eval()
    save_folder(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == ("Qwen2MoeForCausalLM" if moe else "Qwen2ForCausalLM")
    ids = torch.randint(0, 258, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
        assert_close_rel(theirs[0], model.logits(model(ids[:1]).hidden)[0], 1e-5)
        assert_close_rel(theirs[1, 4:], model.logits(model(ids[1:, 4:]).hidden)[0], 1e-5)
