"""``python -m pikv_train export``: a checkpoint of a real (tiny) distillation run becomes a Hugging Face folder that
plain transformers loads with the student's logits and tokenizer, with the cache the student trained under
(``pikv_cache.json`` + its learned DuoAttention gates) and a model card describing the run; bad input is one
``error:`` line and exit code 2."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from helpers import assert_close_rel, run_cli, write

from pikv_train.cli import main
from pikv_train.evaluate import load_decoder
from pikv_train.hf.cache_file import read_cache_config
from pikv_train.hf.command import export_checkpoint
from pikv_train.models import Decoder, ModelConfig
from pikv_train.models.config import MoEConfig
from pikv_train.routing import RouterConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 2-step KV-Distill run: the MoE student is its own teacher under DuoAttention (learned gates) with
    expert-sharded KV; W&B offline logs the validation figures; returns the run folder."""
    tmp = tmp_path_factory.mktemp("export_run")
    recipe = write(tmp / "run.yaml", f"""
        defaults: [configs/trainer/cpu.yaml]
        seed_everything: 0
        out_dir: {tmp / 'run'}
        model:
          class_path: pikv_train.tasks.DistillationTask
          init_args:
            student: configs/model/nano_moe.yaml
            teacher: {{student_itself: true}}
            cache: {{policy: duo_attention, budget: 0.5, reference_len: 32}}
            kv_sharding: {{enabled: true}}
        data: {{seq_len: 32, batch_size: 4, max_documents: 6}}
        trainer:
          max_steps: 2
          limit_val_batches: 2
          val_check_interval: 2
          enable_progress_bar: false
          enable_model_summary: false
        """)
    proc = run_cli("fit", "--config", str(recipe))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run"


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    """The run's last checkpoint exported through the CLI's entry point (``export`` is dispatched before Lightning)."""
    import io
    from contextlib import redirect_stdout

    out = tmp_path_factory.mktemp("export") / "student"
    printed = io.StringIO()
    with redirect_stdout(printed):
        main(["export", "--ckpt", str(run / "checkpoints" / "last.ckpt"), "--out", str(out)])
    return out, printed.getvalue()


def test_export_writes_a_folder_plain_transformers_loads_with_the_students_logits(run, exported):
    import transformers

    out, printed = exported
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "README.md", "pikv_cache.json", "pikv_cache.safetensors"} <= names
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()  # no trust_remote_code
    tok = transformers.AutoTokenizer.from_pretrained(out)
    student = load_decoder(run / "checkpoints" / "last.ckpt")
    text = ["The student reads its cache.", "Ünïcode ✓ 中文"]
    ids = [torch.tensor(tok(t, add_special_tokens=False).input_ids) for t in text]
    assert [i.tolist() for i in ids] == [list(t.encode()) for t in text]
    with torch.no_grad():
        for i in ids:
            assert_close_rel(hf(input_ids=i[None]).logits[0], student.logits(student(i[None]).hidden)[0], 1e-5)
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["eos_token_id"], gen["pad_token_id"], gen["do_sample"]) == (256, 257, False)
    assert (tok.eos_token_id, tok.pad_token_id) == (256, 257)
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    n = hf.num_parameters()
    assert "architecture  MixtralForCausalLM" in printed and f"parameters    {n:,}" in printed
    assert "README.md" in printed and "pikv_cache.json" in printed


def test_pikv_cache_json_holds_the_cache_the_student_trained_under_and_its_learned_gates(run, exported):
    from safetensors.torch import load_file

    out, _ = exported
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    spec = read_cache_config(out)
    assert spec == json.loads((out / "pikv_cache.json").read_text())
    assert spec["cache"] == json.loads(json.dumps(ckpt["pikv_cache_policy"]))
    assert spec["cache"]["policy"] == "duo_attention"
    assert spec["sharding"] == ckpt["hyper_parameters"]["kv_sharding"] and spec["sharding"]["enabled"]
    assert spec["state"] == "pikv_cache.safetensors"
    state = load_file(str(out / "pikv_cache.safetensors"))
    assert set(state) == {"gates"} and torch.equal(state["gates"], ckpt["state_dict"]["student.cache_policy.gates"])


def test_model_card_describes_the_run(run, exported):
    from wandb_reader import read_history

    out, _ = exported
    card = (out / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"pikv_train", "distillation", "mixture-of-experts"} <= set(meta["tags"])
    n = sum(t.numel() for t in load_file_tensors(out))
    for shown in ("`MixtralForCausalLM`", f"parameters: {n:,}", "2 layers", "4 experts of width 32, top-2",
                  "The student itself without its cache compression", "objective `kd`",
                  "embedded corpus", "first 6 documents", "sequences of 32 tokens", "tokenizer: `byte`",
                  "policy: `duo_attention`, budget 0.5 of a 32-token reference length", "compressor: `none`",
                  "expert-sharded KV: one shard per expert", "`pikv_cache.safetensors`",
                  f'PiKVCache.from_pretrained("{out}")'):
        assert shown in body, shown
    # The validation figures are the run's own (read here with an independent W&B reader).
    history = [r for f in (run / "wandb").glob("offline-run-*/run-*.wandb") for r in read_history(f)]
    last = {k: v for r in history for k, v in r.items() if k.startswith("val/")}
    assert last.keys() >= {"val/loss", "val/ppl", "val/kd", "val/agreement"}
    for k, v in last.items():
        assert f"| {k} | {v:.6g} |" in body, k
    assert "not recorded" not in body
    recipe = body.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert recipe == (run / "config.yaml").read_text().rstrip() + "\n"


def load_file_tensors(out):
    from safetensors.torch import load_file

    # Tied embeddings are stored once: the folder's tensors are the model's parameters.
    return load_file(str(out / "model.safetensors")).values()


def test_card_of_a_lone_checkpoint_says_not_recorded_and_shows_the_stored_settings(run, tmp_path):
    lone = tmp_path / "last.ckpt"
    shutil.copy(run / "checkpoints" / "last.ckpt", lone)
    export_checkpoint(lone, tmp_path / "out")
    body = (tmp_path / "out" / "README.md").read_text()
    validation = body.split("## Validation", 1)[1].split("##", 1)[0]
    assert "Not recorded" in validation and "|" not in validation
    assert "the checkpoint's hyper-parameters; no config.yaml was found" in body
    recipe = yaml.safe_load(body.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert recipe["model"]["class_path"] == "pikv_train.tasks.DistillationTask"
    assert recipe["model"]["init_args"]["cache"]["policy"] == "duo_attention" and recipe["data"]["seq_len"] == 32


# ----------------------------------------------------------------------------------------------- synthetic checkpoints
def _checkpoint(path, router: str | None = None, tokenizer: str = "byte", vocab: int = 258):
    """A minimal language-model checkpoint of a nano decoder (dense, or MoE with ``router``)."""
    moe = None if router is None else MoEConfig(n_experts=4, d_expert=16, router=RouterConfig(name=router, top_k=2))
    cfg = ModelConfig(vocab_size=vocab, n_layer=1, n_head=2, n_kv_head=1, d_model=16, d_ff=32, max_seq_len=32, moe=moe)
    torch.save({"state_dict": {f"model.{k}": v for k, v in Decoder(cfg).state_dict().items()},
                "pikv_model_config": cfg.to_dict(), "pikv_task": "lm", "pikv_cache_policy": None, "global_step": 3,
                "hyper_parameters": {"model": cfg.to_dict()}, "datamodule_hyper_parameters": {"tokenizer": tokenizer}},
               path)
    return path


def _error(capsys, *args) -> str:
    with pytest.raises(SystemExit) as e:
        main(["export", *args])
    assert e.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_input_is_one_error_line_and_exit_code_2(tmp_path, capsys):
    good = _checkpoint(tmp_path / "good.ckpt")
    out = ("--out", str(tmp_path / "out"))
    line = _error(capsys, "--ckpt", str(tmp_path / "none.ckpt"), *out)
    assert "checkpoint not found" in line and "checkpoints/last.ckpt" in line
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    assert "it is not a checkpoint (a text file" in _error(capsys, "--ckpt", str(tmp_path / "notes.ckpt"), *out)
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    line = _error(capsys, "--ckpt", str(tmp_path / "foreign.ckpt"), *out)
    assert "is not a pikv_train checkpoint" in line and "python -m pikv_train fit" in line
    line = _error(capsys, "--ckpt", str(_checkpoint(tmp_path / "adaptive.ckpt", "adaptive")), *out)
    assert "cannot export this student: router adaptive" in line and "Qwen2-MoE" in line
    line = _error(capsys, "--ckpt", str(_checkpoint(tmp_path / "moved.ckpt", tokenizer=str(tmp_path / "gone"))), *out)
    assert "tokenizer folder" in line and "--tokenizer FOLDER" in line
    assert "the following arguments are required: --out" in _error(capsys, "--ckpt", str(good))
    assert not (tmp_path / "out").exists()  # nothing written by a refused export
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    line = _error(capsys, "--ckpt", str(good), *out)
    assert "exists and is not empty" in line and "--force" in line
    main(["export", "--ckpt", str(good), *out, "--force"])
    printed = capsys.readouterr().out
    assert "architecture  LlamaForCausalLM" in printed and (tmp_path / "out" / "config.json").is_file()
    assert "mine.txt" not in printed and (tmp_path / "out" / "mine.txt").read_text() == "keep"


def test_help_names_the_command_and_its_options(capsys):
    assert main(["export", "--help"]) is None
    text = capsys.readouterr().out
    for shown in ("python -m pikv_train export", "--ckpt", "--out", "--force", "--tokenizer", "pikv_cache.json",
                  "Mixtral", "Qwen2-MoE"):
        assert shown in text, shown
