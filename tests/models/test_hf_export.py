"""Export to Hugging Face architectures (SPEC §8): the transformers model's logits equal the student's (<= 1e-5
relative, fp32) on a left-padded batch; students without an exact equivalent are refused in one line."""

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


def _student(kind: str, tie: bool = True) -> Decoder:
    torch.manual_seed(0)
    moe = None if kind == "dense" else MoEConfig(n_experts=4, d_expert=24, router=RouterConfig(name=kind, top_k=2))
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


@pytest.mark.parametrize("kind,tie", [("dense", True), ("dense", False), ("topk_balanced", True), ("base", False)])
def test_exported_model_gives_the_students_logits_on_a_left_padded_batch(kind, tie):
    model = _student(kind, tie)
    hf = to_hf(model)
    assert type(hf).__name__ == ("LlamaForCausalLM" if kind == "dense" else "MixtralForCausalLM")
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


@pytest.mark.parametrize("router,match", [("adaptive", "router adaptive has no equivalent"),
                                          ("eplb", "router eplb has no equivalent")])
def test_students_without_an_exact_equivalent_are_refused(router, match):
    with pytest.raises(ConfigError, match=match) as e:
        to_hf(_student(router))
    assert "\n" not in str(e.value) and "exportable: dense students (Llama)" in str(e.value)


@pytest.mark.parametrize("kind", ["dense", "topk_balanced"])
def test_saved_folder_loads_with_plain_transformers_and_gives_the_same_logits(kind, tmp_path):
    import transformers

    model = _student(kind, tie=kind == "dense")
    save_folder(model, tmp_path / "hf")
    assert {"config.json", "model.safetensors", "generation_config.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()  # no trust_remote_code
    x = torch.randint(0, 258, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close_rel(hf(input_ids=x).logits, model.logits(model(x).hidden), 1e-5)
