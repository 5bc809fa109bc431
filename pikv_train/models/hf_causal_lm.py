"""Hugging Face causal LMs behind the causal-LM interface of our :class:`~pikv_train.models.decoder.Decoder`.

A local ``AutoModelForCausalLM`` folder (teacher ``{hf_path: DIR}``, or a student) is wrapped so that code
written for our decoder runs unchanged on it:

- ``forward(input_ids, positions=, cache=).hidden``: the final normalised hidden states (the base model's
  ``last_hidden_state``), never the full-vocabulary logits; losses apply the head chunk by chunk.
- ``head``: a :class:`~pikv_train.models.head.LogitHead` with the LM-head weight, its bias (Phi) and what the
  family's ``forward`` applies after it: Cohere multiplies by ``logit_scale``, Granite divides by
  ``logits_scaling`` (HyperCLOVA X multiplies), Gemma-2 soft-caps with ``final_logit_softcapping``. A probe at
  load compares ``head(hidden)`` with the model's own ``logits`` and refuses a family whose transform we do not
  reproduce, so no student is ever distilled from wrong distributions silently.
- ``new_cache()``: an :class:`HFKVCache` with the ``rollback`` / ``snapshot`` / ``restore`` that generation and
  speculative KD call.

Positions follow our convention: absolute positions, -1 for a slot to ignore (left padding, a re-fed row's
unused tail). Such a slot is masked as a key (attention mask 0) and its own output is meaningless.

Vocabulary alignment: models often pad their embedding matrix (e.g. 152,064 rows for a 151,665-token
tokenizer). Distillation compares only the first ``len(tokenizer)`` columns, the real shared vocabulary;
tokenizers that differ are refused, never zero-padded. ``trust_remote_code`` stays off unless the config
turns it on.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from pikv_train.errors import ConfigError, MissingFileError, RollbackError
from pikv_train.models.head import LogitHead

# Stand-in for max_seq_len when a config has no max_position_embeddings (relative-position families).
UNBOUNDED_SEQ_LEN = 1 << 20

# Families whose forward multiplies the logits by `logits_scaling` (Granite and MiniCPM3 divide by it).
_MULTIPLY_LOGITS_SCALING = frozenset({"hyperclovax"})

# Probe tolerance, relative to the largest logit: fp32 differs only by rounding; half types by ~2^-8 per op.
_PROBE_TOL = {torch.float32: 1e-4, torch.float64: 1e-6}
_PROBE_TOL_HALF = 3e-2


@dataclass
class HFModelInfo:
    """The subset of a model config the tasks read (vocab_size = LM-head rows, padding included)."""

    vocab_size: int
    n_layer: int
    max_seq_len: int


@dataclass
class HFOutput:
    """hidden: (B, T, d) final normalised hidden states."""

    hidden: Tensor


def logit_transform(config) -> tuple[float, float | None]:
    """(scale, softcap) the family's ``forward`` applies after ``lm_head``, read from its (text) config."""
    text = config.get_text_config(decoder=True)
    scale = 1.0
    if getattr(text, "logit_scale", None) is not None:  # Cohere, Cohere2
        scale *= float(text.logit_scale)
    if getattr(text, "logits_scaling", None) is not None:  # Granite (divides), HyperCLOVA X (multiplies)
        s = float(text.logits_scaling)
        scale = scale * s if text.model_type in _MULTIPLY_LOGITS_SCALING else scale / s
    cap = getattr(text, "final_logit_softcapping", None)  # Gemma-2 (Gemma-3 checkpoints set None)
    return scale, None if cap is None else float(cap)


class HFKVCache:
    """A transformers ``DynamicCache`` plus what our cache interface needs on top of it.

    Columns are appended in time order by every forward; ``mask`` (B, S) long is 1 where a row may read the
    column (0: left padding, an ignored slot, a rolled-back token) and ``positions`` (B, S) holds each column's
    absolute position (-1 when hidden). The model reads ``mask`` as the 2-D attention mask, so hidden columns
    are never attended; columns hidden in every row at the end are cropped away.

    Sliding-window layers (Gemma-2, Mistral) keep every column here (a full layer) so that rollback can crop
    them; their window still applies through transformers' mask, counted in cache columns as transformers
    counts it in a padded batch: exact while a row's columns (its padding and hidden slots included) fit the
    window.
    """

    def __init__(self, config):
        from transformers import DynamicCache
        from transformers.cache_utils import DummyLayer, DynamicLayer, DynamicSlidingWindowLayer

        self.kv = DynamicCache(config=config)
        layers = []
        for layer in self.kv.layers:
            if type(layer) is DynamicSlidingWindowLayer:
                layer = DynamicLayer()  # see the class docstring: croppable, window kept by the mask
            if type(layer) not in (DynamicLayer, DummyLayer):  # DummyLayer: a layer without its own KV
                raise ConfigError(
                    f"{config.model_type!r} uses {type(layer).__name__} cache layers, which cannot be rolled back "
                    "by hiding columns; generation and speculative KD need an attention-only model (off-policy KD "
                    "works with any)"
                )
            layers.append(layer)
        self.kv.layers = layers
        self.mask: Tensor | None = None  # (B, S) long
        self.positions: Tensor | None = None  # (B, S) long
        self._column_ids: Tensor | None = None  # (S,) long, a serial per appended column (snapshot validity)
        self._next_id = 0

    def __len__(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def bytes_stored(self) -> int:
        """Bytes of the key/value tensors held, all layers."""
        n = 0
        for layer in self.kv.layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if t is not None:
                    n += t.numel() * t.element_size()
        return n

    def next_positions(self, batch: int, device: torch.device) -> Tensor:
        """(B,) the position after each row's last visible column (0 for an empty cache)."""
        if self.positions is None:
            return torch.zeros(batch, dtype=torch.long, device=device)
        return self.positions.max(1).values + 1

    def attention_mask(self, new_mask: Tensor) -> Tensor:
        """(B, S + T) the 2-D attention mask of a forward adding ``new_mask`` (B, T) columns."""
        return new_mask if self.mask is None else torch.cat([self.mask, new_mask], 1)

    def append(self, new_mask: Tensor, positions: Tensor) -> None:
        """Record the (B, T) columns the forward just added to ``kv``."""
        t = positions.shape[1]
        ids = torch.arange(self._next_id, self._next_id + t)
        self._next_id += t
        if self.mask is None:
            self.mask, self.positions, self._column_ids = new_mask, positions, ids
        else:
            self.mask = torch.cat([self.mask, new_mask], 1)
            self.positions = torch.cat([self.positions, positions], 1)
            self._column_ids = torch.cat([self._column_ids, ids])

    def rollback(self, keep_until: Tensor) -> None:
        """Hide every cached column whose position is beyond ``keep_until`` (B,) in its row, then crop the
        columns hidden in every row off the end (memory does not grow with rejected proposals)."""
        if self.mask is None:
            return
        drop = self.positions > keep_until[:, None].to(self.positions.device)  # (B, S)
        self.mask = self.mask.masked_fill(drop, 0)
        self.positions = self.positions.masked_fill(drop, -1)
        visible = self.mask.bool().any(0)  # (S,)
        keep = int(visible.nonzero().max()) + 1 if bool(visible.any()) else 0
        self._crop(keep)

    def snapshot(self) -> dict:
        """The state to :meth:`restore` later: the column count, the mask and the positions (keys and values
        need no copy: columns are only ever appended or cropped)."""
        n = len(self)
        return {
            "n": n,
            "last_id": None if n == 0 else int(self._column_ids[-1]),
            "mask": None if self.mask is None else self.mask.clone(),
            "positions": None if self.positions is None else self.positions.clone(),
        }

    def restore(self, snap: dict) -> None:
        """Return to :meth:`snapshot`'s state: crop the columns added since and restore the mask/positions.

        Restoring only goes backwards: the snapshot's columns must all still be here, unchanged (a rollback
        that cropped below them refuses). The snapshot can be restored again.
        """
        n = snap["n"]
        if len(self) < n or (n > 0 and int(self._column_ids[n - 1]) != snap["last_id"]):
            raise RollbackError(
                f"cannot restore a snapshot of {n} cache columns: a rollback has cropped them since; "
                "take the snapshot after the rollback (restore only goes backwards)"
            )
        self._crop(n)
        if n > 0:
            self.mask, self.positions = snap["mask"].clone(), snap["positions"].clone()

    def _crop(self, n: int) -> None:
        """Keep the first ``n`` columns."""
        drop = len(self) - n
        if drop <= 0:
            return
        self.kv.crop(-drop)
        if n == 0:
            self.mask = self.positions = self._column_ids = None
        else:
            self.mask, self.positions = self.mask[:, :n], self.positions[:, :n]
            self._column_ids = self._column_ids[:n]


class HFCausalLM(nn.Module):
    """A local ``AutoModelForCausalLM`` folder with our decoder's causal-LM interface (see the module docstring).

    Args:
        path: the model folder (config, weights and tokenizer).
        dtype: weights' dtype.
        trust_remote_code: run the folder's own modelling code (off unless the config turns it on).
    """

    def __init__(self, path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
        super().__init__()
        if not Path(path).is_dir():
            raise MissingFileError(
                f"Hugging Face model folder not found: {path!r}; set teacher.hf_path to a local model folder"
            )
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as e:  # pragma: no cover - optional extra
            raise ConfigError("Hugging Face models need transformers: pip install 'pikv_train[hf]'") from e
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, local_files_only=True, trust_remote_code=trust_remote_code
        ).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
        lm_head = self.model.get_output_embeddings()
        if lm_head is None:
            raise ConfigError(f"{path!r} has no LM head (get_output_embeddings() is None); use a causal LM")
        config = self.model.config
        text = config.get_text_config(decoder=True)
        self.cfg = HFModelInfo(
            vocab_size=lm_head.weight.shape[0],
            n_layer=getattr(text, "num_hidden_layers", 0),
            max_seq_len=getattr(text, "max_position_embeddings", None) or UNBOUNDED_SEQ_LEN,
        )
        self.path = path
        self.scale, self.softcap = logit_transform(config)
        # transformers 5 renamed the base models' `past_key_values` to `cache`; remote code may still use the old name.
        params = inspect.signature(self.model.base_model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.check_head()

    @property
    def model_type(self) -> str:
        return self.model.config.model_type

    @property
    def real_vocab_size(self) -> int:
        """Tokens the tokenizer can actually produce (the LM head may have padding rows beyond)."""
        return len(self.tokenizer)

    @property
    def head_weight(self) -> Tensor:
        """(V_padded, d) weight of the LM head."""
        return self.model.get_output_embeddings().weight

    @property
    def head(self) -> LogitHead:
        """The LM head with the family's logit transform (bias, scale, soft cap)."""
        lm_head = self.model.get_output_embeddings()
        return LogitHead(lm_head.weight, getattr(lm_head, "bias", None), self.scale, self.softcap)

    def logits(self, hidden: Tensor) -> Tensor:
        """(..., d) -> (..., V) logits, equal to the model's own (checked at load)."""
        return self.head(hidden)

    def new_cache(self, n_layer: int | None = None) -> HFKVCache:
        """An empty KV cache for :meth:`forward` (``n_layer``, if given, must be the model's)."""
        if n_layer is not None and n_layer != self.cfg.n_layer:
            raise ValueError(f"new_cache(n_layer={n_layer}) but the model has {self.cfg.n_layer} layers")
        return HFKVCache(self.model.config)

    def forward(
        self, input_ids: Tensor, *, positions: Tensor | None = None, cache: HFKVCache | None = None
    ) -> HFOutput:
        """Run the base model.

        Args:
            input_ids: (B, T) token ids.
            positions: (B, T) absolute positions, -1 for a slot to ignore; default 0..T-1, or continuing the
                cache's rows.
            cache: an :class:`HFKVCache` from :meth:`new_cache`, extended in place.
        Returns:
            ``.hidden`` (B, T, d): the base model's final normalised hidden states.
        """
        b, t = input_ids.shape
        if cache is not None and not isinstance(cache, HFKVCache):
            raise TypeError(f"{type(cache).__name__} is not an HFKVCache; build the cache with model.new_cache()")
        if positions is None:
            start = torch.zeros(b, dtype=torch.long, device=input_ids.device) if cache is None else \
                cache.next_positions(b, input_ids.device)
            positions = start[:, None] + torch.arange(t, device=input_ids.device)
            if t and int(positions[:, -1].max()) >= self.cfg.max_seq_len:
                raise ConfigError(
                    f"sequence length {int(positions[:, -1].max()) + 1} exceeds the model's max_position_embeddings="
                    f"{self.cfg.max_seq_len}; lower data.seq_len (or the generated length)"
                )
        new_mask = (positions >= 0).long()  # (B, T)
        kw = dict(input_ids=input_ids, position_ids=positions.clamp_min(0))
        if cache is None:
            out = self.model.base_model(attention_mask=new_mask, use_cache=False, **kw)
        else:
            out = self.model.base_model(attention_mask=cache.attention_mask(new_mask), use_cache=True,
                                        **{self._cache_kw: cache.kv}, **kw)
            cache.append(new_mask, positions)
        return HFOutput(out.last_hidden_state)

    @torch.no_grad()
    def check_head(self) -> None:
        """Compare ``head(forward(ids).hidden)`` with the model's own logits on a short fixed input; refuse the
        model when they differ (its family transforms logits in a way :func:`logit_transform` misses)."""
        n = min(self.cfg.vocab_size, self.real_vocab_size)
        ids = (torch.arange(8) * 7919 % n)[None].to(self.head_weight.device)  # (1, 8) spread over the vocabulary
        ref = self.model(input_ids=ids).logits.float()  # (1, 8, V)
        got = self.logits(self(ids).hidden).float()
        tol = _PROBE_TOL.get(self.head_weight.dtype, _PROBE_TOL_HALF)
        err = float((got - ref).abs().max()) if got.shape == ref.shape else float("inf")
        scale = float(ref.abs().max())
        if not err <= tol * scale:
            raise ConfigError(
                f"{self.model_type!r} models transform their logits in a way pikv_train does not reproduce "
                f"(head(hidden) differs from the model's logits by {err:.3g}, max |logit| {scale:.3g}); "
                "this family cannot be used until pikv_train.models.hf_causal_lm.logit_transform learns it"
            )


HFTeacher = HFCausalLM
"""The name the teacher loader used before students could be Hugging Face models too."""

