"""Tokenizers: the built-in byte tokenizer and a wrapper for Hugging Face tokenizers in a local folder.

A tokenizer here is anything with ``encode(str) -> list[int]``, ``decode(list[int]) -> str`` and the
attributes ``vocab_size``, ``eos_id``, ``pad_id``; :func:`build_tokenizer` picks one from a config string.
"""

from __future__ import annotations

from pikv_train.errors import MissingFileError

from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes 0..255, then <eos> = 256 and <pad> = 257 (vocab_size 258). Needs no files."""

    vocab_size = 258
    eos_id = 256
    pad_id = 257
    name = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local folder (``transformers`` extra)."""

    def __init__(self, path: str):
        try:
            from transformers import AutoTokenizer
        except ImportError as e:  # pragma: no cover - depends on the optional extra
            raise ImportError(
                "a Hugging Face tokenizer needs transformers: pip install 'pikv_train[hf]'"
            ) from e
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.name = str(path)
        self.vocab_size = len(self.tok)
        self.eos_id = self.tok.eos_token_id if self.tok.eos_token_id is not None else 0
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


def build_tokenizer(spec: str) -> Tokenizer:
    """'byte' for :class:`ByteTokenizer`, else a local folder holding a Hugging Face tokenizer."""
    if spec == "byte":
        return ByteTokenizer()
    if not Path(spec).is_dir():
        raise MissingFileError(
            f"tokenizer folder not found: {spec!r}; use data.tokenizer: byte or a local Hugging Face tokenizer folder"
        )
    return HFTokenizer(spec)
