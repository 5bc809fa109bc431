"""Hugging Face causal LMs as teachers (``teacher: {hf_path: DIR}``), loaded from a local folder.

The teacher is wrapped to look like our decoder where distillation needs it: ``forward(input_ids)``
returns the final normalised hidden states (the base model's ``last_hidden_state``, never the
full-vocabulary logits), and ``head_weight`` is the LM head, so teacher logits are produced chunk by chunk
inside the fused loss. ``trust_remote_code`` stays off unless the config turns it on.

Vocabulary alignment: models often pad their embedding matrix (e.g. 152,064 rows for a 151,665-token
tokenizer). Distillation compares only the first ``len(tokenizer)`` columns, the real shared vocabulary;
tokenizers that differ are refused, never zero-padded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from pikv_train.errors import ConfigError, MissingFileError


@dataclass
class HFTeacherInfo:
    """The subset of a model config the distillation task reads (vocab_size = LM-head rows)."""

    vocab_size: int
    n_layer: int


class HFTeacherOutput:
    def __init__(self, hidden: Tensor):
        self.hidden = hidden


class HFTeacher(nn.Module):
    """A frozen ``AutoModelForCausalLM`` with the decoder-like interface used by the distillation task."""

    def __init__(self, path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
        super().__init__()
        if not Path(path).is_dir():
            raise MissingFileError(f"teacher folder not found: {path!r}; set teacher.hf_path to a local model folder")
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as e:  # pragma: no cover - optional extra
            raise ConfigError("Hugging Face teachers need transformers: pip install 'pikv_train[hf]'") from e
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, local_files_only=True, trust_remote_code=trust_remote_code
        )
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
        head = self.model.get_output_embeddings()
        if head is None:
            raise ConfigError(f"{path!r} has no LM head (get_output_embeddings() is None); use a causal LM")
        self.cfg = HFTeacherInfo(vocab_size=head.weight.shape[0], n_layer=getattr(self.model.config, "num_hidden_layers", 0))
        self.path = path

    @property
    def real_vocab_size(self) -> int:
        """Tokens the tokenizer can actually produce (the LM head may have padding rows beyond)."""
        return len(self.tokenizer)

    @property
    def head_weight(self) -> Tensor:
        """(V_padded, d) weight of the teacher's LM head."""
        return self.model.get_output_embeddings().weight

    def forward(self, input_ids: Tensor, **_) -> HFTeacherOutput:
        out = self.model.base_model(input_ids=input_ids)
        return HFTeacherOutput(out.last_hidden_state)  # (B, T, d) after the final norm


def check_same_tokenizer(teacher_tok, data_tok) -> None:
    """Refuse a data tokenizer whose vocabulary differs from the teacher's."""
    inner = getattr(data_tok, "tok", None)
    if inner is None:
        raise ConfigError(
            f"the teacher uses its own tokenizer but data.tokenizer is {getattr(data_tok, 'name', data_tok)!r}; "
            "set data.tokenizer to the teacher folder (teacher.hf_path)"
        )
    if inner.get_vocab() != teacher_tok.get_vocab():
        raise ConfigError(
            f"teacher and data tokenizers differ ({len(teacher_tok)} vs {len(inner)} tokens); distillation "
            "needs the same tokenizer: set data.tokenizer to the teacher folder"
        )
