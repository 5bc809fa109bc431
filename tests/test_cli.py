"""The real CLI end to end: recipes parse, debug run writes a checkpoint and an offline W&B run,
resume continues from the saved step, 2-process DDP matches 1 process, bad input gives one-line errors."""

from __future__ import annotations

import glob
import json
import re
from pathlib import Path

import pytest
import torch
from helpers import lm_recipe, run_cli, write
from wandb_reader import read_history

from conftest import ROOT

RECIPES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "recipes").glob("*.yaml"))


def _error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_parses_through_the_real_cli(recipe):
    proc = run_cli("fit", "--config", recipe, "--print_config")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "class_path: pikv_train.tasks." in proc.stdout
    header = (ROOT / recipe).read_text().splitlines()[:6]
    assert sum(ln.startswith("#") for ln in header) >= 3, "recipes open with a comment header"
    assert any("python -m pikv_train" in ln for ln in header), "the header gives the exact command"


def test_debug_recipe_end_to_end_writes_checkpoint_and_wandb_metrics(tmp_path):
    out = tmp_path / "debug"
    proc = run_cli("fit", "--config", "recipes/debug.yaml", "--out_dir", str(out), "--trainer.max_steps", "6",
                   "--trainer.val_check_interval", "3", env=None, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "checkpoints" / "last.ckpt").is_file()
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 6
    runs = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1
    rows = read_history(runs[0])
    keys = set().union(*rows)
    for k in ("train/loss", "train/ce", "val/loss", "val/ppl", "router/aux_loss", "router/max_mean_load", "optim/lr"):
        assert k in keys, f"{k} missing from the W&B run ({sorted(keys)})"
    assert "---- performance ----" in proc.stderr + proc.stdout
    assert (out / "config.yaml").is_file()


def test_fit_then_resume_from_last_continues_from_the_saved_step(tmp_path):
    recipe = lm_recipe(tmp_path, "res", steps=3)
    first = run_cli("fit", "--config", str(recipe))
    assert first.returncode == 0, first.stderr[-3000:]
    last = tmp_path / "res" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 3
    second = run_cli("fit", "--config", str(recipe), "--trainer.max_steps", "5", "--ckpt_path", "last")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Restoring states from the checkpoint" in second.stderr + second.stdout
    ckpt = torch.load(last, weights_only=False)
    assert ckpt["global_step"] == 5  # 3 restored + 2 new, not 5 from scratch
    # Folder names start with the run's start time: the second run sorts last.
    runs = sorted(glob.glob(str(tmp_path / "res" / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert len(runs) == 2
    history = read_history(runs[-1])
    steps = [r["trainer/global_step"] for r in history if "train/loss" in r]
    assert steps and min(steps) >= 3


def _val_loss(proc) -> float:
    m = re.search(r"val/loss\s+([0-9.]+)", proc.stdout + proc.stderr)  # the performance block
    assert m, (proc.stdout + proc.stderr)[-3000:]
    return float(m.group(1))


def test_two_process_ddp_matches_one_process(tmp_path):
    """Same global batch (2 x 2 vs 1 x 4): the validation loss after training agrees within tolerance."""
    recipe = lm_recipe(tmp_path, "ddp", steps=3, model="configs/model/nano_dense.yaml")
    common = ["--trainer.logger", "false", "--trainer.callbacks", "[pikv_train.callbacks.PerformanceMonitor]",
              "--trainer.enable_checkpointing", "false",
              "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "4"]
    one = run_cli("fit", "--config", str(recipe), "--data.batch_size", "4", *common)
    two = run_cli("fit", "--config", str(recipe), "--data.batch_size", "2", "--trainer.devices", "2",
                  "--trainer.strategy", "ddp", *common, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert "distributed_backend=gloo" in two.stderr + two.stdout
    assert _val_loss(two) == pytest.approx(_val_loss(one), abs=2e-3)


def test_config_files_merge_in_order(tmp_path):
    a = write(tmp_path / "a.yaml", "trainer:\n  max_steps: 7\n")
    b = write(tmp_path / "b.yaml", "trainer:\n  max_steps: 9\n")
    proc = run_cli("fit", "--config", "recipes/debug.yaml", "--config", str(a), "--config", str(b), "--print_config")
    assert proc.returncode == 0 and "max_steps: 9" in proc.stdout
    proc = run_cli("fit", "--config", "recipes/debug.yaml", "--config", str(b), "--config", str(a), "--print_config")
    assert "max_steps: 7" in proc.stdout


def test_interpolation_sees_command_line_overrides(tmp_path):
    proc = run_cli("fit", "--config", "recipes/debug.yaml", "--out_dir", str(tmp_path / "elsewhere"), "--print_config")
    assert proc.returncode == 0 and f"dirpath: {tmp_path / 'elsewhere'}/checkpoints" in proc.stdout


def test_predict_writes_completions_and_whole_number_limits_count_batches(tmp_path):
    recipe = lm_recipe(tmp_path, "pred", steps=2)
    streaming = ("--model.init_args.cache.budget", "8", "--model.init_args.cache.n_sink", "2")
    proc = run_cli("fit", "--config", str(recipe), "--model.init_args.cache.policy", "streaming_llm", *streaming)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = tmp_path / "pred" / "checkpoints" / "last.ckpt"
    proc = run_cli("predict", "--config", str(recipe), "--ckpt_path", str(ckpt), "--trainer.limit_predict_batches", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "pred" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4  # exactly one batch of 4 (a YAML/CLI "1" is one batch, not 100%)
    assert all(set(r) == {"prompt", "completion"} and r["prompt"] for r in rows)
    # validate the checkpoint (trained under streaming_llm) under the policy given, else under its own
    ppl = {}
    for policy, args in (("full", ("--model.init_args.cache.policy", "full")), ("own", ()),
                         ("streaming_llm", ("--model.init_args.cache.policy", "streaming_llm", *streaming))):
        proc = run_cli("validate", "--config", str(recipe), "--ckpt_path", str(ckpt), *args)
        assert proc.returncode == 0, proc.stderr[-2000:]
        ppl[policy] = float(re.search(r"val/ppl\W+([0-9.]+)", proc.stdout).group(1))
        assert ("from the checkpoint" if policy == "own" else "as given") in proc.stderr
    assert abs(ppl["streaming_llm"] - ppl["full"]) > 1e-3 and ppl["own"] == ppl["streaming_llm"]


def test_console_script_is_declared():
    from importlib.metadata import entry_points

    eps = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert eps.get("pikv-train") == "pikv_train.cli:main"


def _resolved(capsys, *args: str) -> str:
    """The config ``--print_config`` prints for ``fit ARGS`` (in-process: no interpreter start-up)."""
    from pikv_train.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    out, err = capsys.readouterr()
    assert exit_info.value.code in (0, None), err[-2000:]
    return out


@pytest.mark.parametrize("flag", [["--model.init_args.teacher.checkpoint", "null"],
                                  ["--model.init_args.teacher.checkpoint=null"],
                                  ["--model.init_args.teacher.checkpoint", "~"]])
def test_null_on_the_command_line_overrides_a_recipe_value(capsys, monkeypatch, flag):
    # The README's Hugging Face teacher command: the recipe's teacher.checkpoint must become null, not 'None'.
    monkeypatch.chdir(ROOT)
    out = _resolved(capsys, "--config", "recipes/distill.yaml", *flag, "--model.init_args.teacher.hf_path", "/hf/dir")
    teacher = out.split("    teacher:\n", 1)[1]
    assert "      checkpoint: null\n" in teacher and "      hf_path: /hf/dir\n" in teacher, teacher[:300]
    out = _resolved(capsys, "--config", "recipes/distill.yaml", "--model.init_args.student_init", "null")
    assert "    student_init: null\n" in out


def _user_config(folder: Path, with_defaults: bool) -> Path:
    """A user's own config outside the repository naming a building block by a repository-relative path."""
    head = "defaults: [configs/data/embedded.yaml]\n" if with_defaults else ""
    return write(folder / "mine.yaml", head + "model:\n  class_path: pikv_train.tasks.LanguageModelTask\n"
                 "  init_args:\n    model: configs/model/nano_moe.yaml\n")


@pytest.mark.parametrize("with_defaults", [False, True], ids=["no_defaults", "defaults"])
def test_building_blocks_resolve_the_same_with_and_without_defaults(tmp_path, capsys, monkeypatch, with_defaults):
    """Beside the naming file first, then the current directory, then the repository root."""
    cfg = _user_config(tmp_path / "user", with_defaults)
    monkeypatch.chdir(tmp_path)  # neither the repository nor the config's folder
    out = _resolved(capsys, "--config", str(cfg))
    assert "      d_model: 32\n" in out and "        n_experts: 4\n" in out  # configs/model/nano_moe.yaml of the repo
    # A building block beside the config wins over the repository's.
    write(tmp_path / "user" / "configs" / "model" / "nano_moe.yaml", "d_model: 48\nn_head: 2\nn_kv_head: 1\n")
    out = _resolved(capsys, "--config", str(cfg))
    assert "      d_model: 48\n" in out
    # Then the current directory.
    (tmp_path / "user" / "configs" / "model" / "nano_moe.yaml").rename(tmp_path / "elsewhere.yaml")
    write(tmp_path / "configs" / "model" / "nano_moe.yaml", "d_model: 40\nn_head: 2\nn_kv_head: 1\n")
    assert "      d_model: 40\n" in _resolved(capsys, "--config", str(cfg))


@pytest.mark.parametrize("with_defaults", [False, True], ids=["no_defaults", "defaults"])
def test_missing_building_block_names_the_file_and_where_it_was_looked_for(tmp_path, capsys, monkeypatch, with_defaults):
    from pikv_train.cli import main

    cfg = _user_config(tmp_path, with_defaults)
    cfg.write_text(cfg.read_text().replace("nano_moe.yaml", "nano_mo.yaml"))
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(cfg), "--print_config"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2
    assert line.startswith("error: config file not found: 'configs/model/nano_mo.yaml' (named by model.init_args.model in ")
    for place in (tmp_path / "configs/model/nano_mo.yaml", ROOT / "configs/model/nano_mo.yaml"):
        assert str(place) in line, line
    assert "fix the path" in line and "Given value" not in line
    # A building block named on the command line: the current directory, then the repository root.
    with pytest.raises(SystemExit):
        main(["fit", "--config", "recipes/debug.yaml", "--model.init_args.model", "configs/model/none.yaml"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "config file not found: 'configs/model/none.yaml' (named by --model.init_args.model on the command line)" in line
