"""LightningDataModule over Hugging Face ``datasets``: load, split, tokenize, pack.

Sources: the embedded corpus (default, no download), local text / json / jsonl / parquet files, or a
hub dataset name when a network exists. Rows hold either a text field (every token is trained on) or
prompt/response fields (only response tokens, and the EOS after them, carry loss).

Packing: the tokenized rows are concatenated, each followed by EOS, and cut into windows of
``seq_len + 1`` tokens; a window gives ``input_ids = w[:-1]``, ``targets = w[1:]`` and
``loss_mask`` = whether each target is a trained token.
"""

from __future__ import annotations

from pikv_train.errors import ConfigError, DataError, MissingFileError, check_range

from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pikv_train.data.corpus import embedded_documents
from pikv_train.data.prompts import PromptCollator, PromptDataset, windows_from_stream
from pikv_train.data.sampler import ResumableRandomSampler
from pikv_train.data.tokenizer import Tokenizer, build_tokenizer

_FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class PackedDataset(Dataset):
    """Fixed-length windows over one token stream. tokens, mask: (L,) arrays."""

    def __init__(self, tokens: np.ndarray, mask: np.ndarray, seq_len: int):
        self.tokens, self.mask, self.seq_len = tokens, mask, seq_len
        self.n = max(0, (len(tokens) - 1) // seq_len)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s = i * self.seq_len
        w = torch.from_numpy(self.tokens[s : s + self.seq_len + 1].astype(np.int64))
        m = torch.from_numpy(self.mask[s + 1 : s + self.seq_len + 1].copy())
        return {"input_ids": w[:-1], "targets": w[1:], "loss_mask": m}


def _check_text_columns(rows: list[dict], columns: list[tuple[str, str | None]], path) -> None:
    """Every used column holds text in every row. A null would become the literal text "None"; a number
    (or list, ...) usually means the wrong column was named, and its printed form is not the text meant."""
    for key, col in columns:
        if col is None:
            continue
        for i, r in enumerate(rows):
            v = r.get(col)
            if isinstance(v, str):
                continue
            what = "is null (missing)" if v is None else f"holds {str(v)[:40]!r} of type {type(v).__name__}, not text"
            raise DataError(
                f"{key}={col!r}: row {i} (0-based) of {path or 'the embedded corpus'!r} {what}; every row's {col!r} "
                f"must be a string: fix or drop that row, or point {key} at the text column"
            )


class TextDataModule(L.LightningDataModule):
    """Tokenized, packed language-modelling data with a deterministic train/validation split.

    Args:
        path: a local file or folder (text / json / jsonl / parquet), a hub dataset name with
            ``format: hub``, or None for the embedded corpus (Python stdlib sources).
        format: file format; ``auto`` infers it from the file ending.
        text_field: column holding plain text.
        prompt_field / response_field: columns for prompt/response data; when both are set, loss covers
            response tokens only.
        tokenizer: ``byte`` (built in) or a local Hugging Face tokenizer folder.
        seq_len: tokens per training sequence.
        batch_size: sequences per micro-batch (per device).
        val_fraction: share of rows (documents) held out for validation; 0 holds none out: training runs
            without validation (no val/ metrics) and validate / test / predict refuse to run.
        split_seed: seed of the row permutation that decides the split.
        max_documents: use only the first N rows (after loading, before splitting).
        num_workers: DataLoader workers.
        shuffle_seed: seed of the training-order shuffle.
        mode: ``packed`` (fixed windows over the concatenated stream) or ``prompts`` (prompt/response
            examples for on-policy objectives; text rows are cut into prompt_len + response_len windows).
        prompt_len / response_len: in ``prompts`` mode, the prompt is cut to its last prompt_len tokens and
            the reference response to its first response_len tokens.
        student_response_field: in ``prompts`` mode, a column with a second (student) response for
            DistiLLM-2 read from data (e.g. ``rejected`` beside ``chosen``).
    """

    def __init__(
        self,
        path: str | None = None,
        format: Literal["auto", "text", "json", "parquet", "hub"] = "auto",
        text_field: str = "text",
        prompt_field: str | None = None,
        response_field: str | None = None,
        tokenizer: str = "byte",
        seq_len: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        split_seed: int = 1234,
        max_documents: int | None = None,
        num_workers: int = 0,
        shuffle_seed: int = 0,
        mode: Literal["packed", "prompts"] = "packed",
        prompt_len: int = 64,
        response_len: int = 64,
        student_response_field: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}; set e.g. 0.05, or 0 for no "
                              "validation split")
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("prompt_len", prompt_len),
                            ("response_len", response_len)):
            check_range(f"data.{name}", value, lo=1, fix=f"set data.{name} to a positive integer")
        if max_documents is not None:
            check_range("data.max_documents", max_documents, lo=1, fix="set data.max_documents >= 1, or null for all rows")
        check_range("data.num_workers", num_workers, lo=0, fix="set data.num_workers >= 0 (0 = load in the main process)")
        if student_response_field and not prompt_field:
            raise ConfigError("data.student_response_field needs data.prompt_field and data.response_field")
        if (prompt_field is None) != (response_field is None):
            raise ConfigError("set both data.prompt_field and data.response_field, or neither")
        if path is not None and format != "hub" and not Path(path).exists():
            raise MissingFileError(
                f"data file not found: {path!r}; fix data.path, or remove it to use the embedded corpus"
            )
        self.tokenizer: Tokenizer = build_tokenizer(tokenizer)
        self.train_set: PackedDataset | PromptDataset | None = None
        self.val_set: PackedDataset | PromptDataset | None = None
        self.val_rows: list[dict] = []

    # ---------------------------------------------------------------- loading
    def load_rows(self) -> list[dict]:
        """All rows of the source as dicts (the embedded corpus, local files or a hub dataset)."""
        hp = self.hparams
        if hp.path is None:
            rows = embedded_documents(hp.max_documents)
        else:
            import datasets

            fmt = hp.format
            if fmt == "hub":
                ds = datasets.load_dataset(hp.path, split="train")
            else:
                files = sorted(p for p in Path(hp.path).rglob("*") if p.is_file()) if Path(hp.path).is_dir() else [Path(hp.path)]
                if fmt == "auto":
                    kinds = {_FORMATS.get(f.suffix.lower()) for f in files}
                    if len(kinds) != 1 or None in kinds:
                        raise ConfigError(
                            f"cannot infer the format of {hp.path!r} (endings {sorted({f.suffix for f in files})}); "
                            "set data.format to text, json or parquet"
                        )
                    fmt = kinds.pop()
                if all(f.stat().st_size == 0 for f in files):
                    raise DataError(f"dataset {hp.path!r} is empty; point data.path at a file with rows")
                try:
                    ds = datasets.load_dataset(fmt, data_files=[str(f) for f in files], split="train")
                except Exception as e:  # datasets raises many types, some with empty messages
                    raise DataError(
                        f"cannot read {hp.path!r} as {fmt} ({type(e).__name__}: {str(e)[:120] or 'no detail'}); "
                        "check the file or set data.format"
                    ) from e
            rows = ds.to_list() if hp.max_documents is None else ds.select(range(min(hp.max_documents, len(ds)))).to_list()
        if not rows:
            raise DataError(f"dataset {hp.path or 'embedded corpus'!r} is empty; point data.path at a file with rows")
        need = [hp.prompt_field, hp.response_field] if hp.prompt_field else [hp.text_field]
        missing = [f for f in need if f not in rows[0]]
        if missing:
            raise DataError(
                f"dataset rows have no field {missing[0]!r} (fields: {sorted(rows[0])}); "
                "set data.text_field or data.prompt_field/response_field"
            )
        _check_text_columns(rows, [("data.prompt_field", hp.prompt_field), ("data.response_field", hp.response_field),
                                   ("data.student_response_field", hp.student_response_field)]
                            if hp.prompt_field else [("data.text_field", hp.text_field)], hp.path)
        return rows

    def split_rows(self, rows: list[dict]) -> tuple[list[dict], list[dict]]:
        """Deterministic split by a seeded permutation of row indices (order within each split kept)."""
        n = len(rows)
        n_val = max(1, int(round(n * self.hparams.val_fraction))) if n > 1 and self.hparams.val_fraction > 0 else 0
        perm = np.random.default_rng(self.hparams.split_seed).permutation(n)
        val_idx = set(perm[:n_val].tolist())
        return [r for i, r in enumerate(rows) if i not in val_idx], [r for i, r in enumerate(rows) if i in val_idx]

    def tokenize(self, rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """Concatenate rows into one stream; returns tokens (L,) int32 and loss mask (L,) bool per token."""
        hp, tok = self.hparams, self.tokenizer
        toks, masks = [], []
        for r in rows:
            if hp.prompt_field:
                p, y = tok.encode(str(r[hp.prompt_field])), tok.encode(str(r[hp.response_field])) + [tok.eos_id]
                toks += [p, y]
                masks += [np.zeros(len(p), bool), np.ones(len(y), bool)]
            else:
                t = tok.encode(str(r[hp.text_field])) + [tok.eos_id]
                toks.append(t)
                masks.append(np.ones(len(t), bool))
        if not toks:
            return np.zeros(0, np.int32), np.zeros(0, bool)
        return np.concatenate([np.asarray(t, np.int32) for t in toks]), np.concatenate(masks)

    def examples(self, rows: list[dict]) -> list[dict]:
        """Prompt/response examples (``prompts`` mode)."""
        hp, tok = self.hparams, self.tokenizer
        as_t = lambda ids: torch.tensor(ids, dtype=torch.long)  # noqa: E731
        if not hp.prompt_field:
            tokens, ends = [], []
            for r in rows:
                tokens += tok.encode(str(r[hp.text_field])) + [tok.eos_id]
                ends.append(len(tokens))
            return windows_from_stream(as_t(tokens), ends, hp.prompt_len, hp.response_len)
        out = []
        for r in rows:
            ex = {
                "prompt": as_t(tok.encode(str(r[hp.prompt_field]))[-hp.prompt_len :] or [tok.eos_id]),
                "response": as_t((tok.encode(str(r[hp.response_field])) + [tok.eos_id])[: hp.response_len]),
            }
            if hp.student_response_field:
                ex["student_response"] = as_t(
                    (tok.encode(str(r[hp.student_response_field])) + [tok.eos_id])[: hp.response_len]
                )
            out.append(ex)
        return out

    @property
    def has_validation(self) -> bool:
        """Whether a validation split is held out (``val_fraction > 0``)."""
        return self.hparams.val_fraction > 0

    def setup(self, stage: str | None = None) -> None:
        if not self.has_validation and stage in ("validate", "test", "predict"):
            raise ConfigError(
                f"data.val_fraction is 0, so there is no validation split to {stage} on; set data.val_fraction > 0"
            )
        if self.train_set is not None:
            return
        rows = self.load_rows()
        train_rows, val_rows = self.split_rows(rows)
        self.val_rows = val_rows
        if self.hparams.mode == "prompts":
            self.train_set, self.val_set = PromptDataset(self.examples(train_rows)), PromptDataset(self.examples(val_rows))
        else:
            self.train_set = PackedDataset(*self.tokenize(train_rows), self.hparams.seq_len)
            self.val_set = PackedDataset(*self.tokenize(val_rows), self.hparams.seq_len)
        if len(self.train_set) == 0:
            raise DataError(
                f"no training sequence of {self.hparams.seq_len + 1} tokens in {self.hparams.path or 'embedded corpus'!r}; "
                "add data or lower data.seq_len"
            )
        if len(self.val_set) == 0 and self.has_validation:
            raise DataError(
                f"the validation split of {self.hparams.path or 'embedded corpus'!r} is shorter than one sequence; "
                "raise data.val_fraction, add data or lower data.seq_len"
            )

    # ------------------------------------------------------------ dataloaders
    def state_dict(self) -> dict:
        """Position in the training order (saved in checkpoints, so a resumed run continues mid-epoch)."""
        trainer = self.trainer
        if trainer is None:
            return {}
        loop = trainer.fit_loop.epoch_loop
        # `processed`, not `completed`: checkpoints are written in on_train_batch_end, before `completed` moves.
        return {"epoch": trainer.current_epoch, "batches_done": int(loop.batch_progress.current.processed)}

    def load_state_dict(self, state: dict) -> None:
        self._resume = state

    def train_dataloader(self) -> DataLoader:
        sampler = ResumableRandomSampler(len(self.train_set), seed=self.hparams.shuffle_seed)
        resume = getattr(self, "_resume", None)
        if resume:
            # Skip what the interrupted run already consumed in this epoch (in samples).
            sampler.set_epoch(resume.get("epoch", 0))
            world = self.trainer.world_size if self.trainer is not None else 1
            sampler.skip = min(len(self.train_set), resume.get("batches_done", 0) * self.hparams.batch_size * world)
            self._resume = None
        return DataLoader(
            self.train_set, batch_size=self.hparams.batch_size, sampler=sampler, collate_fn=self.collate,
            # Full batches only (fixed shapes), unless the split is smaller than one batch.
            drop_last=len(self.train_set) >= self.hparams.batch_size,
            num_workers=self.hparams.num_workers, persistent_workers=self.hparams.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader | list:
        if not self.has_validation:
            return []  # no validation split: Lightning skips validation
        return DataLoader(
            self.val_set, batch_size=self.hparams.batch_size, shuffle=False, num_workers=self.hparams.num_workers,
            collate_fn=self.collate,
        )

    @property
    def collate(self):
        return PromptCollator(self.tokenizer.pad_id) if self.hparams.mode == "prompts" else None

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()
