"""Early, one-line checks of things that only meet at setup time (model vs tokenizer vs teacher)."""

from __future__ import annotations

from pikv_train.errors import ConfigError


def check_vocab(trainer, model_vocab: int, who: str) -> None:
    """Refuse a model whose vocabulary cannot hold every id of the datamodule's tokenizer.

    A larger model vocabulary is allowed (vocabularies padded to a multiple of 64 or 128 are common).
    """
    dm = getattr(trainer, "datamodule", None)
    tok = getattr(dm, "tokenizer", None)
    if tok is not None and tok.vocab_size > model_vocab:
        raise ConfigError(
            f"{who} vocab_size={model_vocab} is smaller than the tokenizer's vocab_size={tok.vocab_size} "
            f"({getattr(tok, 'name', type(tok).__name__)}); set the {who}'s vocab_size to at least {tok.vocab_size}"
        )


def check_positions(trainer, max_seq_len: int, who: str) -> None:
    """Refuse data whose sequences are longer than the model's positions."""
    dm = getattr(trainer, "datamodule", None)
    hp = getattr(dm, "hparams", None)
    if hp is None:
        return
    need = hp.prompt_len + hp.response_len if getattr(hp, "mode", "packed") == "prompts" else hp.seq_len
    if need > max_seq_len:
        raise ConfigError(
            f"data sequences of {need} tokens exceed the {who}'s max_seq_len={max_seq_len}; "
            f"lower data.seq_len (or prompt_len + response_len) or raise the {who}'s max_seq_len"
        )
