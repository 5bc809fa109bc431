"""Hugging Face causal LMs as teachers (``teacher: {hf_path: DIR}``).

The model wrapper lives in :mod:`pikv_train.models.hf_causal_lm` (students can be Hugging Face models too);
this module keeps the teacher's import path and the check that the data is tokenized like the teacher.
"""

from __future__ import annotations

from pikv_train.errors import ConfigError
from pikv_train.models.hf_causal_lm import HFCausalLM, HFKVCache, HFModelInfo, HFOutput, HFTeacher

__all__ = ["HFCausalLM", "HFKVCache", "HFModelInfo", "HFOutput", "HFTeacher", "check_same_tokenizer"]


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
