"""The byte tokenizer, exported: ``AutoTokenizer.from_pretrained`` (no remote code) gives our ids for any text, decodes
them back, and has our <eos> / <pad> ids; a run's Hugging Face tokenizer folder is copied as it is."""

from __future__ import annotations

import pytest

from pikv_train.data.tokenizer import ByteTokenizer
from pikv_train.errors import ConfigError, MissingFileError
from pikv_train.hf.tokenizer import load_tokenizer, write_tokenizer

TEXTS = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "line one\nline two\r\n\ttabbed\n\n",
    "accents: café, naïve, Ångström, ß",
    "CJK: 中文字符, 日本語のテキスト, 한국어",
    "emoji: 😀 👍🏽 👨‍👩‍👧",
    "specials as text: <eos> <pad> </s>",
    "",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("byte_tok")
    write_tokenizer(load_tokenizer("byte", vocab_size=258, model_max_length=64), folder)
    return AutoTokenizer.from_pretrained(folder)  # no trust_remote_code


@pytest.mark.parametrize("text", TEXTS)
def test_exported_byte_tokenizer_gives_our_ids_and_decodes_back(tok, text):
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids == ByteTokenizer().encode(text)
    assert tok.decode(ids) == text == ByteTokenizer().decode(ids)


def test_exported_byte_tokenizer_has_our_special_ids_and_pads_on_the_left(tok):
    byte = ByteTokenizer()
    assert (tok.eos_token_id, tok.pad_token_id, len(tok)) == (byte.eos_id, byte.pad_id, byte.vocab_size)
    assert tok("ab").input_ids == [97, 98]  # no BOS/EOS added
    assert tok.decode([104, 105, byte.eos_id, byte.pad_id], skip_special_tokens=True) == "hi"
    assert tok(["a", "abc"], padding=True).input_ids == [[byte.pad_id, byte.pad_id, 97], [97, 98, 99]]
    assert tok.decode([0xE4, 0xB8]) == ByteTokenizer().decode([0xE4, 0xB8])  # a cut character: U+FFFD alike
    assert tok.model_max_length == 64


def test_a_runs_hugging_face_tokenizer_folder_is_copied(tmp_path):
    from helpers import tiny_hf_teacher
    from transformers import AutoTokenizer

    src = tiny_hf_teacher(tmp_path / "teacher")
    write_tokenizer(load_tokenizer(str(src), vocab_size=400), tmp_path / "out")
    mine, theirs = AutoTokenizer.from_pretrained(tmp_path / "out"), AutoTokenizer.from_pretrained(src)
    for text in TEXTS:
        assert mine(text).input_ids == theirs(text).input_ids
    assert (mine.eos_token_id, mine.pad_token_id) == (theirs.eos_token_id, theirs.pad_token_id)
    with pytest.raises(ConfigError, match="has 300 tokens but the model only 258"):
        load_tokenizer(str(src), vocab_size=258)
    with pytest.raises(MissingFileError, match="pass --tokenizer FOLDER"):
        load_tokenizer(str(tmp_path / "moved"), vocab_size=400)
