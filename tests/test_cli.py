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
    # --ckpt_path last behaves as the file it resolves to: the checkpoint's policy when none is given
    proc = run_cli("validate", "--config", str(recipe), "--ckpt_path", "last")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cache policy streaming_llm (from the checkpoint)" in proc.stderr
    assert float(re.search(r"val/ppl\W+([0-9.]+)", proc.stdout).group(1)) == ppl["own"]


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


# --------------------------------------------------------------------------- resume, evaluate, folders (issue 12)
NO_LOGGER = ("--trainer.logger", "false")


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    """A finished 2-step MoE LanguageModelTask run; tests copy its folder (``_copy_run``)."""
    tmp = tmp_path_factory.mktemp("moe_run")
    recipe = lm_recipe(tmp, "run", steps=2)
    proc = run_cli("fit", "--config", str(recipe), *NO_LOGGER)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return tmp / "run"


def _copy_run(moe_run: Path, tmp: Path, name: str) -> Path:
    """``moe_run`` copied to tmp/name, with a recipe tmp/name.yaml writing into it (a copied run is not for
    resuming: Lightning, seeing another checkpoint folder, saves the next last checkpoint as last-v1.ckpt)."""
    import shutil

    shutil.copytree(moe_run, tmp / name)
    return lm_recipe(tmp, name, steps=2)


def _warnings_about_the_checkpoint(proc) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if "differ from the checkpoint's" in ln]


@pytest.mark.parametrize("form", ["file", "last"])
def test_resume_uses_the_commands_settings_and_lists_what_differs_in_one_warning(tmp_path, form):
    """--ckpt_path FILE and --ckpt_path last alike: the command's optimizer and router settings are used (not the
    checkpoint's hyper-parameters, nor the optimizer state's lr and betas); router capacity and kernel are
    behaviour, not architecture."""
    recipe = lm_recipe(tmp_path, "run", steps=2)
    assert run_cli("fit", "--config", str(recipe), *NO_LOGGER).returncode == 0
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    before = torch.load(ckpt, weights_only=False)["hyper_parameters"]
    proc = run_cli("fit", "--config", str(recipe), "--ckpt_path", str(ckpt) if form == "file" else "last",
                   "--trainer.max_steps", "3", "--model.init_args.optim.lr", "0.01", "--model.init_args.optim.beta2", "0.9",
                   "--model.init_args.model.moe.router.capacity_factor", "2.0",
                   "--model.init_args.model.moe.router.kernel", "reference", *NO_LOGGER)
    assert proc.returncode == 0, proc.stderr[-2000:]
    warned = _warnings_about_the_checkpoint(proc)
    assert len(warned) == 1, warned
    for shown in (f"model.init_args.optim.lr: {before['optim']['lr']} in the checkpoint, 0.01 now",
                  "model.init_args.optim.beta2: 0.95 in the checkpoint, 0.9 now",
                  "model.init_args.model.moe.router.capacity_factor: null in the checkpoint, 2.0 now",
                  "model.init_args.model.moe.router.kernel: 'auto' in the checkpoint, 'reference' now"):
        assert shown in warned[0], warned[0]
    after = torch.load(ckpt, weights_only=False)
    assert after["global_step"] == 3, proc.stderr[-3000:] + str(sorted(p.name for p in ckpt.parent.iterdir()))
    assert after["hyper_parameters"]["optim"]["lr"] == 0.01
    assert after["hyper_parameters"]["model"]["moe"]["router"]["capacity_factor"] == 2.0
    assert after["lr_schedulers"][0]["base_lrs"][0] == pytest.approx(0.01)  # the optimizer state follows too
    assert all(g["betas"] == (0.9, 0.9) for g in after["optimizer_states"][0]["param_groups"])


def test_evaluations_keep_the_training_config_and_init_from_counts_as_weights(moe_run, tmp_path):
    recipe = _copy_run(moe_run, tmp_path, "run")
    config = (tmp_path / "run" / "config.yaml").read_bytes()
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    proc = run_cli("validate", "--config", str(recipe), "--model.init_args.init_from", str(ckpt), *NO_LOGGER)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli("test", "--config", str(recipe), "--ckpt_path", str(ckpt), *NO_LOGGER)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "run" / "config.yaml").read_bytes() == config  # the training run's, untouched
    for sub in ("validate", "test"):
        assert "class_path: pikv_train.tasks.LanguageModelTask" in (tmp_path / "run" / f"{sub}-config.yaml").read_text()


def test_a_fresh_fit_over_a_run_needs_overwrite_which_replaces_its_checkpoints(moe_run, tmp_path):
    recipe = _copy_run(moe_run, tmp_path, "run")
    proc = run_cli("fit", "--config", str(recipe), *NO_LOGGER)
    assert proc.returncode == 2 and "already holds a run (checkpoints/last.ckpt)" in _error_line(proc)
    proc = run_cli("fit", "--config", str(recipe), "--overwrite", "true", "--trainer.max_steps", "1",
                   "--trainer.val_check_interval", "1", *NO_LOGGER)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--overwrite: removed the" in proc.stderr
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert "last.ckpt" in names and not any(n.startswith("last-v") for n in names), names
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 1


def test_last_finds_checkpoints_of_a_callback_without_dirpath(tmp_path):
    """A ModelCheckpoint without dirpath saves into out_dir/checkpoints, and --ckpt_path last resumes from there."""
    recipe = lm_recipe(tmp_path, "run", steps=2)
    callbacks = write(tmp_path / "callbacks.yaml", """
        trainer:
          callbacks:
          - class_path: lightning.pytorch.callbacks.ModelCheckpoint
            init_args: {save_last: true}
        """)
    common = ("--config", str(recipe), "--config", str(callbacks), *NO_LOGGER)
    proc = run_cli("fit", *common)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    proc = run_cli("fit", *common, "--ckpt_path", "last", "--trainer.max_steps", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Restoring states from the checkpoint" in proc.stderr + proc.stdout
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3


def test_without_a_logger_nothing_lands_in_the_working_folder_and_time_based_validation_runs(tmp_path):
    """--trainer.logger false keeps every output in out_dir (not the current folder); a time-based
    trainer.val_check_interval ("DD:HH:MM:SS", legal in Lightning) passes the settings checks."""
    import subprocess
    import sys

    from conftest import cli_env

    recipe = lm_recipe(tmp_path, "run", steps=1)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = subprocess.run([sys.executable, "-m", "pikv_train", "fit", "--config", str(recipe), *NO_LOGGER,
                           "--trainer.val_check_interval", "00:00:01:00"],
                          cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(cwd.iterdir()) == []
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_resuming_a_hugging_face_teacher_run_compares_the_resized_student_vocabulary(tmp_path):
    """The student's vocabulary follows the Hugging Face teacher's tokenizer (258 -> its size) before the
    checkpoint's architecture is compared: resuming such a run is not "another architecture"."""
    pytest.importorskip("transformers")
    from helpers import tiny_hf_teacher

    folder = tiny_hf_teacher(tmp_path / "hf")
    recipe = write(tmp_path / "hf.yaml", f"""
        defaults: [configs/trainer/cpu.yaml]
        out_dir: {tmp_path / 'run'}
        model:
          class_path: pikv_train.tasks.DistillationTask
          init_args:
            student: configs/model/nano_moe.yaml
            teacher: {{hf_path: {folder}}}
        data: {{seq_len: 32, batch_size: 2, max_documents: 8}}
        trainer: {{max_steps: 1, limit_val_batches: 1, val_check_interval: 1, enable_progress_bar: false}}
        """)
    proc = run_cli("fit", "--config", str(recipe), *NO_LOGGER)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    proc = run_cli("fit", "--config", str(recipe), "--ckpt_path", str(ckpt), "--trainer.max_steps", "2", *NO_LOGGER)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not _warnings_about_the_checkpoint(proc), _warnings_about_the_checkpoint(proc)
    assert torch.load(ckpt, weights_only=False)["global_step"] == 2


def test_only_the_fields_that_shape_the_parameters_are_another_architecture():
    """Router capacity, kernel and loss weights, d_ff of an MoE model, max_seq_len and rope_base change
    behaviour (a resumed run uses the command's, with a warning); widths, counts and parameter-holding router
    kinds are architecture (an error)."""
    import copy

    from pikv_train.cli import architecture_differences
    from pikv_train.models import ModelConfig

    moe, dense = ModelConfig.preset("nano-moe").to_dict(), ModelConfig.preset("nano").to_dict()

    def variant(cfg, router=None, **fields):
        out = copy.deepcopy(cfg)
        out.update(fields)
        out["moe"] and out["moe"]["router"].update(router or {})
        return out

    behaviour = variant(moe, {"capacity_factor": 2.0, "kernel": "reference", "aux_loss_weight": 0.5}, d_ff=999,
                        max_seq_len=4096, rope_base=500.0)
    assert architecture_differences(behaviour, moe) == []
    assert architecture_differences(variant(moe, {"name": "base"}), moe) == []  # both hold just a gate
    assert architecture_differences(variant(moe, {"name": "pikv"}), moe) == [
        "moe.router.name 'topk_balanced' in the checkpoint vs 'pikv' configured (their parameters differ)"]
    assert architecture_differences(variant(moe, {"name": "eplb"}), moe)  # its bias and load buffers
    assert architecture_differences(variant(moe, d_model=64), moe) == ["d_model 32 in the checkpoint vs 64 configured"]
    assert architecture_differences(dense, moe) == ["moe set in the checkpoint vs null configured"]
    assert architecture_differences(variant(dense, d_ff=128), dense) == ["d_ff 64 in the checkpoint vs 128 configured"]
    assert architecture_differences(variant(dense, tie_embeddings=False), dense)


def test_retrofit_recipe_trains_only_adapters_over_the_teachers_own_weights(tmp_path):
    """recipes/retrofit.yaml at test size: student = the teacher's weights + LoRA under the policy, teacher = the same
    checkpoint with the full cache; the checkpoint holds the adapters and a reference to that base."""
    teacher = run_cli("fit", "--config", str(lm_recipe(tmp_path, "teacher", steps=2,
                                                       model="configs/model/nano_dense.yaml")))
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    base = tmp_path / "teacher" / "checkpoints" / "last.ckpt"
    arch = {"n_layer": 2, "n_head": 2, "n_kv_head": 1, "d_model": 32, "d_ff": 64, "max_seq_len": 128}
    proc = run_cli("fit", "--config", "recipes/retrofit.yaml", "--out_dir", str(tmp_path / "rf"),
                   "--model.init_args.student_init", str(base), "--model.init_args.teacher.checkpoint", str(base),
                   *[a for k, v in arch.items() for a in (f"--model.init_args.student.{k}", str(v))],
                   "--model.init_args.cache.reference_len", "32", "--data.seq_len", "32", "--data.batch_size", "4",
                   "--data.max_documents", "6", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
                   "--trainer.limit_val_batches", "2", "--trainer.logger", "false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "rf" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["pikv_lora"]["base"]["init_from"] == str(base.resolve()) and ckpt["global_step"] == 2
    assert ckpt["pikv_cache_policy"]["policy"] == "h2o"
    keys = set(ckpt["state_dict"])
    assert keys and all(k.endswith(("lora_A", "lora_B")) for k in keys)  # the base stays where it was
    assert sum(ckpt["state_dict"][k].abs().sum() for k in keys if k.endswith("lora_B")) > 0  # adapters trained
