"""The README's catalog of bad input: each case exits with status 2, prints one line naming the problem
and the fix (and nothing else on stderr: not the resolved config, not Lightning's info lines), leaves an
existing run folder exactly as it was (nothing on disk is lost) and creates no folder (a case pointing
out_dir at a new folder must not leave it behind)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from helpers import lm_recipe, run_cli, run_cli_forked, write

from conftest import cli_env


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def _folders(folder: Path) -> set[str]:
    """Every folder under ``folder`` (the cases' inputs are files; a new folder is output of a refused run)."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_dir()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished run (dense teacher-style LM) whose folder every bad command then targets."""
    tmp = tmp_path_factory.mktemp("catalog")
    recipe = lm_recipe(tmp, "run", steps=2, model="configs/model/nano_dense.yaml")
    # No W&B here: its service may still flush files after the process exits, which would look like a change.
    proc = run_cli("fit", "--config", str(recipe), "--trainer.logger", "false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return tmp, recipe


def _distill_recipe(tmp: Path, teacher: str) -> Path:
    return write(
        tmp / "distill.yaml",
        f"""
        defaults: [configs/trainer/cpu.yaml]
        out_dir: {tmp / 'run'}
        model:
          class_path: pikv_train.tasks.DistillationTask
          init_args:
            student: configs/model/nano_moe.yaml
            teacher: {{checkpoint: {teacher}}}
        data: {{seq_len: 32, batch_size: 2, max_documents: 6}}
        trainer: {{max_steps: 1}}
        """,
    )


def _case(name, tmp: Path, recipe: Path) -> tuple[list[str], str]:
    ckpt = tmp / "run" / "checkpoints" / "last.ckpt"
    if name == "malformed_yaml":
        bad = write(tmp / "bad.yaml", "trainer:\n  max_steps: [3\n")
        return ["fit", "--config", str(recipe), "--config", str(bad)], "is not valid YAML at line"
    if name == "unknown_key":
        bad = write(tmp / "bad.yaml", "trainer:\n  max_stepz: 3\n")
        return ["fit", "--config", str(recipe), "--config", str(bad)], "does not accept option 'trainer.max_stepz'"
    if name == "mistyped_nested_key":
        bad = write(tmp / "bad.yaml", "model:\n  init_args:\n    modle: 3\n")
        return ["fit", "--config", str(recipe), "--config", str(bad)], "'modle' is not accepted"
    if name == "wrong_type":
        return ["fit", "--config", str(recipe), "--data.batch_size", "many"], "data.batch_size"
    if name == "missing_data_file":
        return ["fit", "--config", str(recipe), "--data.path", str(tmp / "nope.jsonl")], "data file not found"
    if name == "empty_data":
        (tmp / "empty.jsonl").write_text("")
        return ["fit", "--config", str(recipe), "--data.path", str(tmp / "empty.jsonl")], "is empty"
    if name == "sequence_longer_than_positions":
        return ["fit", "--config", str(recipe), "--data.seq_len", "500"], "exceed the model's max_seq_len=128"
    if name == "top_k_above_experts":
        moe = _distill_recipe(tmp, str(ckpt))
        return ["fit", "--config", str(moe), "--model.init_args.student.moe.router.top_k", "9"], "top_k=9 exceeds n_experts=4"
    if name == "cache_budget_out_of_range":
        return ["fit", "--config", str(recipe), "--model.init_args.cache.policy", "streaming_llm",
                "--model.init_args.cache.budget", "-0.5"], "budget"
    if name == "missing_teacher":
        return ["fit", "--config", str(_distill_recipe(tmp, str(tmp / "none.ckpt")))], "checkpoint not found"
    if name == "teacher_from_another_architecture":
        student_ckpt = tmp / "student.ckpt"
        torch.save({"state_dict": {"student.embed.weight": torch.zeros(258, 32)}, "pikv_task": "distill",
                    "pikv_model_config": {}}, student_ckpt)
        return ["fit", "--config", str(_distill_recipe(tmp, str(student_ckpt)))], "is not a pikv_train LanguageModelTask checkpoint"
    if name == "vocabulary_mismatch":
        return ["fit", "--config", str(_distill_recipe(tmp, str(ckpt))), "--model.init_args.student.vocab_size", "300"], \
            "teacher vocab_size=258 differs from student vocab_size=300"
    if name == "corrupt_checkpoint":
        (tmp / "corrupt.ckpt").write_bytes(b"\x80\x04garbage")
        return ["fit", "--config", str(recipe), "--ckpt_path", str(tmp / "corrupt.ckpt")], "cannot read checkpoint"
    if name == "foreign_checkpoint":
        torch.save({"weights": torch.zeros(2)}, tmp / "foreign.ckpt")
        return ["fit", "--config", str(recipe), "--ckpt_path", str(tmp / "foreign.ckpt")], "is not a Lightning checkpoint"
    if name == "missing_building_block":
        bad = write(tmp / "mine.yaml", "model:\n  init_args:\n    model: configs/model/nano_mo.yaml\n")
        return ["fit", "--config", str(recipe), "--config", str(bad)], \
            "config file not found: 'configs/model/nano_mo.yaml' (named by model.init_args.model in"
    if name == "generation_beyond_positions":
        return ["fit", "--config", str(_distill_recipe(tmp, str(ckpt))), "--model.init_args.objective", "skd",
                "--data.mode", "prompts", "--data.prompt_len", "32", "--data.response_len", "16",
                "--model.init_args.skd.max_new_tokens", "100"], \
            "skd: data.prompt_len (32) + generated tokens (100) exceed the student's max_seq_len=128"
    if name == "replay_smaller_than_batch":
        return ["fit", "--config", str(_distill_recipe(tmp, str(ckpt))), "--model.init_args.objective", "distillm",
                "--data.mode", "prompts", "--data.prompt_len", "8", "--data.response_len", "8",
                "--model.init_args.distillm.capacity", "1"], "distillm.capacity=1 is smaller than data.batch_size=2"
    if name == "validate_without_split":
        return ["validate", "--config", str(recipe), "--data.val_fraction", "0", "--ckpt_path", str(ckpt)], \
            "data.val_fraction is 0, so there is no validation split to validate on"
    raise AssertionError(name)


CASES = [
    "malformed_yaml", "unknown_key", "mistyped_nested_key", "wrong_type", "missing_data_file", "empty_data",
    "sequence_longer_than_positions", "top_k_above_experts", "cache_budget_out_of_range", "missing_teacher",
    "teacher_from_another_architecture", "vocabulary_mismatch", "corrupt_checkpoint", "foreign_checkpoint",
    "missing_building_block", "generation_beyond_positions", "replay_smaller_than_batch", "validate_without_split",
]


def _extra_cases() -> dict:
    """Cases kept in tests/catalog_cases_*.py (one module per area, so the table grows without conflicts):
    each module has ``CASES = {name: build}`` with ``build(tmp, recipe, ckpt, distill_recipe)`` returning
    (CLI arguments, expected text of the one error line). ``distill_recipe(teacher_path)`` writes a tiny
    distillation recipe; ``recipe`` is a tiny LM recipe whose run folder (``tmp / "run"``) holds ``ckpt``."""
    import importlib

    cases = {}
    for path in sorted(Path(__file__).parent.glob("catalog_cases_*.py")):
        cases.update(importlib.import_module(path.stem).CASES)
    return cases


EXTRA = _extra_cases()


@pytest.mark.parametrize("name", CASES + sorted(EXTRA))
def test_bad_input_gives_one_line_and_loses_nothing(name, trained):
    tmp, recipe = trained
    before = _snapshot(tmp / "run")
    if name in EXTRA:
        args, expected = EXTRA[name](tmp, recipe, tmp / "run" / "checkpoints" / "last.ckpt",
                                     lambda teacher: _distill_recipe(tmp, teacher))
    else:
        args, expected = _case(name, tmp, recipe)
    folders = _folders(tmp)
    env = cli_env()
    env.pop("PIKV_QUIET_CONFIG")  # the resolved config is printed only once the checks have passed
    proc = run_cli_forked(*args, env=env)
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert lines and lines[-1].startswith("error: ") and expected in lines[-1], lines[-1:]
    assert "Traceback" not in proc.stderr
    assert lines == lines[-1:], f"stderr holds more than the error line: {lines[:-1][:5]}"
    assert _snapshot(tmp / "run") == before, "the run folder changed"
    assert _folders(tmp) == folders, f"folders created: {sorted(_folders(tmp) - folders)}"
