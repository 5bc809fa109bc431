"""Early, one-line checks of things that only meet at setup time (model vs tokenizer vs teacher)."""

from __future__ import annotations

from pikv_train.errors import ConfigError, warn_once


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


def check_positions(trainer, max_seq_len: int, who: str, where: str | None = None) -> None:
    """Refuse data whose sequences are longer than the model's (or the teacher's) positions; ``where`` is
    the setting that holds ``max_seq_len``."""
    dm = getattr(trainer, "datamodule", None)
    hp = getattr(dm, "hparams", None)
    if hp is None:
        return
    need = data_length(hp)
    if need > max_seq_len:
        fix = ("train a teacher with a longer max_seq_len" if who == "teacher"
               else f"raise the {who}'s max_seq_len ({where or who + '.max_seq_len'})")
        raise ConfigError(
            f"data sequences of {need} tokens exceed the {who}'s max_seq_len={max_seq_len}; "
            f"lower data.seq_len (or prompt_len + response_len) or {fix}"
        )


def data_length(hp) -> int:
    """The longest sequence the data module gives: seq_len, or prompt_len + response_len in prompts mode."""
    return hp.prompt_len + hp.response_len if getattr(hp, "mode", "packed") == "prompts" else hp.seq_len


def check_cache_budget(trainer, policy) -> None:
    """Warn once when an integer cache budget covers the data's longest sequence: the policy then keeps
    every key (full attention), which is legal but rarely what a budget was set for."""
    hp = getattr(getattr(trainer, "datamodule", None), "hparams", None)
    cfg = getattr(policy, "cfg", None)
    if hp is None or cfg is None or cfg.policy == "full" or cfg.budget <= 1:
        return
    need = data_length(hp)
    if cfg.budget >= need:
        warn_once(
            f"model.init_args.cache.budget={cfg.budget:g} tokens is >= the data's longest sequence ({need} tokens), "
            f"so cache.policy={cfg.policy} keeps every key (full attention); set cache.budget below {need} tokens "
            "or a fraction in (0, 1) to train under the policy"
        )
