"""The ``"pikv"`` attention implementation for transformers models (SPEC §7 extended to Hugging Face decoders).

Importing :mod:`pikv_train.hf` registers, under the name ``"pikv"``, an attention function and a mask function with
transformers' attention interfaces, so ``AutoModelForCausalLM.from_pretrained(path, attn_implementation="pikv")``
(or ``model.set_attn_implementation("pikv")``) runs every attention layer through our code:

* decoding with a :class:`~pikv_train.hf.cache.PiKVCache`: the cache's policy decides what each query reads;
* the parallel (training) forward of a model put under a policy with :func:`train_under`: the policy's training
  mask (and a compressor's stored forms), exactly :class:`~pikv_train.models.attention.CausalSelfAttention`'s path,
  so the forward equals decoding with a ``PiKVCache`` of the same settings;
* otherwise: plain causal attention (SDPA) with the padding mask, so a ``"pikv"`` model without a policy behaves
  like an ``"sdpa"`` one (any transformers cache works then).

The mask function returns the 2-D padding flags of the keys the layer is about to read (``(B, S)`` bool, or None
without padding) instead of a 4-D mask: our caches build visibility from positions, and the policies from their rules.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from pikv_train.errors import ConfigError

NAME = "pikv"


class Projected:
    """Stands in for our attention module in ``KVCompressor.kv``: the transformers layer has already projected and
    rotated q, k, v (compressors that need the layer input itself are refused by PiKVCache/train_under)."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor):
        self.q, self.k, self.v = q, k, v

    def project_kv(self, x, cos, sin) -> tuple[Tensor, Tensor]:
        return self.k, self.v

    def project_q(self, x, cos, sin) -> Tensor:
        return self.q


def pikv_mask(batch_size: int, q_length: int, kv_length: int, kv_offset: int = 0, attention_mask: Tensor | None = None,
              **kwargs) -> Tensor | None:
    """(B, kv_length) bool padding flags of the keys this forward's layers read (True: a real token), or None when
    nothing is padded. With a PiKVCache those are the new tokens (its layers report ``kv_length = q_length``)."""
    if attention_mask is None:
        return None
    m = attention_mask.bool()
    if m.shape[-1] < kv_offset + kv_length:  # transformers pads a short 2-D mask with "real"
        m = F.pad(m, (0, kv_offset + kv_length - m.shape[-1]), value=True)
    m = m[:, kv_offset: kv_offset + kv_length]
    return None if bool(m.all()) else m.expand(batch_size, -1)


_warned_window = set()


def pikv_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                   dropout: float = 0.0, scaling: float | None = None, **kwargs) -> tuple[Tensor, None]:
    """transformers attention function: query (B, H, Tq, hd), key/value (B, H_kv, S, hd) -> ((B, Tq, H, hd), None).

    ``attention_mask``: the ``"pikv"`` mask function's (B, S) padding flags or None."""
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ConfigError("the pikv attention needs the pikv mask (a 2-D padding mask); do not pass a 4-D "
                          "attention_mask to a model using attn_implementation='pikv'")
    if dropout:
        raise ConfigError("the pikv attention has no attention dropout; set config.attention_dropout 0")
    hd = query.shape[-1]
    if scaling is not None and abs(scaling * hd ** 0.5 - 1) > 1e-6:
        query = query * (scaling * hd ** 0.5)  # our attention uses SDPA's default 1/sqrt(hd)
    window = kwargs.get("sliding_window")
    if window is not None and type(module).__name__ not in _warned_window:
        _warned_window.add(type(module).__name__)
        warnings.warn(f"attn_implementation='pikv' ignores the model's sliding_window={window}: the cache policy "
                      "decides what each query reads", stacklevel=2)
    for name in ("softcap", "s_aux"):  # attention variants our attention does not implement (Gemma-2, sinks)
        if kwargs.get(name) is not None:
            raise ConfigError(f"attn_implementation='pikv' does not implement {name} (this model family's attention "
                              "differs from plain softmax attention); use a Llama-, Mistral-, Qwen2- or Mixtral-style model")
    cache = kwargs.get("pikv_cache")
    position_ids = kwargs.get("position_ids")
    b, _, t, _ = query.shape
    if cache is not None:  # decoding (or a prefill) under a PiKVCache: key/value are the new tokens only
        y = cache.attend(module, query, key, value, attention_mask, position_ids)
    else:
        policy = getattr(module, "_pikv_policy", None)
        if policy is not None and key.shape[2] == t:
            y = _train_under_policy(module, policy, query, key, value, attention_mask)
        elif policy is not None:
            raise ConfigError("this model trains under a cache policy: decode it with a PiKVCache of the same settings "
                              "(cache=PiKVCache(...)), not a plain transformers cache")
        else:
            y = _plain(query, key, value, attention_mask)
    return y.transpose(1, 2).contiguous(), None


def _plain(q: Tensor, k: Tensor, v: Tensor, real: Tensor | None) -> Tensor:
    """Causal SDPA of the last Tq of S positions, with (B, S) key padding flags."""
    t, s = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    if real is None and t == s:
        return F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, enable_gqa=group > 1)
    i = torch.arange(t, device=q.device)[:, None] + (s - t)
    mask = (torch.arange(s, device=q.device)[None] <= i)[None, None]  # (1, 1, Tq, S)
    if real is not None:
        mask = mask & real[:, None, None, :]
        mask = mask | ~mask.any(-1, keepdim=True)  # a padded row reads everything rather than nothing (no NaN)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=group > 1)


def _train_under_policy(module, policy, q: Tensor, k: Tensor, v: Tensor, real: Tensor | None) -> Tensor:
    """The policy's training forward for one layer: our decoder's path (hooks' masks, compressor stored forms)."""
    from pikv_train.models.attention import attend_layer
    from pikv_train.models.hooks import AttentionContext

    b, _, t, _ = q.shape
    if real is not None and bool((real[:, 1:] & ~real[:, :-1]).any()):
        raise ConfigError("training under a cache policy takes unpadded or right-padded batches (the policy's rules "
                          "count positions from the first token); pad on the right (tokenizer.padding_side='right')")
    layer = module.layer_idx
    ctx = AttentionContext(layer_idx=layer, positions=torch.arange(t, device=q.device).expand(b, t))
    comp = getattr(policy, "compressor", None)
    if comp is not None:
        k, v, _ = comp.kv(layer, Projected(q, k, v), None, None, None)
    y = attend_layer(q, k, v, None, q.shape[1] // k.shape[1], hooks=[policy], ctx=ctx, compressor=comp,
                     layer_idx=layer)
    policy.last_stats = ctx.stats
    return y


def train_under(model, policy="full", **settings):
    """Put a transformers model under a cache policy for its parallel (training) forward: the policy's masks and
    compressor apply as in our decoder, so the forward equals decoding with ``PiKVCache(policy, **settings)``.

    ``policy``/``settings`` as for :class:`~pikv_train.hf.cache.PiKVCache` (or a PiKVCache, whose settings are
    taken). Sets ``attn_implementation="pikv"``; the policy is registered as ``model.pikv_policy`` (learned parts such as
    DuoAttention gates train with the model). Returns the policy (None for full attention)."""
    from pikv_train.cache.config import build_policy
    from pikv_train.hf.cache import PiKVCache, ShapeConfig, cache_config

    cfg = policy.cache_cfg if isinstance(policy, PiKVCache) else cache_config(policy, **settings)
    shapes = ShapeConfig.of(model.config)
    hook = build_policy(cfg, shapes)
    if hook is not None:
        hook.bind(shapes)
    model.set_attn_implementation(NAME)
    if hook is not None:
        model.pikv_policy = hook  # a submodule: its parameters train and save with the model
    elif hasattr(model, "pikv_policy"):
        del model.pikv_policy
    for m in model.modules():
        if hasattr(m, "layer_idx") and hasattr(m, "o_proj"):  # the attention modules
            object.__setattr__(m, "_pikv_policy", hook)  # a plain reference, not a second registration
    return hook


AttentionInterface.register(NAME, pikv_attention)
AttentionMaskInterface.register(NAME, pikv_mask)
