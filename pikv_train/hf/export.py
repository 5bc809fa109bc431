"""Export a student to a Hugging Face folder that ``AutoModelForCausalLM.from_pretrained`` loads without remote code
(SPEC §8): dense students as Llama, MoE students with softmax top-k routing (renormalised, dropless, no shared
expert) as Mixtral. The mappings are exact, so the exported model's logits equal the student's.

Why these two: our decoder is pre-norm RMSNorm, half-split RoPE on q/k, grouped-query attention without biases,
SwiGLU feed-forwards, an optional tied LM head; Llama is exactly that. Our MoE layer with the ``base`` or
``topk_balanced`` router is softmax over the experts, top-k, weights renormalised over the chosen k, SwiGLU
experts: exactly Mixtral's sparse block (its ``router_logits -> softmax -> topk -> / sum``). Other routers have
no equivalent there (dynamic k: ``adaptive``, ``pikv``; biased selection: ``eplb``; group-limited:
``hierarchical``; capacity dropping or raw, un-renormalised weights change which experts a token uses or how
they mix), and are refused with one line naming what can be exported.
"""

from __future__ import annotations

import torch

from pikv_train.errors import ConfigError

EXPORTABLE_ROUTERS = ("base", "topk_balanced")


def hf_config(cfg):
    """The transformers config of our ModelConfig ``cfg`` (LlamaConfig or MixtralConfig)."""
    import transformers

    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
                  num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim,
                  max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
                  tie_word_embeddings=cfg.tie_embeddings, attention_dropout=0.0,
                  rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base})
    if cfg.moe is None:
        return transformers.LlamaConfig(intermediate_size=cfg.d_ff, attention_bias=False, mlp_bias=False, **common)
    r, moe = cfg.moe.router, cfg.moe
    why = None
    if r.name not in EXPORTABLE_ROUTERS:
        why = f"router {r.name} has no equivalent in transformers' MoE models"
    elif moe.shared_expert:
        why = "a shared expert has no place in Mixtral"
    elif not r.normalize_weights:
        why = "un-renormalised expert weights (router.normalize_weights false) differ from Mixtral's"
    elif r.capacity_factor is not None:
        why = "expert capacity (router.capacity_factor) drops assignments Mixtral would keep"
    if why:
        raise ConfigError(f"cannot export this student: {why}; exportable: dense students (Llama) and MoE students "
                          f"with router {' or '.join(EXPORTABLE_ROUTERS)}, normalize_weights true, no capacity_factor, "
                          "no shared expert (Mixtral)")
    return transformers.MixtralConfig(intermediate_size=moe.d_expert, num_local_experts=moe.n_experts,
                                      num_experts_per_tok=r.top_k, output_router_logits=False, **common)


@torch.no_grad()
def hf_state_dict(model) -> dict:
    """Our decoder's weights under the Hugging Face names of :func:`hf_config`'s architecture."""
    cfg = model.cfg
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
        f = blk.ffn
        if cfg.moe is None:
            out.update({p + "mlp.gate_proj.weight": f.gate.weight, p + "mlp.up_proj.weight": f.up.weight,
                        p + "mlp.down_proj.weight": f.down.weight})
        else:
            out[p + "mlp.gate.weight"] = f.router.gate.weight
            # Mixtral's experts are fused: gate_up_proj (E, 2 I, d) = [gate; up] per expert, down_proj (E, d, I).
            out[p + "mlp.experts.gate_up_proj"] = torch.stack([torch.cat([e.gate.weight, e.up.weight]) for e in f.experts])
            out[p + "mlp.experts.down_proj"] = torch.stack([e.down.weight for e in f.experts])
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def to_hf(model):
    """A transformers model (LlamaForCausalLM or MixtralForCausalLM) holding our decoder's weights, in eval mode."""
    import transformers

    config = hf_config(model.cfg)
    cls = transformers.LlamaForCausalLM if model.cfg.moe is None else transformers.MixtralForCausalLM
    hf = cls(config)
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.cfg.tie_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"export mapping incomplete: missing {missing}, unexpected {unexpected}")
    return hf.eval()


def save_folder(model, out_dir) -> None:
    """Write ``model`` (our decoder) as a Hugging Face folder: ``config.json`` and ``model.safetensors`` (through
    ``save_pretrained``), and ``generation_config.json``; ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads it
    without remote code. The tokenizer, model card and cache configuration are not written yet (issue 15)."""
    hf = to_hf(model)
    hf.save_pretrained(str(out_dir), safe_serialization=True)
