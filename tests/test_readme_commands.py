"""Every ``python -m pikv_train ...`` command shown in a code block of README.md runs as written.

The commands are read from the README (fenced and indented code blocks; comments and line continuations
handled like a shell would), not copied here. Each runs in-process from the repository root with tiny
overrides appended after it (nano models, 2 steps, a few documents, a temporary out_dir) and with
``WANDB_MODE=disabled``. What a command needs beforehand is made here: a teacher checkpoint (the README's
teacher recipe, tiny), a tiny Hugging Face Llama folder with its tokenizer for ``teacher.hf_path``, a
checkpoint of the same recipe for ``--ckpt_path <file>``, and a first run for ``--ckpt_path last``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT

PREFIX = ["python", "-m", "pikv_train"]
STEPS = 2
TINY = [
    "--trainer.max_steps", str(STEPS), "--trainer.val_check_interval", str(STEPS), "--trainer.limit_val_batches", "1",
    "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    "--data.max_documents", "4", "--data.batch_size", "2", "--data.seq_len", "32",
    "--data.prompt_len", "16", "--data.response_len", "8",
]


def readme_commands(text: str) -> list[tuple[str, str]]:
    """(section heading, command line) for each pikv_train command in the README's code blocks, in order."""
    blocks: list[tuple[str, list[str]]] = []
    section, fence, indented = "", None, None
    prev_blank = True
    for line in text.splitlines():
        if fence is not None:
            if line.strip().startswith("```"):
                blocks.append((section, fence))
                fence = None
            else:
                fence.append(line)
            continue
        if line.strip().startswith("```"):
            fence = []
        elif line.startswith("#"):
            section = line.lstrip("#").strip()
        elif line.startswith("    ") and (indented is not None or prev_blank):
            indented = (indented or []) + [line]
            continue
        if indented is not None:
            blocks.append((section, indented))
            indented = None
        prev_blank = not line.strip()
    out = []
    for heading, lines in blocks:
        joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))  # shell line continuations
        for cmd in joined.splitlines():
            words = shlex.split(cmd, comments=True)
            if words[: len(PREFIX)] == PREFIX and shlex.join(words) not in {c for _, c in out}:
                out.append((heading, shlex.join(words)))  # quoted again, so a value with spaces stays one word
    return out


COMMANDS = readme_commands((ROOT / "README.md").read_text())


def _option(args: list[str], key: str) -> tuple[int, str] | None:
    """(index of the value, value) of the last ``--key V`` / ``--key=V`` in args."""
    found = None
    for i, a in enumerate(args):
        if a == key and i + 1 < len(args):
            found = (i + 1, args[i + 1])
        elif a.startswith(key + "="):
            found = (i, a.split("=", 1)[1])
    return found


def _set(args: list[str], key: str, value: str) -> list[str]:
    args = list(args)
    where = _option(args, key)
    if where is None:
        return args + [key, value]
    i, _ = where
    args[i] = value if args[i - 1] == key else f"{key}={value}"
    return args


def _drop(args: list[str], key: str) -> list[str]:
    out, skip = [], False
    for i, a in enumerate(args):
        if skip:
            skip = False
        elif a == key:
            skip = True
        elif not a.startswith(key + "="):
            out.append(a)
    return out


def _task(args: list[str]) -> str:
    """The task class the command's config files select (the last one naming model.class_path wins)."""
    task = ""
    for i, a in enumerate(args):
        if a == "--config" or a.startswith("--config="):
            data = yaml.safe_load((ROOT / (args[i + 1] if a == "--config" else a.split("=", 1)[1])).read_text())
            task = ((data or {}).get("model") or {}).get("class_path", task)
    return task.rsplit(".", 1)[-1]


def _run(args: list[str]) -> tuple[object, str]:
    """``main(args)`` in-process; returns the CLI object (None after --print_config) and what it printed."""
    from pikv_train.cli import main

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli = main(args)
    except SystemExit as e:
        last = err.getvalue().strip().splitlines()[-1:] or [""]
        assert e.code in (0, None), f"exit status {e.code}: {last[0]}\n(args: {' '.join(args)})"
        return None, out.getvalue()
    return cli, out.getvalue()


@pytest.fixture(autouse=True, scope="module")
def _readme_setting():
    """From the repository root (as the README says), W&B disabled, one intra-op thread (tiny models on
    shared CPUs: several threads only contend)."""
    mp = pytest.MonkeyPatch()
    mp.chdir(ROOT)
    mp.setenv("WANDB_MODE", "disabled")
    mp.setenv("PIKV_QUIET_CONFIG", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    mp.undo()


def _tiny(args: list[str], out: Path, ckpts: "Checkpoints") -> list[str]:
    """``args`` with the tiny overrides; its teacher (checkpoint, or Hugging Face folder and the data tokenizer
    naming that folder) pointed at made ones."""
    task = _task(args)
    if task == "LanguageModelTask":
        args = args + ["--model.init_args.model", "configs/model/nano_moe.yaml"]
    elif task == "DistillationTask":
        args = args + ["--model.init_args.student", "configs/model/nano_moe.yaml"]
        if _option(args, "--model.init_args.teacher.hf_path"):
            args = _set(args, "--model.init_args.teacher.hf_path", str(ckpts.hf_teacher()))
            tokenizer = _option(args, "--data.tokenizer")
            if tokenizer and tokenizer[1] != "byte":  # the teacher's folder, named again for the data
                args = _set(args, "--data.tokenizer", str(ckpts.hf_teacher()))
        elif "student_itself: true" not in " ".join(args):  # the student as its own teacher needs none
            args = _set(args, "--model.init_args.teacher.checkpoint", str(ckpts.teacher()))
        if _option(args, "--model.init_args.student_init"):  # a student of the same recipe to start from
            args = _set(args, "--model.init_args.student_init", str(ckpts.fitted(args)))
    return args + TINY + ["--out_dir", str(out)]


class Checkpoints:
    """What commands need beforehand, each made on first use (inside a test, under its settings)."""

    def __init__(self, folder: Path):
        self.folder, self.made = folder, {}

    def teacher(self) -> Path:
        if "teacher" not in self.made:
            out = self.folder / "teacher"
            args = ["fit", "--config", "recipes/teacher.yaml", *TINY, "--model.init_args.model",
                    "configs/model/nano_dense.yaml", "--out_dir", str(out)]
            _run(args)
            self.made["teacher"] = out / "checkpoints" / "last.ckpt"
        return self.made["teacher"]

    def hf_teacher(self) -> Path:
        if "hf" not in self.made:
            self.made["hf"] = _save_tiny_llama(self.folder / "hf_teacher")
        return self.made["hf"]

    def fitted(self, args: list[str]) -> Path:
        """A checkpoint written by ``fit`` with the configs of ``args`` (for --ckpt_path FILE)."""
        configs = [a for i, a in enumerate(args) if a.startswith("--config") or (i and args[i - 1] == "--config")]
        key = " ".join(configs)
        if key not in self.made:
            out = self.folder / f"fit{len(self.made)}"
            _run(_tiny(["fit", *configs], out, self))
            self.made[key] = out / "checkpoints" / "last.ckpt"
        return self.made[key]


def _save_tiny_llama(folder: Path) -> Path:
    """A randomly initialised 2-layer Llama and a byte-level BPE tokenizer, saved with save_pretrained."""
    import tokenizers
    import transformers

    from pikv_train.data import embedded_documents

    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    bpe.train_from_iterator(
        [d["text"] for d in embedded_documents(4)],
        tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>", "<pad>"],
                                       initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()),
    )
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", eos_token="<eos>",
                                               pad_token="<pad>")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    # Session scope: made at most once per test worker even when other modules' tests interleave.
    return Checkpoints(tmp_path_factory.mktemp("readme_prereq"))


def test_the_readme_shows_the_commands_this_test_runs():
    sections = {s for s, _ in COMMANDS}
    assert any("teacher" in c for _, c in COMMANDS) and any("hf_path" in c for _, c in COMMANDS), COMMANDS
    assert "Hugging Face teachers" in sections, sections


@pytest.mark.parametrize("section,command", COMMANDS, ids=[f"{s[:24]}: {c[len('python -m pikv_train '):]}"
                                                           for s, c in COMMANDS])
def test_readme_command_runs_as_written(section, command, tmp_path, checkpoints):
    args = shlex.split(command)[len(PREFIX):]
    sub, out = args[0], tmp_path / "out"
    if sub == "export":  # a checkpoint of the main job's recipe (tiny), exported into a fresh folder
        if "--help" not in args:
            fitted = checkpoints.fitted(["fit", "--config", "recipes/distill.yaml"])
            args = _set(_set(args, "--ckpt", str(fitted)), "--out", str(out))
        _, stdout = _run(args)
        if "--help" in args:
            assert "--ckpt" in stdout and "--out" in stdout
        else:
            assert {"config.json", "model.safetensors", "tokenizer.json", "pikv_cache.json", "README.md"} <= {
                p.name for p in out.iterdir()} and "architecture" in stdout
        return
    ckpt = _option(args, "--ckpt_path")
    steps = STEPS
    if ckpt and ckpt[1] == "last":
        # Resume: a first run of the same command writes the checkpoint; this one continues it.
        _run(_tiny(_drop(args, "--ckpt_path"), out, checkpoints))
        steps = STEPS + 1
    elif ckpt:
        args = _set(args, "--ckpt_path", str(checkpoints.fitted(args)))
    tiny = _tiny(args, out, checkpoints)
    if steps != STEPS:
        tiny += ["--trainer.max_steps", str(steps)]
    cli, stdout = _run(tiny)
    if "--print_config" in args or any(a.startswith("--print_config=") for a in args):
        assert cli is None and "class_path: pikv_train.tasks." in stdout
        return
    assert cli is not None
    # WANDB_MODE=disabled: no W&B files, neither in the run folder nor in W&B's own (set per test by conftest)
    assert not (out / "wandb").exists() and not any(Path(os.environ["WANDB_DIR"]).iterdir())
    if sub == "fit":
        last = out / "checkpoints" / "last.ckpt"
        assert last.is_file() and (out / "config.yaml").is_file()
        assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == steps
    else:
        assert "val/loss" in cli.trainer.callback_metrics, sorted(cli.trainer.callback_metrics)
