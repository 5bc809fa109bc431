"""The tokenizer of an exported student, in a form ``AutoTokenizer.from_pretrained`` loads without remote code.

Our byte tokenizer (ids 0..255 = UTF-8 bytes, ``<eos>`` 256, ``<pad>`` 257) becomes a ``tokenizers`` BPE model with
no merges over the 256 byte symbols of the ByteLevel alphabet: the ByteLevel pre-tokenizer turns each UTF-8 byte of
the text into one printable symbol, the BPE model (nothing to merge) maps that symbol to its id, which we choose to be
the byte's value; the ByteLevel decoder maps symbols back to bytes and decodes UTF-8 (invalid sequences become U+FFFD,
as ``ByteTokenizer.decode`` does). ``<eos>`` and ``<pad>`` are special tokens the text never produces: the tokenizer is
saved with ``split_special_tokens`` so that the literal text ``"<eos>"`` encodes to its five bytes, as in training.
A run that used a Hugging Face tokenizer folder (``data.tokenizer: <folder>``) gets that tokenizer, copied.
"""

from __future__ import annotations

from pathlib import Path

from pikv_train.data.tokenizer import ByteTokenizer
from pikv_train.errors import ConfigError, MissingFileError


def byte_tokenizer_fast(model_max_length: int | None = None):
    """:class:`~pikv_train.data.tokenizer.ByteTokenizer` as a ``transformers.PreTrainedTokenizerFast`` with the same
    ids (``tok(text, add_special_tokens=False).input_ids == ByteTokenizer().encode(text)``)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte = ByteTokenizer()
    table = _byte_symbols()  # table[b]: the ByteLevel symbol of byte b
    if set(table) != set(pre_tokenizers.ByteLevel.alphabet()):
        raise RuntimeError("byte tokenizer export: the tokenizers library's ByteLevel alphabet is not GPT-2's")
    vocab = {s: b for b, s in enumerate(table)}
    vocab.update({"<eos>": byte.eos_id, "<pad>": byte.pad_id})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False, byte_fallback=False))
    # No regex split: with no merges every byte is its own token whatever the word boundaries.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<eos>", special=True, normalized=False),
                            AddedToken("<pad>", special=True, normalized=False)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>",
                                   clean_up_tokenization_spaces=False, split_special_tokens=True,
                                   padding_side="left",  # batched generation continues every row at its end
                                   model_max_length=model_max_length or int(1e30))
    if fast.eos_token_id != byte.eos_id or fast.pad_token_id != byte.pad_id or len(fast) != byte.vocab_size:
        raise RuntimeError("byte tokenizer export: special token ids differ from ByteTokenizer's")
    return fast


def _byte_symbols() -> list[str]:
    """GPT-2's bytes-to-unicode table (what the ByteLevel pre-tokenizer uses): printable Latin-1 bytes stand for
    themselves, the others are shifted past U+00FF in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def load_tokenizer(spec: str, *, vocab_size: int, model_max_length: int | None = None):
    """The transformers tokenizer of a run's ``data.tokenizer`` (``byte``, or a local Hugging Face tokenizer folder),
    checked against the model's vocabulary (one-line errors naming the fix).

    Args:
        vocab_size: the model's vocabulary size (every tokenizer id must fit in it).
        model_max_length: the longest sequence the model takes (saved with the byte tokenizer).
    """
    if spec == "byte":
        tok = byte_tokenizer_fast(model_max_length)
        tok.pikv_byte = True  # noqa: B010 - marks the tokenizer write_tokenizer re-labels (see there)
    else:
        if not Path(spec).is_dir():
            raise MissingFileError(f"tokenizer folder {spec!r} (the run's data.tokenizer) not found; run the export "
                                   "from the folder the run was started in, or pass --tokenizer FOLDER")
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(spec, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load the tokenizer in {spec!r} ({' '.join(str(e).split())[:200]}); pass a "
                              "folder written by save_pretrained with --tokenizer FOLDER") from None
    if len(tok) > vocab_size:
        raise ConfigError(f"the tokenizer {spec!r} has {len(tok)} tokens but the model only {vocab_size}; pass the "
                          "tokenizer the run trained with (--tokenizer byte|FOLDER)")
    return tok


def write_tokenizer(tok, out_dir) -> None:
    """``tok.save_pretrained(out_dir)``; the byte tokenizer is labelled ``PreTrainedTokenizerFast``: transformers 5
    names the class TokenizersBackend, PreTrainedTokenizerFast is its name in transformers 4 and an alias in 5, so
    the folder loads with either."""
    import json

    tok.save_pretrained(str(out_dir))
    if getattr(tok, "pikv_byte", False):
        f = Path(out_dir) / "tokenizer_config.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2)
                     + "\n")
