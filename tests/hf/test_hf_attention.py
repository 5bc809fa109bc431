"""SPEC §7 extended to Hugging Face models: a transformers decoder put under a cache policy with ``train_under``
(attention implementation "pikv") gives, in its parallel forward, the logits its token-by-token decoding with a
``PiKVCache`` of the same settings gives (<= 1e-4 relative, peaky attention), for Llama, Mistral, Qwen2 (q/k/v
biases) and Mixtral classes built from configs."""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers import assert_close_rel

from pikv_train.errors import ConfigError
from pikv_train.hf import PiKVCache, train_under

pytestmark = pytest.mark.usefixtures("one_thread")

T, PREFILL = 24, 7
COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=T, attention_dropout=0.0)
CLASSES = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON)),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**COMMON, sliding_window=None)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON)),
    "mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(**COMMON, num_local_experts=4,
                                                                                  num_experts_per_tok=2)),
}
POLICIES = {
    "h2o": dict(policy="h2o", budget=0.25, chunk_size=3),
    "streaming_llm": dict(policy="streaming_llm", budget=0.25, n_sink=2),
    "quest": dict(policy="quest", budget=0.25, page_size=4, quest_dense_layers=1),
    "duo_attention": dict(policy="duo_attention", budget=0.25, n_sink=2, duo_hard=True),
    "kivi": dict(policy="h2o", budget=0.5, chunk_size=4,
                 compressor={"name": "quantized", "bits": 2, "group_size": 4, "residual": 4}),
    "mikv": dict(policy="full", compressor={"name": "pyramid", "group_size": 4, "recent": 4, "tier_every": 4,
                                            "byte_budget": 0.8}),
}


def _model(kind: str):
    torch.manual_seed(0)
    model = CLASSES[kind]()
    with torch.no_grad():  # peaky attention, biases (Qwen2) away from zero
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)
            elif name.endswith("_proj.bias"):
                p.normal_(0, 0.5)
    return model.eval()


@torch.no_grad()
def _decode(model, x, settings) -> torch.Tensor:
    """Logits (B, T, V) of x fed through a PiKVCache: a prefill of PREFILL tokens, then one token per step."""
    cache = PiKVCache(**settings)
    outs = [model(input_ids=x[:, :PREFILL], cache=cache, use_cache=True).logits]
    for i in range(PREFILL, x.shape[1]):
        outs.append(model(input_ids=x[:, i: i + 1], position_ids=torch.tensor([[i]]), cache=cache, use_cache=True).logits)
    return torch.cat(outs, 1)


def _x():
    return torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind,policy", [("llama", p) for p in POLICIES] + [(k, "h2o") for k in ("mistral", "qwen2", "mixtral")])
def test_parallel_forward_under_the_policy_equals_decoding_with_pikv_cache(kind, policy):
    model = _model(kind)
    with torch.no_grad():
        full = model(input_ids=_x()).logits
    hook = train_under(model, **POLICIES[policy])
    if policy == "duo_attention":  # one retrieval and one streaming head per layer
        with torch.no_grad():
            hook.gates.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    with torch.no_grad():
        parallel = model(input_ids=_x()).logits
    assert (parallel - full).abs().max() > 1e-2 * full.abs().max()  # the policy changes this model's outputs
    state = None if policy != "duo_attention" else {k: v.clone() for k, v in hook.state_dict().items()}
    assert_close_rel(_decode(model, _x(), {**POLICIES[policy], **({"state": state} if state else {})}), parallel, 1e-4)


def test_training_under_the_policy_backpropagates_into_the_model_and_learned_gates():
    model = _model("llama")
    hook = train_under(model, **{**POLICIES["duo_attention"], "duo_hard": False})
    assert any(p is hook.gates for p in model.parameters())  # the gates train with the model
    model.train()
    out = model(input_ids=_x(), labels=_x())
    out.loss.backward()
    assert float(hook.gates.grad.abs().sum()) > 0
    assert float(model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum()) > 0


def test_pikv_attention_without_a_policy_equals_sdpa_on_a_padded_batch():
    model = _model("qwen2")
    x = _x()
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    with torch.no_grad():
        ref = model(input_ids=x, attention_mask=mask).logits
        model.set_attn_implementation("pikv")
        got = model(input_ids=x, attention_mask=mask).logits
    assert_close_rel(got[0], ref[0], 1e-5)
    assert_close_rel(got[1, 5:], ref[1, 5:], 1e-5)


def test_training_under_a_policy_refuses_left_padding_and_plain_caches():
    model = _model("llama")
    train_under(model, **POLICIES["h2o"])
    x = _x()
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    with pytest.raises(ConfigError, match="right-padded"):
        model(input_ids=x, attention_mask=mask)
    with pytest.raises(ConfigError, match="decode it with a PiKVCache"):
        model.generate(input_ids=x[:, :5], max_new_tokens=2, do_sample=False)
