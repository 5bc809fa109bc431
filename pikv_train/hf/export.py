"""Export a student to a Hugging Face folder that ``AutoModelForCausalLM.from_pretrained`` loads without remote code
(SPEC §8). Every mapping is exact, so the exported model's logits equal the student's:

* dense students -> Llama (with q/k/v biases, ``qkv_bias`` from a Qwen2 base: Qwen2);
* MoE students with softmax top-k routing (router ``base`` or ``topk_balanced``, dropless), renormalised weights
  and no shared expert -> Mixtral;
* the same routing with a shared expert, with raw (un-renormalised) weights, or with q/k/v biases -> Qwen2-MoE.

Why these: our decoder is pre-norm RMSNorm, half-split RoPE on q/k, grouped-query attention without biases or q/k
norms, SwiGLU feed-forwards, an optional tied LM head; Llama is exactly that. Our MoE layer with the ``base`` or
``topk_balanced`` router is softmax over the experts, top-k, weights renormalised over the chosen k, SwiGLU experts:
exactly Mixtral's sparse block (its ``router_logits -> softmax -> topk -> / sum``). Qwen2-MoE has the same attention
(``qkv_bias`` off), the same router with renormalisation as a switch (``norm_topk_prob``), and a shared SwiGLU expert
added under a sigmoid gate ``sigmoid(x . w)``: with ``w = 0`` the gate is exactly 0.5, so our ungated shared expert
is its expert with ``down_proj`` doubled (multiplying by 2 and by 0.5 is exact in floating point). A student without
a shared expert but with raw weights gets a one-unit shared expert of zeros (it adds exactly 0).

Not exportable: routers with no equivalent in transformers' MoE models (dynamic k: ``adaptive``, ``pikv``; biased
selection: ``eplb``; group-limited: ``hierarchical``) and expert capacity (``capacity_factor`` drops assignments a
dropless model keeps); they are refused with one line naming what can be exported. Qwen3-MoE and OLMoE normalise q
and k (RMSNorm), DeepSeek-V3 has latent attention (MLA) and sigmoid routing: none of them can hold our decoder.
"""

from __future__ import annotations

import torch

from pikv_train.errors import ConfigError
from pikv_train.hf.cache_file import read_cache_config  # noqa: F401  (re-exported: the folder's cache settings)

EXPORTABLE_ROUTERS = ("base", "topk_balanced")
EXPORTABLE = ("dense students (Llama), with qkv_bias (Qwen2); MoE students with router base or topk_balanced and no capacity_factor: "
              "Mixtral without a shared expert and with normalize_weights true, Qwen2-MoE with a shared expert, "
              "normalize_weights false or qkv_bias")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mixtral": "MixtralForCausalLM",
                 "qwen2_moe": "Qwen2MoeForCausalLM"}


def hf_architecture(cfg) -> str:
    """The transformers family our ModelConfig ``cfg`` maps onto exactly: ``llama``, ``mixtral`` or ``qwen2_moe``;
    a one-line ConfigError naming what can be exported when there is none."""
    bias = getattr(cfg, "qkv_bias", False)  # a student initialised from a Qwen2 folder (student.hf_path)
    if cfg.moe is None:
        return "qwen2" if bias else "llama"
    r, moe = cfg.moe.router, cfg.moe
    why = None
    if r.name not in EXPORTABLE_ROUTERS:
        why = f"router {r.name} has no equivalent in transformers' MoE models"
    elif r.capacity_factor is not None:
        why = "expert capacity (router.capacity_factor) drops assignments a dropless model keeps"
    if why:
        raise ConfigError(f"cannot export this student: {why}; exportable: {EXPORTABLE}")
    return "mixtral" if r.normalize_weights and not moe.shared_expert and not bias else "qwen2_moe"


def hf_config(cfg):
    """The transformers config of our ModelConfig ``cfg`` (LlamaConfig, MixtralConfig or Qwen2MoeConfig)."""
    import transformers

    arch = hf_architecture(cfg)
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
                  num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim,
                  max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
                  tie_word_embeddings=cfg.tie_embeddings, attention_dropout=0.0,
                  rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base})
    if arch == "llama":
        return transformers.LlamaConfig(intermediate_size=cfg.d_ff, attention_bias=False, mlp_bias=False, **common)
    if arch == "qwen2":  # Llama's layout with q/k/v biases (always on in Qwen2), full attention in every layer
        return transformers.Qwen2Config(intermediate_size=cfg.d_ff, use_sliding_window=False, sliding_window=None,
                                        **common)
    moe, r = cfg.moe, cfg.moe.router
    if arch == "mixtral":
        # Full causal attention and deterministic routing, whatever a transformers version defaults to.
        return transformers.MixtralConfig(intermediate_size=moe.d_expert, num_local_experts=moe.n_experts,
                                          num_experts_per_tok=r.top_k, output_router_logits=False,
                                          sliding_window=None, router_jitter_noise=0.0, **common)
    # Every layer sparse (decoder_sparse_step 1, no mlp_only_layers), full attention everywhere.
    return transformers.Qwen2MoeConfig(
        intermediate_size=moe.d_expert, moe_intermediate_size=moe.d_expert, num_experts=moe.n_experts,
        num_experts_per_tok=r.top_k, norm_topk_prob=r.normalize_weights,
        shared_expert_intermediate_size=moe.d_expert if moe.shared_expert else 1,
        qkv_bias=getattr(cfg, "qkv_bias", False),
        decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False, output_router_logits=False, **common)


@torch.no_grad()
def hf_state_dict(model) -> dict:
    """Our decoder's weights under the Hugging Face names of :func:`hf_config`'s architecture (Qwen2-MoE: with the
    shared expert as :func:`_qwen2_shared_expert` maps it). LoRA adapters are merged into the weights."""
    from pikv_train.models.lora import has_lora, merge_lora

    if has_lora(model):  # on a copy: the caller's model keeps training its adapters
        import copy

        model = copy.deepcopy(model)
        merge_lora(model)
    cfg = model.cfg
    arch = hf_architecture(cfg)
    kv = cfg.n_kv_head * cfg.head_dim
    out = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = model.head_weight
    for i, blk in enumerate(model.blocks):
        p = f"model.layers.{i}."
        a = blk.attn
        out.update({p + "input_layernorm.weight": blk.attn_norm.weight,
                    p + "post_attention_layernorm.weight": blk.ffn_norm.weight,
                    p + "self_attn.q_proj.weight": a.q_proj.weight,
                    p + "self_attn.k_proj.weight": a.kv_proj.weight[:kv],  # kv_proj rows: keys, then values
                    p + "self_attn.v_proj.weight": a.kv_proj.weight[kv:],
                    p + "self_attn.o_proj.weight": a.o_proj.weight})
        if a.q_proj.bias is not None:  # qkv_bias (Qwen2 / Qwen2-MoE)
            out.update({p + "self_attn.q_proj.bias": a.q_proj.bias, p + "self_attn.k_proj.bias": a.kv_proj.bias[:kv],
                        p + "self_attn.v_proj.bias": a.kv_proj.bias[kv:]})
        f = blk.ffn
        if cfg.moe is None:
            out.update({p + "mlp.gate_proj.weight": f.gate.weight, p + "mlp.up_proj.weight": f.up.weight,
                        p + "mlp.down_proj.weight": f.down.weight})
        else:
            out[p + "mlp.gate.weight"] = f.router.gate.weight
            # Mixtral's and Qwen2-MoE's experts are fused: gate_up_proj (E, 2 I, d) = [gate; up] per expert,
            # down_proj (E, d, I).
            out[p + "mlp.experts.gate_up_proj"] = torch.stack([torch.cat([e.gate.weight, e.up.weight])
                                                               for e in f.experts])
            out[p + "mlp.experts.down_proj"] = torch.stack([e.down.weight for e in f.experts])
            if arch == "qwen2_moe":
                out.update(_qwen2_shared_expert(p + "mlp.", f.shared, cfg.d_model, f.experts[0].down.weight.dtype))
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def _qwen2_shared_expert(p: str, shared, d_model: int, dtype) -> dict:
    """Qwen2-MoE's gated shared expert holding our ungated one: gate weight 0 (sigmoid(0) = 0.5 exactly) and
    ``down_proj`` doubled; without a shared expert, a one-unit expert of zeros (it adds exactly 0)."""
    gate = torch.zeros(1, d_model, dtype=dtype)
    if shared is None:
        z = torch.zeros(1, d_model, dtype=dtype)
        return {p + "shared_expert.gate_proj.weight": z, p + "shared_expert.up_proj.weight": z,
                p + "shared_expert.down_proj.weight": torch.zeros(d_model, 1, dtype=dtype),
                p + "shared_expert_gate.weight": gate}
    return {p + "shared_expert.gate_proj.weight": shared.gate.weight,
            p + "shared_expert.up_proj.weight": shared.up.weight,
            p + "shared_expert.down_proj.weight": shared.down.weight * 2.0, p + "shared_expert_gate.weight": gate}


def to_hf(model):
    """A transformers model (LlamaForCausalLM, MixtralForCausalLM or Qwen2MoeForCausalLM, see
    :func:`hf_architecture`) holding our decoder's weights, in eval mode."""
    import transformers

    config = hf_config(model.cfg)
    hf = getattr(transformers, ARCHITECTURES[hf_architecture(model.cfg)])(config)
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.cfg.tie_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"export mapping incomplete: missing {missing}, unexpected {unexpected}")
    return hf.eval()


def save_folder(model, out_dir, *, eos_token_id: int | None = None, pad_token_id: int | None = None,
                real_vocab: int | None = None):
    """Write ``model`` (our decoder) as a Hugging Face folder: ``config.json`` and ``model.safetensors`` (through
    ``save_pretrained``), and ``generation_config.json`` (greedy decoding, stopping at ``eos_token_id``); ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads it without remote code.
    The tokenizer, model card and cache settings come from ``python -m pikv_train export``
    (:mod:`pikv_train.hf.command`). Returns the transformers model."""
    from transformers import GenerationConfig

    hf = to_hf(model)
    # No beginning-of-sequence token: our tokenizers never prepend one (the families' default id would be a token).
    hf.config.bos_token_id, hf.config.eos_token_id, hf.config.pad_token_id = None, eos_token_id, pad_token_id
    # Greedy by default: a student distilled to match its teacher's argmax is best read without sampling. No
    # max_length: transformers warns on every generate(max_new_tokens=...) when both are set; the longest sequence
    # the student was built for is config.max_position_embeddings.
    # LM-head rows past the tokenizer's ``real_vocab`` ids are padding (never trained, never sampled by pikv_train).
    padded = list(range(real_vocab, model.cfg.vocab_size)) if real_vocab and real_vocab < model.cfg.vocab_size else None
    hf.generation_config = GenerationConfig(do_sample=False, num_beams=1, eos_token_id=eos_token_id,
                                            pad_token_id=pad_token_id, suppress_tokens=padded)
    hf.save_pretrained(str(out_dir), safe_serialization=True)
    return hf
