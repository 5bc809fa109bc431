"""Import a Hugging Face causal LM (a local folder) as our decoder: ``student.hf_path`` / ``model.hf_path``.

The reverse of :mod:`pikv_train.hf.export`, for the families our decoder holds exactly: Llama, Mistral and Qwen2
(dense; pre-RMSNorm; half-split RoPE on q and k; grouped-query attention; SwiGLU). Name mapping, per layer i:

* ``input_layernorm`` -> ``attn_norm``, ``post_attention_layernorm`` -> ``ffn_norm``;
* ``q_proj`` -> ``q_proj``, ``o_proj`` -> ``o_proj``; ``k_proj``, ``v_proj`` -> ``kv_proj`` (rows [k; v], weight
  (2 H_kv hd, d) and, for Qwen2, bias (2 H_kv hd,));
* ``mlp.gate_proj / up_proj / down_proj`` -> ``ffn.gate / up / down``;
* ``embed_tokens`` -> ``embed``, ``model.norm`` -> ``norm``, ``lm_head`` -> ``lm_head`` (absent when tied).

Refused, each in one line naming what is supported: other families, scaled RoPE (linear, dynamic, YaRN, Llama-3
...: our rotary tables are the default ones), a head_dim other than hidden_size / num_attention_heads, biases on
o_proj or the MLP (Llama's attention_bias / mlp_bias), activations other than SiLU, sliding-window attention that
binds (a window shorter than max_position_embeddings: our attention is full causal).

Weights are read tensor by tensor from the folder's ``*.safetensors`` files (sharded or not), so the import holds
one copy of the model; folders with only PyTorch ``.bin`` weights go through ``AutoModelForCausalLM``.
"""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

import torch

from pikv_train.errors import ConfigError, MissingFileError

SUPPORTED = ("llama", "mistral", "qwen2")
SUPPORTED_TEXT = ("Llama, Mistral and Qwen2 causal LMs (model_type llama, mistral, qwen2) with default RoPE, "
                  "SiLU SwiGLU, head_dim = hidden_size / num_attention_heads, no o_proj / MLP biases and no binding "
                  "sliding window")
ARCH_FIELDS = ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "max_seq_len", "rope_base",
               "norm_eps", "tie_embeddings", "qkv_bias")
"""The ModelConfig fields the folder decides (every other field — moe, upcycle, lora — is the user's)."""


def _folder(path: str, key: str) -> Path:
    p = Path(str(path)).expanduser()
    if not (p / "config.json").is_file():
        raise MissingFileError(f"{key}.hf_path: no Hugging Face model folder (config.json) at {str(path)!r}; set it "
                               "to a local folder written by save_pretrained")
    return p


def _refuse(key: str, path, why: str) -> ConfigError:
    return ConfigError(f"{key}.hf_path {str(path)!r}: {why}; supported: {SUPPORTED_TEXT}")


def folder_architecture(path: str, key: str = "model.init_args.{model|student}") -> dict:
    """The ModelConfig architecture fields (:data:`ARCH_FIELDS`) of the Hugging Face folder ``path``, read from its
    config.json only (no weights); a one-line ConfigError for what our decoder cannot hold exactly."""
    from transformers import AutoConfig

    folder = _folder(path, key)
    c = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    kind = getattr(c, "model_type", None)
    if kind not in SUPPORTED:
        raise _refuse(key, path, f"model_type {kind!r} is not supported")
    if getattr(c, "hidden_act", "silu") != "silu":
        raise _refuse(key, path, f"hidden_act {c.hidden_act!r} (our SwiGLU uses SiLU)")
    heads, d = c.num_attention_heads, c.hidden_size
    head_dim = getattr(c, "head_dim", None) or d // heads
    if d % heads or head_dim != d // heads:
        raise _refuse(key, path, f"head_dim {head_dim} differs from hidden_size / num_attention_heads = {d}/{heads} "
                                 "(our attention has head_dim = d_model / n_head)")
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise _refuse(key, path, "attention_bias / mlp_bias put biases on o_proj or the MLP (only Qwen2's q/k/v "
                                 "biases are held)")
    if getattr(c, "partial_rotary_factor", 1.0) != 1.0:
        raise _refuse(key, path, f"partial_rotary_factor {c.partial_rotary_factor} (we rotate the whole head)")
    # transformers 5 keeps rope_theta and the scaling type together in rope_parameters; older configs have
    # rope_theta and rope_scaling (None or {"type"/"rope_type": ...}).
    rope = dict(getattr(c, "rope_parameters", None) or {})
    scaling = getattr(c, "rope_scaling", None) or {}
    for r in (rope, scaling):
        kind_of_rope = r.get("rope_type", r.get("type", "default"))
        if kind_of_rope != "default":
            raise _refuse(key, path, f"scaled RoPE (rope_type {kind_of_rope!r}); only the default rotary embedding "
                                     "is implemented")
    theta = rope.get("rope_theta", scaling.get("rope_theta", getattr(c, "rope_theta", 10000.0)))
    max_pos = c.max_position_embeddings
    window = getattr(c, "sliding_window", None)
    # Qwen2 switches its window on with use_sliding_window (Mistral has no switch: a window is on when set).
    window_on = window is not None and getattr(c, "use_sliding_window", True)
    layer_types = getattr(c, "layer_types", None) or []
    if (window_on and window < max_pos) or (window_on and "sliding_attention" in layer_types):
        raise _refuse(key, path, f"sliding_window {window} < max_position_embeddings {max_pos} binds (our attention "
                                 "is full causal); use a folder with sliding_window null or use_sliding_window false")
    text = c.get_text_config() if hasattr(c, "get_text_config") else c
    return dict(vocab_size=c.vocab_size, n_layer=c.num_hidden_layers, n_head=heads,
                n_kv_head=getattr(c, "num_key_value_heads", None) or heads, d_model=d, d_ff=c.intermediate_size,
                max_seq_len=max_pos, rope_base=float(theta), norm_eps=float(c.rms_norm_eps),
                tie_embeddings=bool(getattr(text, "tie_word_embeddings", False)), qkv_bias=kind == "qwen2")


def _unset_values() -> dict:
    """Per architecture field, the values that count as "not set by the user": ModelConfig's default and that of
    DistillationTask's default student (jsonargparse merges a YAML ``student: {hf_path: ...}`` onto it)."""
    from pikv_train.models.config import PRESETS, ModelConfig

    defaults = (ModelConfig(), PRESETS["student-moe"]())
    return {f: [getattr(m, f) for m in defaults] for f in ARCH_FIELDS + ("moe",)}


def hf_model_config(cfg, key: str = "model.init_args.{model|student}"):
    """``cfg`` (a ModelConfig with ``hf_path``) with the folder's architecture and ``hf_path`` null. A field the
    user set to a value other than its default that differs from the folder's is a one-line ConfigError; so is a
    ``moe`` (the folder is dense: ``upcycle`` makes it MoE)."""
    arch = folder_architecture(cfg.hf_path, key)
    unset = _unset_values()
    for name, value in arch.items():
        mine = getattr(cfg, name)
        if mine != value and mine not in unset[name]:
            raise ConfigError(f"{key}.{name}={mine!r} conflicts with {value!r} of the Hugging Face folder "
                              f"{cfg.hf_path!r}; remove {key}.{name} (with hf_path the architecture comes from the folder)")
    if cfg.moe is not None and cfg.moe not in unset["moe"]:
        raise ConfigError(f"{key}.moe is set, but the Hugging Face folder {cfg.hf_path!r} holds a dense model; set "
                          f"{key}.moe: null and {key}.upcycle: {{n_experts: ...}} to make it an MoE")
    known = {f.name for f in fields(cfg)}
    return replace(cfg, **{k: v for k, v in arch.items() if k in known}, moe=None, hf_path=None)


def _hf_tensors(folder: Path):
    """name -> tensor getter over the folder's weights (safetensors lazily; else the whole transformers model)."""
    files = sorted(folder.glob("*.safetensors"))
    if files:
        from safetensors import safe_open

        handles = [safe_open(str(f), framework="pt") for f in files]
        where = {name: h for h in handles for name in h.keys()}
        return where.keys(), lambda name: where[name].get_tensor(name)
    from transformers import AutoModelForCausalLM

    state = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32).state_dict()
    return state.keys(), state.__getitem__


@torch.no_grad()
def load_hf_weights(model, path: str, key: str = "model.init_args.{model|student}") -> None:
    """Copy the Hugging Face folder's weights into our decoder ``model`` (built from :func:`hf_model_config`)."""
    cfg = model.cfg
    names, get = _hf_tensors(_folder(path, key))
    names = set(names)

    def hf(name: str):
        if name not in names:
            raise ConfigError(f"{key}.hf_path {str(path)!r}: weight {name!r} missing from the folder's files; re-save "
                              "the model with save_pretrained")
        return get(name)

    state = {"embed.weight": hf("model.embed_tokens.weight"), "norm.weight": hf("model.norm.weight")}
    if not cfg.tie_embeddings:
        state["lm_head.weight"] = hf("lm_head.weight")
    for i in range(cfg.n_layer):
        p, o = f"model.layers.{i}.", f"blocks.{i}."
        a = p + "self_attn."
        state.update({
            o + "attn_norm.weight": hf(p + "input_layernorm.weight"),
            o + "ffn_norm.weight": hf(p + "post_attention_layernorm.weight"),
            o + "attn.q_proj.weight": hf(a + "q_proj.weight"),
            o + "attn.kv_proj.weight": torch.cat([hf(a + "k_proj.weight"), hf(a + "v_proj.weight")]),  # rows [k; v]
            o + "attn.o_proj.weight": hf(a + "o_proj.weight"),
            o + "ffn.gate.weight": hf(p + "mlp.gate_proj.weight"),
            o + "ffn.up.weight": hf(p + "mlp.up_proj.weight"),
            o + "ffn.down.weight": hf(p + "mlp.down_proj.weight"),
        })
        if cfg.qkv_bias:
            state[o + "attn.q_proj.bias"] = hf(a + "q_proj.bias")
            state[o + "attn.kv_proj.bias"] = torch.cat([hf(a + "k_proj.bias"), hf(a + "v_proj.bias")])
    own = model.state_dict()
    for name, value in state.items():
        if own[name].shape != value.shape:
            raise ConfigError(f"{key}.hf_path {str(path)!r}: {name} has shape {tuple(value.shape)}, config.json gives "
                              f"{tuple(own[name].shape)}; the folder's config and weights disagree")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
