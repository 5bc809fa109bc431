"""``python -m pikv_train fit|validate|test|predict --config recipe.yaml`` (also the ``pikv-train`` script).

A LightningCLI with:
- OmegaConf interpolation resolved once after all files and flags are merged (``omegaconf+``), so
  ``${model.init_args.student.d_model}`` style references see command-line overrides;
- recipe composition: a recipe may list building blocks under ``defaults:`` (paths to YAML files from
  ``configs/``); they are merged first, in order, then the recipe itself, then later ``--config`` files
  and flags. A relative building-block path (a ``defaults:`` entry, or a YAML-file value such as
  ``student: configs/model/student_moe.yaml``, in any config file, with or without ``defaults:``) is
  looked for beside the file naming it, then in the current directory, then in the repository root;
  on the command line, in the current directory, then the repository root (see :func:`_find`);
- ``--a.init_args.b null`` on the command line sets the value to null (over a recipe's value);
- W&B's environment variables: ``WANDB_MODE=disabled`` / ``WANDB_DISABLED=true`` remove W&B loggers
  before they are created; without a logger, outputs such as config.yaml still go to ``out_dir``;
- one-line errors for bad input (unknown keys, wrong types, missing files) instead of tracebacks;
- the resolved config printed at the start of every run.
"""

from __future__ import annotations

import copy
import os
import sys
import warnings
from pathlib import Path

import yaml

os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")

from jsonargparse import set_parsing_settings  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402
from lightning.pytorch.utilities import rank_zero_info  # noqa: E402

from pikv_train.data.datamodule import TextDataModule  # noqa: E402
from pikv_train.errors import ConfigError, MissingFileError, UserError  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
SUBCOMMANDS = ("fit", "validate", "test", "predict")


# Where a building block named by a relative path is looked for (the same rule for `defaults:` entries, for
# YAML-file values inside any config file, with or without `defaults:`, and for flags on the command line):
#   1. beside the file that names it (not for the command line),
#   2. in the current directory,
#   3. in the repository root.
# The first match wins; found paths are passed on as absolute paths, so jsonargparse never re-resolves them.
# "A YAML-file value" is any string value ending in .yaml or .yml (without ${...} interpolation): settings
# that take a building block (model.init_args.student, .model, .loss, .optim, ...) are the only ones that
# hold such paths.
_YAML_SUFFIXES = (".yaml", ".yml")
_NULLS = ("null", "Null", "NULL", "~")


def _find(path: str, base: Path | None = None, what: str = "") -> Path:
    """Resolve a building-block path by the rule above; a miss names the file and every place looked in."""
    p = Path(path).expanduser()
    if p.is_absolute():
        places = [(p, "")]
    else:
        places = [(base / p, "the folder of the file naming it")] if base is not None else []
        places += [(Path.cwd() / p, "the current directory"), (REPO_ROOT / p, "the repository root")]
    for cand, _ in places:
        if cand.is_file():
            return cand
    seen: dict[Path, list[str]] = {}
    for cand, label in places:
        seen.setdefault(cand.resolve(), []).extend([label] if label else [])
    looked = ", ".join(f"{c} ({' and '.join(labels)})" if labels else str(c) for c, labels in seen.items())
    ref = f" (named by {what})" if what else ""
    raise MissingFileError(f"config file not found: {path!r}{ref}; looked for {looked}; fix the path")


def _is_yaml_path(value) -> bool:
    return isinstance(value, str) and value.lower().endswith(_YAML_SUFFIXES) and "${" not in value \
        and "\n" not in value


def _resolve_blocks(node, base: Path, source: Path, key: str = ""):
    """``node`` with every YAML-file value replaced by its absolute path (see the rule above)."""
    if isinstance(node, dict):
        return {k: _resolve_blocks(v, base, source, f"{key}.{k}" if key else str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve_blocks(v, base, source, f"{key}[{i}]") for i, v in enumerate(node)]
    if _is_yaml_path(node):
        return str(_find(node, base, f"{key} in {source}").resolve())
    return node


def expand_config(path: str, seen: tuple[Path, ...] = (), base: Path | None = None, what: str = "") -> list[str]:
    """Turn ``--config path`` into the ``--config`` values to pass on: its defaults (recursively), then itself.

    ``base`` is the folder of the file that names ``path`` (None for the command line). A file whose
    ``defaults:`` list or building-block paths had to be rewritten is passed on as YAML text.
    """
    p = _find(path, base, what)
    if p.resolve() in seen:
        raise ConfigError(f"config files include each other in a loop: {' -> '.join(str(s) for s in seen + (p,))}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{p} is not valid YAML{where}: {getattr(e, 'problem', e)}; fix the file") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a YAML mapping of settings, not {type(data).__name__}")
    defaults = data.pop("defaults", None)
    if isinstance(defaults, str):
        defaults = [defaults]
    out: list[str] = []
    for d in defaults or []:
        out += expand_config(str(d), seen + (p.resolve(),), p.parent, f"defaults in {p}")
    resolved = _resolve_blocks(data, p.parent, p)
    if not defaults and resolved == data:
        return out + [str(p)]
    out.append(yaml.safe_dump(resolved, sort_keys=False) if resolved else "{}")
    return out


def _null_override(key: str) -> str:
    """``--a.init_args.b.c null`` as a YAML config that sets it: jsonargparse (4.53) turns a null given to a
    setting inside a class's init_args into the string 'None', so a recipe's value could not be unset."""
    tree: object = None
    for part in reversed(key.split(".")):
        tree = {part: tree}
    return yaml.safe_dump(tree, sort_keys=False)


def expand_args(args: list[str]) -> list[str]:
    """Expand every ``--config X`` / ``--config=X`` in an argument list (see :func:`expand_config`), resolve
    building-block paths given as flags (current directory, then repository root), and pass
    ``--a.init_args.b null`` on as a config that sets the value to null."""
    out: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        key, value, used = a, None, 1
        if a.startswith("--") and "=" in a:
            key, value = a.split("=", 1)
        elif a.startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--"):
            value, used = args[i + 1], 2
        if key == "--config" and value is not None:
            for c in expand_config(value):
                out += ["--config", c]
        elif key.startswith("--") and ".init_args." in key and value in _NULLS:
            out += ["--config", _null_override(key[2:])]
        elif key.startswith("--") and _is_yaml_path(value):
            out += [key, str(_find(value, None, f"--{key[2:]} on the command line").resolve())]
        else:
            out.append(a)
            used = 1
        i += used
    return out


def _cache_given(cache) -> bool:
    """Whether the user set cache settings: on the command line, or values other than the defaults."""
    from dataclasses import asdict

    from pikv_train.cache.config import CacheConfig

    if any(a.startswith(("--model.init_args.cache", "--model.cache")) for a in sys.argv[1:]):
        return True
    values = dict(vars(cache)) if hasattr(cache, "__dict__") else dict(cache or {})
    default = asdict(CacheConfig())
    return any(k in default and _same_type(v, default[k]) != default[k] for k, v in values.items())


def _same_type(value, default):
    return tuple(value) if isinstance(default, tuple) and value is not None else value


class PiKVCLI(LightningCLI):
    """LightningCLI with the data module fixed to :class:`TextDataModule` and tasks chosen by class_path."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--out_dir", type=str, default="runs/default", help="Folder for this run's outputs.")

    def before_instantiate_classes(self) -> None:
        sub = self.config.get("subcommand")
        cfg = self.config[sub] if sub else self.config
        _drop_disabled_wandb(cfg)
        trainer = cfg.get("trainer")
        if trainer is not None and trainer.get("default_root_dir") is None and cfg.get("out_dir"):
            # Without a logger Lightning writes config.yaml (and, without a dirpath, checkpoints) into
            # default_root_dir, which defaults to the current directory: keep every output in out_dir.
            trainer.default_root_dir = cfg.out_dir
        # A Hugging Face teacher brings its tokenizer: unless set otherwise, the data uses it, and a student
        # vocabulary of 258 (the byte tokenizer's size, the building blocks' value) too small for it is
        # resized to it, with a warning; a 258 that holds the tokenizer stays (rows past it are padding).
        init = cfg.get("model", {}).get("init_args") if cfg.get("model") is not None else None
        teacher = init.get("teacher") if init is not None else None
        hf_path = teacher.get("hf_path") if teacher is not None else None
        if not hf_path:
            return
        if cfg.data.tokenizer == "byte":
            cfg.data.tokenizer = hf_path
            rank_zero_info(f"data.tokenizer: using the teacher's tokenizer ({hf_path})")
        student = init.get("student")
        if student is not None and student.vocab_size == 258 and cfg.data.tokenizer == hf_path:
            from lightning.pytorch.utilities import rank_zero_warn

            from pikv_train.data.tokenizer import build_tokenizer

            size = build_tokenizer(hf_path).vocab_size
            if size > 258:
                student.vocab_size = size
                rank_zero_warn(
                    f"student.vocab_size 258 (the byte tokenizer's size) cannot hold the teacher tokenizer's {size} "
                    f"tokens: using {size}; set model.init_args.student.vocab_size to choose another size"
                )

    def _parse_ckpt_path(self) -> None:
        # Lightning reads the checkpoint's hyper-parameters here; check the file ourselves first so a missing,
        # damaged or foreign file gives a one-line error instead of an unpickling traceback.
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt and ckpt not in ("last", "best", "hpc") and not str(ckpt).startswith("registry"):
            from pikv_train.tasks.teacher import read_checkpoint

            read_checkpoint(ckpt)
        # Lightning overwrites the model arguments with the checkpoint's hyper-parameters. Outside fit (a
        # resumed run must stay the same run) cache settings the user gave (on the command line, or in a
        # config that sets something other than the defaults) win, so any checkpoint can be validated,
        # tested or used for prediction under any policy and budget; otherwise the checkpoint's apply.
        key = f"{sub}.model.init_args.cache"
        keep = copy.deepcopy(self.config.get(key)) if sub in ("validate", "test", "predict") and ckpt else None
        if keep is not None and not _cache_given(keep):
            keep = None
        super()._parse_ckpt_path()
        if keep is not None:
            self.config[key] = keep
        if sub in ("validate", "test", "predict") and ckpt:
            cache = self.config.get(key)
            policy = getattr(cache, "policy", None) or (cache or {}).get("policy", "full")
            rank_zero_info(f"{sub}: cache policy {policy} ({'as given' if keep is not None else 'from the checkpoint'})")

    def _instantiate_trainer(self, config, callbacks):
        # Lightning types limit_*_batches as float|int, so a YAML `limit_val_batches: 1` arrives as 1.0, which
        # Lightning reads as "100%". A whole number here always means a batch count (null means all).
        for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches",
                    "val_check_interval", "overfit_batches"):
            v = config.get(key)
            if isinstance(v, float) and v.is_integer() and v >= 1:
                config[key] = int(v)
        return super()._instantiate_trainer(config, callbacks)

    def before_fit(self) -> None:
        self._preflight("fit")

    def before_validate(self) -> None:
        self._preflight("validate")

    def before_test(self) -> None:
        self._preflight("test")

    def before_predict(self) -> None:
        self._preflight("predict")

    def _preflight(self, sub: str) -> None:
        """Fail on bad input before Lightning writes anything (config.yaml, W&B files, checkpoints)."""
        self._print_config(sub)
        dm, model = self.datamodule, self.model
        if dm is None or not hasattr(model, "preflight"):
            return
        dm.setup(sub)  # idempotent; the trainer's own setup call later reuses the loaded data
        attached = getattr(model, "_trainer", None)
        model.trainer = self.trainer  # the checks read trainer.datamodule
        self.trainer.datamodule = dm
        try:
            model.preflight()
            if hasattr(model, "configure_model") and sub in ("fit", "validate", "test"):
                model.configure_model()  # e.g. load the teacher now: a bad teacher fails before any file is written
        finally:
            model.trainer = attached

    def _print_config(self, sub: str) -> None:
        if os.environ.get("PIKV_QUIET_CONFIG"):
            return
        text = self._parser(sub).dump(self.config[sub], skip_none=False) if sub in self.config else ""
        rank_zero_info(f"---- resolved config ({sub}) ----\n{text}---------------------------------")


def _drop_disabled_wandb(cfg) -> None:
    """WANDB_MODE=disabled / WANDB_DISABLED=true: take every W&B logger out of trainer.logger before it is
    created (no W&B run, no files, no W&B process); the other loggers stay."""
    from pikv_train.loggers import wandb_disabled_reason

    reason = wandb_disabled_reason()
    trainer = cfg.get("trainer") if reason else None
    logger = trainer.get("logger") if trainer is not None else None
    if not logger or isinstance(logger, bool):
        return
    specs = list(logger) if isinstance(logger, list) else [logger]
    is_wandb = lambda spec: str(getattr(spec, "class_path", "")).rsplit(".", 1)[-1] == "WandbLogger"  # noqa: E731
    keep = [spec for spec in specs if not is_wandb(spec)]
    if len(keep) == len(specs):
        return
    trainer.logger = (keep if isinstance(logger, list) else keep[0]) if keep else False
    rank_zero_info(f"W&B is off ({reason}): no W&B logger")


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def main(args: list[str] | None = None) -> PiKVCLI | None:
    """Entry point; ``args`` defaults to ``sys.argv[1:]``."""
    # We always pass the expanded argument list explicitly; Lightning's "args and sys.argv" warning is moot.
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    # Epoch-level metrics come from torchmetrics objects, which synchronise across ranks themselves.
    warnings.filterwarnings("ignore", message=".*sync_dist=True.*when logging on epoch level.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    # data.val_fraction 0: the data module returns no validation loader ([]) on purpose.
    warnings.filterwarnings("ignore", message=".*Total length of `list` across ranks is zero.*")
    # The frozen teacher is in eval mode on purpose.
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training.*")
    argv = list(sys.argv[1:] if args is None else args)
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    try:
        argv = expand_args(argv)
        return PiKVCLI(
            model_class=None,
            datamodule_class=TextDataModule,
            subclass_mode_model=True,
            parser_kwargs={"parser_mode": "omegaconf+", "exit_on_error": False},
            save_config_kwargs={"overwrite": True},
            args=argv,
            auto_configure_optimizers=False,
        )
    except UserError as e:
        if os.environ.get("PIKV_DEBUG"):
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as e:  # jsonargparse parse errors (unknown keys, bad types), possibly wrapping ours
        if os.environ.get("PIKV_DEBUG"):
            raise
        inner = _find_user_error(e)
        if inner is not None:
            print(f"error: {_one_line(inner)}", file=sys.stderr)
        elif type(e).__name__ == "ArgumentError":
            print(f"error: {_summarise_parse_error(str(e))}", file=sys.stderr)
        else:
            raise
        raise SystemExit(2) from None


def _find_user_error(e: BaseException) -> UserError | None:
    """Our own error inside a chain of wrappers (jsonargparse re-raises what dataclass checks raise)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, UserError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _summarise_parse_error(msg: str) -> str:
    """jsonargparse reports a nested tree of reasons; keep the most specific one, plus a hint."""
    import re

    hint = " (check the spelling against `python -m pikv_train fit --print_config`)"
    nested = re.search(r"NestedArg\(key='([^']+)'", msg)
    group = re.search(r'Parser key "([^"]+)"', msg)
    if nested:
        where = f" under '{group.group(1)}'" if group else ""
        return f"unknown option '{nested.group(1)}'{where}" + hint
    lines = [ln.strip(" -") for ln in msg.splitlines() if ln.strip()]
    key_lines = [ln for ln in lines if "not expected" in ln or "not accepted" in ln or "does not accept" in ln
                 or "unrecognized arguments" in ln]
    best = key_lines[-1] if key_lines else (lines[-1] if lines else msg)
    first = lines[0] if lines else ""
    text = best if best == first else f"{first} {best}"
    return _one_line(text) + (hint if key_lines else "")


if __name__ == "__main__":
    main()
