"""``PiKVCache``: our cache policies and compressors as a transformers ``Cache`` (SPEC §8).

``model.generate(input_ids, cache=PiKVCache(policy="h2o", budget=64))`` on a Hugging Face decoder (Llama, Mistral,
Qwen2, Mixtral, ...) loaded with ``attn_implementation="pikv"`` decodes under the policy: the cache is our own
policy cache (:meth:`CachePolicy.new_cache`, per-(sequence, kv-head) storage, compressor codes), so it stores fewer
bytes for real and takes exactly the decisions ``pikv_train``'s own decoding takes.

How it plugs into transformers. A transformers attention layer calls ``cache.update(k, v, layer_idx, kwargs=...)``
and then the attention function of ``config._attn_implementation`` with the returned keys. Our caches decide what a
query reads from the query itself (H2O's attention, Quest's page scores), which ``update`` never sees, so
:meth:`update` only hands itself to the attention function (through the layer's ``kwargs`` dict, which transformers
passes to both) and the ``"pikv"`` attention function (:mod:`pikv_train.hf.attention`) runs our cache step and
attention with q, k and v together, the same code as our decoder's (:func:`~pikv_train.models.attention.attend_layer`).
Padding comes from the ``"pikv"`` mask function: the new tokens' rows of the 2-D attention mask (left padding gets
position -1, as in :func:`pikv_train.models.generation.left_pad`).

Compressors whose stored form is computed from the layer input rather than from the keys and values (``svd``,
``lora``, ``lora_plus``: latents of x; ``distillation``: adapters on the K/V projection) cannot be built from what a
transformers cache sees and are refused; the others (``quantized``, ``pyramid``, ``pruning``, ``pikv``, ``fastv``,
``pyramid_kv``, ``chunk_kv``) work. Expert-sharded KV reads through our routers and is refused too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from pikv_train.cache.config import CacheConfig, build_policy
from pikv_train.errors import ConfigError
NOT_FROM_KV = {
    "svd": "stores latents of the layer input",
    "lora": "stores latents of the layer input",
    "lora_plus": "stores latents of the layer input",
    "distillation": "reads keys through adapters on the K/V projection",
}


@dataclass
class ShapeConfig:
    """The attention shapes a policy or compressor is built with, read from a transformers config (the fields of our
    ModelConfig they use)."""

    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    d_model: int
    max_seq_len: int
    moe: None = None  # our routers do not exist in a transformers model (the PiKV hybrid ranks by attention)

    @classmethod
    def of(cls, config) -> "ShapeConfig":
        c = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        n_head = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_head
        return cls(n_layer=c.num_hidden_layers, n_head=n_head, n_kv_head=getattr(c, "num_key_value_heads", None) or n_head,
                   head_dim=head_dim, d_model=c.hidden_size, max_seq_len=c.max_position_embeddings)


def cache_config(policy: str | CacheConfig | dict = "full", **settings) -> CacheConfig:
    """A validated :class:`CacheConfig` from a policy name and settings (``budget``, ``compressor``, ...), a dict or
    a config; compressors that need the layer input are refused in one line."""
    if isinstance(policy, CacheConfig):
        cfg = CacheConfig.from_dict({**asdict(policy), **settings})
    elif isinstance(policy, dict):
        cfg = CacheConfig.from_dict({**policy, **settings})
    else:
        names = {f.name for f in fields(CacheConfig)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise ConfigError(f"PiKVCache: unknown settings {unknown}; valid: {sorted(names - {'policy'})}")
        cfg = CacheConfig.from_dict({"policy": policy, **settings})
    cfg.validate()
    why = NOT_FROM_KV.get(cfg.compressor.name)
    if why:
        raise ConfigError(f"PiKVCache: compressor {cfg.compressor.name} {why}, which a transformers cache never sees; "
                          "serve it with pikv_train's generate(), or use quantized, pyramid, pruning, pikv, fastv, "
                          "pyramid_kv or chunk_kv")
    return cfg


class PiKVLayer(CacheLayerMixin):
    """One layer's view for transformers: how many tokens this layer has seen (``get_seq_length``, used by
    ``generate`` to slice inputs) and the mask sizes of the new tokens. The storage lives in the owner's policy
    cache."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, owner: "PiKVCache", layer_idx: int):
        super().__init__()
        self.owner, self.layer_idx = owner, layer_idx
        self.seen = 0  # tokens (padding included) this layer has processed
        self.real_seen: Tensor | None = None  # (B,) real tokens per row: our caches' next position

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        return key_states, value_states  # PiKVCache.update handles the layer

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The "pikv" mask covers the new tokens only: their padding flags (the cache holds the past's positions).
        return query_length, self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.seen, self.real_seen = 0, None

    def reorder_cache(self, beam_idx) -> None:
        raise ConfigError("PiKVCache does not support beam search (its evictions are per sequence); use num_beams=1")

    def crop(self, tokens_to_remove: int) -> None:
        raise ConfigError("PiKVCache cannot be cropped (evicting policies cannot undo a decision); assisted or "
                          "speculative decoding in transformers needs a DynamicCache")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.owner.inner is not None:
            raise ConfigError("PiKVCache cannot be expanded after the prompt; expand the inputs before generating")

    def batch_select_indices(self, indices) -> None:
        raise ConfigError("PiKVCache cannot select batch rows; start a new cache for a new batch")


class PiKVCache(Cache):
    """A transformers cache that decodes under one of our cache policies (and compressors).

    ``PiKVCache(policy="h2o", budget=0.25, reference_len=512, compressor={"name": "quantized", "bits": 2})`` builds
    one by hand (settings are :class:`~pikv_train.cache.config.CacheConfig` fields; a fractional budget refers to
    ``reference_len``, default the model's ``max_position_embeddings``); :meth:`from_pretrained` rebuilds the cache an
    exported student was trained under. Use one cache per ``generate`` call, on a model loaded with
    ``attn_implementation="pikv"`` (``import pikv_train.hf`` registers it).
    """

    def __init__(self, policy: str | CacheConfig | dict = "full", *, config=None, state: dict | None = None,
                 **settings):
        super().__init__(layers=[])
        self.cache_cfg = cache_config(policy, **settings)
        self.state = state  # learned policy parameters (DuoAttention gates, ThinK channels), loaded when built
        self.policy = None  # our CachePolicy (None: full attention without a compressor)
        self.inner = None  # our inference cache, built on the first attention call (or now, from ``config``)
        self._pending: int | None = None
        if config is not None:
            self.build(config)

    @classmethod
    def from_pretrained(cls, path) -> "PiKVCache":
        """The cache a student exported by ``python -m pikv_train export`` was trained under (``pikv_cache.json``,
        and ``pikv_cache.safetensors`` for learned policy parameters)."""
        from transformers import AutoConfig

        from pikv_train.hf.cache_file import read_cache_config

        path = Path(path)
        spec = read_cache_config(path)  # one-line errors: missing / damaged file, unknown format, missing state file
        if spec.get("sharding"):
            raise ConfigError(f"{path}/pikv_cache.json: the student reads its KV through expert shards, which needs "
                              "pikv_train's own routers; serve it with pikv_train's generate(), or export a student "
                              "trained unsharded")
        state = None
        if spec.get("state"):
            from safetensors.torch import load_file

            state = load_file(str(path / spec["state"]))
        return cls(spec.get("cache") or "full", config=AutoConfig.from_pretrained(path), state=state)

    # ---------------------------------------------------------------- building
    def build(self, config) -> None:
        """Build the policy and our cache for the model ``config`` (a transformers config) describes."""
        if self.inner is not None:
            return
        from pikv_train.cache.kv_cache import KVCache

        shapes = ShapeConfig.of(config)
        self.shapes = shapes
        self.policy = build_policy(self.cache_cfg, shapes)
        if self.policy is None:
            self.inner = KVCache(shapes.n_layer)
            return
        self.policy.bind(shapes)
        learned = [n for n, p in self.policy.named_parameters()]
        if self.state:
            missing, unexpected = self.policy.load_state_dict(self.state, strict=False)
            missing = [n for n in missing if n in learned]  # parameters; buffers may keep their built values
            if unexpected or missing:
                raise ConfigError(f"PiKVCache: the learned state (unexpected {sorted(unexpected)[:3]}, missing "
                                  f"{missing[:3]}) does not fit policy {self.cache_cfg.policy}; re-export the student")
        elif learned:
            import warnings

            warnings.warn(f"PiKVCache: policy {self.cache_cfg.policy} has learned parameters ({learned[0]}, ...) but no "
                          "state was given, so they keep their initial values; build it with PiKVCache.from_pretrained "
                          "(pikv_cache.safetensors) or pass state=", stacklevel=3)
        self.policy.eval()
        self.inner = self.policy.new_cache(shapes.n_layer)

    # ---------------------------------------------------------------- transformers' interface
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """Called by the attention layer before its attention function: hand ourselves to the ``"pikv"`` attention
        function (through the layer's kwargs) and return the new keys/values unchanged."""
        while len(self.layers) <= layer_idx:
            self.layers.append(PiKVLayer(self, len(self.layers)))
        if self._pending is not None:
            raise ConfigError(
                f"PiKVCache: layer {self._pending}'s attention did not run through the cache; load the model with "
                "attn_implementation='pikv' after `import pikv_train.hf` (or model.set_attn_implementation('pikv'))")
        layer_kwargs = kwargs.get("kwargs")
        if not isinstance(layer_kwargs, dict):
            raise ConfigError("PiKVCache: this model's attention does not pass its kwargs to the cache; PiKVCache "
                              "supports transformers decoders such as Llama, Mistral, Qwen2 and Mixtral")
        layer_kwargs["pikv_cache"] = self
        self._pending = layer_idx
        return key_states, value_states

    def attend(self, module, q: Tensor, k: Tensor, v: Tensor, real: Tensor | None, position_ids: Tensor) -> Tensor:
        """The new queries' attention output (B, H, Tq, hd) under the policy, after storing the new tokens.

        q (B, H, Tq, hd) rotated and scaled for SDPA's default scale; k, v (B, H_kv, Tq, hd); ``real`` (B, Tq) bool
        (False: padding) or None; position_ids (B|1, Tq)."""
        import torch

        from pikv_train.hf.attention import Projected
        from pikv_train.models.attention import attend_layer

        layer = module.layer_idx
        if self._pending != layer:
            raise ConfigError("PiKVCache: the attention function ran without the cache's update; use the cache "
                              "through the model's forward")
        self._pending = None
        self.build(module.config)
        b, _, t, _ = q.shape
        q_pos, counted = self._positions(layer, real, position_ids, b, t)
        group = q.shape[1] // k.shape[1]
        comp = getattr(self.policy, "compressor", None)
        codes = None
        if comp is not None:
            k, v, codes = comp.kv(layer, Projected(q, k, v), None, None, None)
        run = lambda i, j: attend_layer(  # noqa: E731
            q[:, :, i:j], k[:, :, i:j], v[:, :, i:j], None if codes is None else {n: c[:, :, i:j] for n, c in codes.items()},
            group, cache=self.inner, layer_idx=layer, positions=q_pos[:, i:j])
        if getattr(self.inner, "row_by_row", False) and t > 1:
            # A versioned compressor's cache takes one token per step (as Decoder.forward feeds it); a layer's cache
            # depends only on that layer's keys, so stepping inside the layer takes the same decisions.
            y = torch.cat([run(i, i + 1) for i in range(t)], 2)
        else:
            y = run(0, t)
        self.layers[layer].seen += t
        self.layers[layer].real_seen = counted
        return y

    def _positions(self, layer: int, real: Tensor | None, position_ids: Tensor | None, b: int, t: int) -> tuple:
        """(B, Tq) positions of the new tokens as our caches count them (each row's real tokens 0, 1, ...; -1 on
        padding), whatever positions the caller fed RoPE (a hand-written loop without position_ids starts padded
        rows above 0: relative positions, hence attention, are the same), and the per-row count after them."""
        import torch

        if real is None:
            real = torch.ones(b, t, dtype=torch.bool, device=self.device_of(position_ids))
        count = self.layers[layer].real_seen
        if count is None:
            count = torch.zeros(b, dtype=torch.long, device=real.device)
        if count.shape[0] != b:
            raise ConfigError(f"PiKVCache holds {count.shape[0]} sequences, this call has {b}; use a fresh PiKVCache "
                              "per generate() call")
        ours = count[:, None] + real.long().cumsum(1) - 1
        if position_ids is not None and bool(((position_ids.expand(b, t) < ours) & real).any()):
            raise ConfigError("PiKVCache: these tokens' positions are already in the cache (a used cache passed to a new "
                              "generate(), or use_cache=False re-feeding the sequence); use a fresh PiKVCache per "
                              "generate() call, with use_cache=True")
        return torch.where(real, ours, torch.full_like(ours, -1)), count + real.sum(1)

    @staticmethod
    def device_of(t: Tensor | None):
        return None if t is None else t.device

    def bytes_stored(self) -> int:
        """Bytes of every tensor the cache holds (keys/values or their codes, positions, policy state)."""
        return 0 if self.inner is None else self.inner.bytes_stored()

    def reset(self) -> None:
        self.inner, self._pending = None, None
        for layer in self.layers:
            layer.reset()

    def __repr__(self) -> str:
        c = self.cache_cfg
        comp = "" if c.compressor.name == "none" else f", compressor={c.compressor.name}"
        return f"PiKVCache(policy={c.policy}, budget={c.budget}{comp}, bytes={self.bytes_stored()})"


def kv_bytes(cache) -> int:
    """Bytes a transformers cache holds: :meth:`PiKVCache.bytes_stored`, or the keys and values of every layer of
    another cache (a DynamicCache: the full-attention baseline)."""
    if isinstance(cache, PiKVCache):
        return cache.bytes_stored()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if isinstance(t, Tensor))
