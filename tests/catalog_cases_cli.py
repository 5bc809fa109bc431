"""Catalog cases for the CLI itself: trainer arguments, bad values of nested options, paths, checkpoints,
resume / predict honesty and the run lock (see tests/test_bad_input_catalog.py for the harness)."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from helpers import write

FIT = "fit"


def _fit(recipe, *args):
    return [FIT, "--config", str(recipe), *args]


def _trainer(key, value):
    return lambda tmp, recipe, ckpt, distill: (_fit(recipe, f"--trainer.{key}", value), f"trainer.{key}={value} is invalid")


def _small_data(tmp, recipe, ckpt, distill):
    data = tmp / "small.jsonl"
    data.write_text("".join(json.dumps({"text": "a short document about nothing much. " * 4}) + "\n" for _ in range(3)))
    return _fit(recipe, "--data.path", str(data), "--data.max_documents", "3", "--trainer.val_check_interval", "50"), \
        "trainer.val_check_interval=50 is larger than the"


def _other_arch(tmp, recipe, ckpt, distill):
    # the run's checkpoint is a dense model; the recipe asks for another width
    return _fit(recipe, "--ckpt_path", str(ckpt), "--model.init_args.model.d_model", "64"), \
        "has another architecture than model.init_args.model: d_model 32 in the checkpoint vs 64 configured"


def _other_task(tmp, recipe, ckpt, distill):
    path = tmp / "distill_task.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    saved["pikv_task"] = "distill"
    torch.save(saved, path)
    return _fit(recipe, "--ckpt_path", str(path)), "was written by DistillationTask, but the config runs LanguageModelTask"


def _lm_ckpt_for_distill(tmp, recipe, ckpt, distill):
    return _fit(distill(str(ckpt)), "--ckpt_path", str(ckpt)), \
        "was written by LanguageModelTask, but the config runs DistillationTask"


def _last_without_checkpoint(tmp, recipe, ckpt, distill):
    return _fit(recipe, "--out_dir", str(tmp / "fresh"), "--ckpt_path", "last"), \
        "--ckpt_path last: no checkpoint to resume in"


_HOLD_LOCK = """
import sys, time
from pikv_train.run_lock import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""


def _held_lock(tmp, recipe, ckpt, distill):
    # a live run holds the lock of another folder (the run folder itself must stay byte-identical)
    from conftest import ROOT, cli_env

    folder = tmp / "locked"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(folder)], cwd=ROOT, env=cli_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    _SLEEPERS.append(holder)
    assert holder.stdout.readline().strip() == "held"
    return _fit(recipe, "--out_dir", str(folder)), f"is held by pid {holder.pid}"


_SLEEPERS: list = []


def _text_file(tmp, recipe, ckpt, distill):
    path = write(tmp / "notes.txt", "these are my notes, not a checkpoint\n")
    return _fit(recipe, "--ckpt_path", str(path)), "is not a checkpoint (a text file"


def _text_teacher(tmp, recipe, ckpt, distill):
    path = write(tmp / "teacher.txt", "these are my notes, not a checkpoint\n")
    return _fit(distill(str(path))), "model.init_args.teacher.checkpoint: cannot read checkpoint"


def _out_dir_file(tmp, recipe, ckpt, distill):
    path = write(tmp / "a_file", "x\n")
    return _fit(recipe, "--out_dir", str(path)), "is an existing file, not a folder"


def _out_dir_read_only(tmp, recipe, ckpt, distill):
    return _fit(recipe, "--out_dir", "/proc/pikv_catalog_run"), "is read-only"


def _out_dir_empty(tmp, recipe, ckpt, distill):
    return _fit(recipe, "--out_dir", ""), "out_dir='' is empty"


def _empty_recipe(tmp, recipe, ckpt, distill):
    return [FIT, "--config", str(write(tmp / "empty_recipe.yaml", ""))], "is empty; a recipe needs"


def _without_weights(sub):
    return lambda tmp, recipe, ckpt, distill: ([sub, "--config", str(recipe)],
                                               f"{sub} without --ckpt_path would run on random (untrained) weights")


def _kd(*args):
    return lambda tmp, recipe, ckpt, distill: [FIT, "--config", str(distill(str(ckpt))), *args]


def _last_or_new_without_checkpoint(sub):
    def build(tmp, recipe, ckpt, distill):
        return [sub, "--config", str(recipe), "--out_dir", str(tmp / f"{sub}_fresh"), "--ckpt_path", "last_or_new"], \
            f"{sub} --ckpt_path last_or_new: no checkpoint in {tmp / f'{sub}_fresh' / 'checkpoints'}, so {sub} would " \
            "run on random (untrained) weights"
    return build


def _last_without_dirpath(tmp, recipe, ckpt, distill):
    # a ModelCheckpoint without dirpath saves into <default_root_dir>/checkpoints = out_dir/checkpoints
    callbacks = write(tmp / "no_dirpath.yaml", """
        trainer:
          callbacks:
          - class_path: lightning.pytorch.callbacks.ModelCheckpoint
            init_args: {save_last: true}
        """)
    return _fit(recipe, "--config", str(callbacks), "--out_dir", str(tmp / "no_dirpath"), "--ckpt_path", "last"), \
        f"--ckpt_path last: no checkpoint to resume in {tmp / 'no_dirpath' / 'checkpoints'};"


def _missing_hf_teacher(tmp, recipe, ckpt, distill):
    return _fit(distill(str(ckpt)), "--model.init_args.teacher.checkpoint", "null",
                "--model.init_args.teacher.hf_path", str(tmp / "no_such_hf_model")), \
        f"model.init_args.teacher.hf_path: Hugging Face model folder not found: '{tmp / 'no_such_hf_model'}'"


SHARDING = "--model.init_args.kv_sharding."

CASES = {
    "cli_accumulate_grad_batches_zero": _trainer("accumulate_grad_batches", "0"),
    "cli_val_check_interval_zero": _trainer("val_check_interval", "0"),
    "cli_val_check_interval_negative": _trainer("val_check_interval", "-0.5"),
    "cli_max_steps_below_minus_one": _trainer("max_steps", "-5"),
    "cli_devices_zero": lambda tmp, recipe, ckpt, distill: (_fit(recipe, "--trainer.devices", "0"), "trainer.devices='0'"),
    "cli_max_epochs_below_minus_one": _trainer("max_epochs", "-3"),
    "cli_limit_val_batches_negative": _trainer("limit_val_batches", "-1"),
    "cli_check_val_every_n_epoch_zero": _trainer("check_val_every_n_epoch", "0"),
    "cli_val_check_interval_beyond_small_data": _small_data,
    "cli_cache_policy_typo": lambda tmp, recipe, ckpt, distill: (
        _fit(recipe, "--model.init_args.cache.policy", "h2o_typo"),
        "model.init_args.cache.policy: 'h2o_typo' is not a valid choice; choose one of: full, h2o, streaming_llm"),
    "cli_loss_divergence_typo": lambda tmp, recipe, ckpt, distill: (
        _fit(distill(str(ckpt)), "--model.init_args.loss.divergence", "kll"),
        "model.init_args.loss.divergence: 'kll' is not a valid choice; choose one of: "),
    "cli_lr_not_a_number": lambda tmp, recipe, ckpt, distill: (
        _fit(recipe, "--model.init_args.optim.lr", "fast"),
        "model.init_args.optim.lr: 'fast' is not of the expected type float"),
    "cli_nested_int_not_a_number": lambda tmp, recipe, ckpt, distill: (
        _fit(recipe, "--model.init_args.model.n_layer", "two"),
        "model.init_args.model.n_layer: 'two' is not of the expected type int"),
    "cli_empty_recipe": _empty_recipe,
    "cli_out_dir_is_a_file": _out_dir_file,
    "cli_out_dir_read_only": _out_dir_read_only,
    "cli_out_dir_empty": _out_dir_empty,
    "cli_ckpt_path_text_file": _text_file,
    "cli_teacher_checkpoint_text_file": _text_teacher,
    "cli_resume_other_architecture": _other_arch,
    "cli_resume_other_task": _other_task,
    "cli_resume_dense_checkpoint_as_moe": lambda tmp, recipe, ckpt, distill: (
        _fit(recipe, "--ckpt_path", str(ckpt), "--model.init_args.model", "configs/model/nano_moe.yaml"),
        "moe null in the checkpoint vs set configured"),
    "cli_validate_other_architecture": lambda tmp, recipe, ckpt, distill: (
        ["validate", "--config", str(recipe), "--ckpt_path", str(ckpt), "--model.init_args.model.n_layer", "3"],
        "has another architecture than model.init_args.model: n_layer"),
    "cli_distill_from_lm_checkpoint": _lm_ckpt_for_distill,
    "cli_resume_last_without_checkpoint": _last_without_checkpoint,
    "cli_predict_without_weights": _without_weights("predict"),
    "cli_validate_without_weights": _without_weights("validate"),
    "cli_test_without_weights": _without_weights("test"),
    "cli_out_dir_locked_by_live_run": _held_lock,
    # a dash-prefixed number that argparse does not read as one (an exponent) is still a value
    "cli_negative_lr_with_exponent": lambda tmp, recipe, ckpt, distill: (
        _fit(recipe, "--model.init_args.optim.lr", "-1e-3"), "model.init_args.optim.lr=-0.001 is invalid"),
    # a fresh fit into a folder that holds a run (the catalog's run folder: checkpoints/last.ckpt)
    "cli_fresh_fit_into_a_run": lambda tmp, recipe, ckpt, distill: (
        _fit(recipe), f"{tmp / 'run'} already holds a run (checkpoints/last.ckpt); resume with --ckpt_path last, "
                      "or choose another --out_dir / delete it"),
    "cli_validate_last_or_new_without_checkpoint": _last_or_new_without_checkpoint("validate"),
    "cli_predict_last_or_new_without_checkpoint": _last_or_new_without_checkpoint("predict"),
    "cli_resume_last_checkpoint_callback_without_dirpath": _last_without_dirpath,
    "cli_teacher_hf_path_missing": _missing_hf_teacher,
    "cli_kv_sharding_read_shards_zero": lambda tmp, recipe, ckpt, distill: (
        _kd(SHARDING + "enabled", "true", SHARDING + "read_mode", "by_score", SHARDING + "read_shards", "0")(
            tmp, recipe, ckpt, distill), "model.init_args.kv_sharding.read_shards=0 must be between 1 and n_shards=4"),
    "cli_kv_sharding_window_negative": lambda tmp, recipe, ckpt, distill: (
        _kd(SHARDING + "enabled", "true", SHARDING + "window", "-1")(tmp, recipe, ckpt, distill),
        "model.init_args.kv_sharding.window=-1 must be >= 1"),
}


def _stop_sleepers():
    for p in _SLEEPERS:
        p.kill()


import atexit  # noqa: E402

atexit.register(_stop_sleepers)
