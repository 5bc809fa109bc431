"""``python -m pikv_train export --ckpt PATH --out DIR [--force]``: a pikv_train checkpoint as a Hugging Face folder.

The folder holds what ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained(DIR)`` load without remote code
(``config.json``, ``model.safetensors``, ``generation_config.json``, the tokenizer), the model card ``README.md``,
and ``pikv_cache.json`` (+ ``pikv_cache.safetensors``): the KV cache the student trained under, which
``pikv_train.hf.PiKVCache.from_pretrained(DIR)`` rebuilds. Every check runs before anything is written; bad input
ends with one ``error:`` line naming the problem and the fix, and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from pikv_train.errors import ConfigError, MissingFileError, UserError

USAGE = "python -m pikv_train export --ckpt PATH --out DIR [--force] [--tokenizer byte|FOLDER]"


class _Parser(argparse.ArgumentParser):
    """argparse with our one-line errors (its own print the usage first)."""

    def error(self, message):
        raise ConfigError(f"{message}; usage: {USAGE} (see --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m pikv_train export",
        description="Write a pikv_train checkpoint as a Hugging Face folder: config.json, model.safetensors and "
                    "generation_config.json (dense students as Llama, MoE students as Mixtral or Qwen2-MoE, exact), "
                    "the tokenizer, a model card README.md, and pikv_cache.json with the KV cache the student trained "
                    "under (pikv_train.hf.PiKVCache.from_pretrained(DIR) rebuilds it). AutoModelForCausalLM and "
                    "AutoTokenizer load the folder without remote code.",
        epilog="example: python -m pikv_train export --ckpt runs/distill/checkpoints/last.ckpt --out exports/distill",
    )
    p.add_argument("--ckpt", required=True, metavar="PATH",
                   help="a checkpoint written by python -m pikv_train fit (e.g. <out_dir>/checkpoints/last.ckpt)")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write; created if missing")
    p.add_argument("--force", action="store_true",
                   help="write into DIR even if it is not empty (files of the same names are replaced)")
    p.add_argument("--tokenizer", metavar="byte|FOLDER", default=None,
                   help="the tokenizer to save: default the run's data.tokenizer (byte, or a Hugging Face tokenizer "
                        "folder); give it when that folder has moved")
    return p


@dataclass
class ExportResult:
    """What :func:`export_checkpoint` wrote."""

    out_dir: Path
    architecture: str  # the transformers class, e.g. MixtralForCausalLM
    n_params: int
    files: list[str]
    cache: dict  # the contents of pikv_cache.json


def _check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; name a folder to write the export into")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"--out {out} exists and is not empty; choose a new folder, or add --force to write into it "
                          "(files of the same names are replaced)")


def _read(ckpt_path: Path) -> dict:
    from pikv_train.tasks.teacher import read_checkpoint

    if not ckpt_path.is_file():
        hint = " (it is a folder: name the .ckpt file inside, e.g. checkpoints/last.ckpt)" if ckpt_path.is_dir() else ""
        raise MissingFileError(f"checkpoint not found: {str(ckpt_path)!r}{hint}; pass the .ckpt of a pikv_train run "
                               "(<out_dir>/checkpoints/last.ckpt)")
    ckpt = read_checkpoint(ckpt_path)
    if "pikv_model_config" not in ckpt:
        raise ConfigError(f"{str(ckpt_path)!r} is not a pikv_train checkpoint (it has no pikv_model_config); pass a "
                          ".ckpt written by python -m pikv_train fit")
    return ckpt


def export_checkpoint(ckpt_path, out_dir, *, force: bool = False, tokenizer: str | None = None) -> ExportResult:
    """Export the student (or language model) of ``ckpt_path`` into ``out_dir`` (see the module docstring).

    Raises a one-line :class:`~pikv_train.errors.UserError` before writing anything when the checkpoint is missing
    or not pikv_train's, ``out_dir`` is not empty (without ``force``), the model has no exact transformers
    equivalent, or the tokenizer cannot be found or does not fit the model.
    """
    try:
        import safetensors  # noqa: F401
        import tokenizers  # noqa: F401
        import transformers
    except ImportError as e:
        raise UserError(f"the export needs the Hugging Face libraries ({e.name} is not installed); install them with "
                        "pip install 'pikv_train[hf]'") from None

    from pikv_train.evaluate import load_decoder
    from pikv_train.hf import card as C
    from pikv_train.hf.cache_file import write_cache_config
    from pikv_train.hf.export import ARCHITECTURES, hf_architecture, save_folder
    from pikv_train.hf.run_info import run_config, run_folder, validation_figures
    from pikv_train.hf.tokenizer import load_tokenizer, write_tokenizer

    ckpt_path, out = Path(ckpt_path), Path(out_dir)
    _check_out_dir(out, force)
    ckpt = _read(ckpt_path)
    try:
        model = load_decoder(ckpt)
    except (RuntimeError, KeyError, TypeError) as e:  # weights that do not fit the recorded architecture
        first = " ".join(str(e).split())[:200]
        raise ConfigError(f"cannot rebuild the model of {str(ckpt_path)!r} ({first}); it is damaged or was not "
                          "written by python -m pikv_train fit: pass another checkpoint") from None
    cfg = model.cfg
    arch = ARCHITECTURES[hf_architecture(cfg)]  # refuses students without an exact equivalent
    hp = C.plain(ckpt.get("hyper_parameters") or {})
    data = C.plain(ckpt.get("datamodule_hyper_parameters")) or None
    spec = tokenizer or (data or {}).get("tokenizer")
    if spec is None:
        if cfg.vocab_size != 258:
            raise ConfigError(f"{str(ckpt_path)!r} does not record its tokenizer (no data settings) and the model's "
                              f"vocabulary ({cfg.vocab_size}) is not the byte tokenizer's; pass --tokenizer FOLDER")
        spec = "byte"
    tok = load_tokenizer(spec, vocab_size=cfg.vocab_size, model_max_length=cfg.max_seq_len)
    # Only the cache policy's learned parameters (DuoAttention gates, compressor factors) travel; sharding has none.
    state = {k[len("cache_policy."):]: v for k, v in model.hook_state.items() if k.startswith("cache_policy.")}
    cache = ckpt["pikv_cache_policy"] if "pikv_cache_policy" in ckpt else _configured_cache(hp)

    out.mkdir(parents=True, exist_ok=True)
    before = _stamps(out)  # with --force, the files we write are told apart from what the folder held
    transformers.utils.logging.disable_progress_bar()
    hf = save_folder(model, out, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, real_vocab=len(tok))
    write_tokenizer(tok, out)
    spec_json = write_cache_config(out, cache, hp.get("kv_sharding"), state or None)
    run_dir = run_folder(ckpt_path)
    cfg_file = run_config(run_dir)
    if cfg_file is not None:
        recipe, source = cfg_file.read_text(), f"`{cfg_file}`, saved by the run"
    else:
        recipe, source = C.recipe_from_hparams(hp, data), "the checkpoint's hyper-parameters; no config.yaml was found"
    n_params = hf.num_parameters()
    text = C.model_card(name=out.resolve().name, folder=str(out), arch_class=arch, cfg=cfg, n_params=n_params,
                        task=ckpt.get("pikv_task"), ckpt_path=str(ckpt_path), global_step=ckpt.get("global_step"),
                        recipe=recipe, recipe_source=source, hp=hp, data=data, cache=spec_json["cache"],
                        sharding=spec_json["sharding"], state=spec_json["state"],
                        figures=validation_figures(ckpt, run_dir), run_dir=str(run_dir))
    (out / "README.md").write_text(text)
    after = _stamps(out)
    return ExportResult(out, arch, n_params, sorted(n for n, st in after.items() if before.get(n) != st), spec_json)


def _stamps(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir() if p.is_file()}


def _configured_cache(hp: dict) -> dict | None:
    """Checkpoints written before ``pikv_cache_policy`` was recorded: the configured ``cache`` (None when that is
    full attention without a compressor, as the checkpoints that record it say)."""
    from pikv_train.cache.config import CacheConfig, build_policy

    cache = hp.get("cache")
    if not cache:
        return None
    return None if build_policy(CacheConfig.from_dict(dict(cache))) is None else cache


def summary(res: ExportResult) -> str:
    """The lines printed at the end of an export."""
    c = res.cache
    cache = "full attention" if c["cache"] is None else f"{c['cache']['policy']} (budget {c['cache']['budget']:g})"
    if c["sharding"]:
        cache += ", expert-sharded KV"
    if c["state"]:
        cache += f", learned state in {c['state']}"
    return "\n".join([
        "---- export ----",
        f"folder        {res.out_dir}",
        f"architecture  {res.architecture}",
        f"parameters    {res.n_params:,}",
        f"cache         {cache}",
        f"files         {', '.join(res.files)}",
        f"load with     AutoModelForCausalLM.from_pretrained({str(res.out_dir)!r})",
        "----------------",
    ])


def main(argv: list[str] | None = None) -> ExportResult | None:
    """Run the export command; bad input prints ``error: ...`` on stderr and exits with code 2."""
    argv = list(sys.argv[2:] if argv is None else argv)
    try:
        if any(a in ("-h", "--help") for a in argv):
            _parser().print_help()
            return None
        args = _parser().parse_args(argv)
        res = export_checkpoint(args.ckpt, args.out, force=args.force, tokenizer=args.tokenizer)
    except UserError as e:
        if os.environ.get("PIKV_DEBUG"):
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    print(summary(res))
    return res
