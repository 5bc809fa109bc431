"""DataModule: sources, deterministic split, packing, loss masks, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from pikv_train.data import ByteTokenizer, TextDataModule, embedded_documents
from pikv_train.data.corpus import stdlib_folder
from pikv_train.errors import DataError, MissingFileError


def test_embedded_corpus_is_the_sorted_stdlib_sources():
    docs = embedded_documents()
    names = [d["name"] for d in docs]
    assert names == sorted(names) and len(names) > 100
    assert docs[0]["text"] == (stdlib_folder() / names[0]).read_text()


def test_split_is_deterministic_and_disjoint():
    a, b = TextDataModule(max_documents=30, seq_len=32), TextDataModule(max_documents=30, seq_len=32)
    a.setup(), b.setup()
    assert [r["name"] for r in a.val_rows] == [r["name"] for r in b.val_rows]
    train_names = {r["name"] for r in a.split_rows(a.load_rows())[0]}
    assert not train_names & {r["name"] for r in a.val_rows}
    c = TextDataModule(max_documents=30, seq_len=32, split_seed=7)
    c.setup()
    assert [r["name"] for r in c.val_rows] != [r["name"] for r in a.val_rows]


def test_packing_shifts_targets_and_separates_documents(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"text": t}) for t in ["abcdefgh", "ijklmnop", "qrstuvwx", "yz012345"] * 5))
    dm = TextDataModule(path=str(f), seq_len=8, batch_size=2, val_fraction=0.25)
    dm.setup()
    item = dm.train_set[0]
    assert torch.equal(item["input_ids"][1:], item["targets"][:-1])
    stream = torch.cat([dm.train_set[i]["input_ids"] for i in range(len(dm.train_set))])
    assert (stream == ByteTokenizer.eos_id).sum() >= 1  # documents end with EOS
    assert item["loss_mask"].all()
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (2, 8)


def test_prompt_response_masks_cover_responses_only(tmp_path):
    f = tmp_path / "pr.json"
    rows = [{"prompt": "Q:12", "response": "A!"}] * 40
    f.write_text(json.dumps(rows))
    dm = TextDataModule(path=str(f), prompt_field="prompt", response_field="response", seq_len=7, val_fraction=0.1)
    dm.setup()
    item = dm.train_set[0]  # window = "Q:12A!<eos>Q" -> targets ":12A!<eos>Q"
    assert item["targets"].tolist()[:6] == [ord(":"), ord("1"), ord("2"), ord("A"), ord("!"), 256]
    assert item["loss_mask"].tolist() == [False, False, False, True, True, True, False]


@pytest.mark.parametrize("fmt", ["txt", "parquet"])
def test_text_and_parquet_files(tmp_path, fmt):
    texts = [f"line number {i} " * 5 for i in range(40)]
    if fmt == "txt":
        f = tmp_path / "a.txt"
        f.write_text("\n".join(texts))
    else:
        import datasets

        f = tmp_path / "a.parquet"
        datasets.Dataset.from_dict({"text": texts}).to_parquet(str(f))
    dm = TextDataModule(path=str(f), seq_len=16, batch_size=2)
    dm.setup()
    assert len(dm.train_set) > 0 and len(dm.val_set) > 0


def test_missing_file_is_a_one_line_error(tmp_path):
    with pytest.raises(MissingFileError, match="data file not found: .*nope.jsonl"):
        TextDataModule(path=str(tmp_path / "nope.jsonl"))


def test_empty_dataset_is_refused(tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("")
    dm = TextDataModule(path=str(f), format="json")
    with pytest.raises(DataError, match="is empty"):
        dm.setup()


def test_too_little_data_for_one_sequence(tmp_path):
    f = tmp_path / "small.jsonl"
    f.write_text("\n".join(json.dumps({"text": "hi"}) for _ in range(4)))
    dm = TextDataModule(path=str(f), seq_len=512)
    with pytest.raises(DataError, match="lower data.seq_len"):
        dm.setup()


def test_missing_field_names_the_fields(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text("\n".join(json.dumps({"body": "hello world"}) for _ in range(4)))
    dm = TextDataModule(path=str(f))
    with pytest.raises(DataError, match="no field 'text'.*body"):
        dm.setup()


def test_val_fraction_zero_trains_without_validation():
    import lightning as L

    from pikv_train.errors import ConfigError
    from pikv_train.models import ModelConfig
    from pikv_train.tasks import LanguageModelTask

    dm = TextDataModule(max_documents=4, seq_len=32, batch_size=2, val_fraction=0)
    dm.setup("fit")
    assert dm.val_rows == [] and dm.val_dataloader() == []
    assert len(dm.split_rows(dm.load_rows())[0]) == 4  # every document trains
    trainer = L.Trainer(max_steps=4, val_check_interval=2, limit_val_batches=2, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(LanguageModelTask(model=ModelConfig.preset("nano")), datamodule=dm)
    assert trainer.global_step == 4 and not any(k.startswith("val/") for k in trainer.callback_metrics)
    for stage in ("validate", "test", "predict"):
        with pytest.raises(ConfigError, match=f"no validation split to {stage} on; set data.val_fraction > 0"):
            dm.setup(stage)


@pytest.mark.parametrize("bad", [-0.1, 1.0])
def test_val_fraction_out_of_range_is_refused(bad):
    from pikv_train.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data.val_fraction must be in \[0, 1\)"):
        TextDataModule(val_fraction=bad)
