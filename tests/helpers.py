"""Shared test helpers: run the real CLI in a subprocess, tiny recipes written to tmp folders."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import ROOT, cli_env


def run_cli(*args: str, timeout: int = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m pikv_train ARGS`` from the repo root; returns the completed process (never raises)."""
    return subprocess.run(
        [sys.executable, "-m", "pikv_train", *args], cwd=ROOT, env=env or cli_env(), capture_output=True,
        text=True, timeout=timeout,
    )


_FORKER: subprocess.Popen | None = None


def run_cli_forked(*args: str, timeout: int = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """:func:`run_cli` through a fork server (tests/cli_forker.py) that has imported the CLI once: each command
    still runs in its own process, without the ~6 s import. For commands that stop in their checks or run
    briefly (the bad-input catalog); training runs keep :func:`run_cli`."""
    import atexit
    import json
    import tempfile

    global _FORKER
    if _FORKER is None or _FORKER.poll() is not None:
        _FORKER = subprocess.Popen([sys.executable, str(Path(__file__).parent / "cli_forker.py")], cwd=ROOT,
                                   env=cli_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        atexit.register(_FORKER.kill)
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "out", Path(tmp) / "err"
        req = {"args": list(args), "env": env or cli_env(), "cwd": str(ROOT), "out": str(out), "err": str(err),
               "timeout": timeout}
        _FORKER.stdin.write(json.dumps(req) + "\n")
        _FORKER.stdin.flush()
        reply = _FORKER.stdout.readline()
        assert reply, "the CLI fork server ended"
        rc = json.loads(reply)["rc"]
        return subprocess.CompletedProcess(["pikv_train", *args], rc, out.read_text(), err.read_text())


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def lm_recipe(tmp: Path, out: str = "run", steps: int = 4, extra: str = "", model: str = "configs/model/nano_moe.yaml") -> Path:
    """A tiny LanguageModelTask recipe writing into tmp/out (CSV-free: W&B offline logger)."""
    return write(
        tmp / f"{out}.yaml",
        f"""
        defaults: [configs/trainer/cpu.yaml]
        seed_everything: 0
        out_dir: {tmp / out}
        model:
          class_path: pikv_train.tasks.LanguageModelTask
          init_args:
            model: {model}
        data:
          seq_len: 32
          batch_size: 4
          max_documents: 6
        trainer:
          max_steps: {steps}
          limit_val_batches: 2
          val_check_interval: {steps}
          log_every_n_steps: 1
          enable_progress_bar: false
          enable_model_summary: false
        """
        + textwrap.dedent(extra),
    )


def decode_tokenwise(model, cache, x, prefill: int):
    """Logits (B, T, V) of ``x`` fed to ``model`` through ``cache``: a prefill of ``prefill`` tokens, then
    one token per step (what the policy caches are held to against the masked parallel forward)."""
    import torch

    pos = torch.arange(x.shape[1]).expand_as(x)
    outs = [model.logits(model(x[:, :prefill], positions=pos[:, :prefill], cache=cache).hidden)]
    for i in range(prefill, x.shape[1]):
        outs.append(model.logits(model(x[:, i: i + 1], positions=pos[:, i: i + 1], cache=cache).hidden))
    return torch.cat(outs, 1)


def assert_close_rel(actual, expected, tol: float) -> None:
    """``max |actual - expected| <= tol * max |expected|``: an fp32 tolerance relative to the magnitude
    compared. Absolute tolerances fail on values far above 1 when rounding differs between processors
    (BLAS blocking, reduction order) and mean nothing on values far below 1."""
    import torch

    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=0, atol=tol * scale)


def tiny_hf_teacher(folder: Path, vocab_size: int = 300) -> Path:
    """A randomly initialised 2-layer Hugging Face Llama with a byte-level BPE tokenizer of ``vocab_size``
    tokens trained on the embedded documents, saved with save_pretrained into ``folder``."""
    import tokenizers
    import torch
    import transformers

    from pikv_train.data import embedded_documents

    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    bpe.train_from_iterator(
        [d["text"] for d in embedded_documents(8)],
        tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<eos>", "<pad>"],
                                       initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()),
    )
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", eos_token="<eos>",
                                               pad_token="<pad>")
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def training_visibility(pol, q, k, ctx):
    """The policy's training visibility (B|1, H_kv|1, T, T) as it runs: its dense mask, or the block-sparse
    plan's visibility when the policy attends block by block (None: every causal key)."""
    m = pol.training_mask(q, k, ctx)
    plan = ctx.scratch.get("policy_block_plan")
    if m is None and plan is not None:
        return plan.dense(k.shape[0], k.shape[1], k.shape[2])
    return m
