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
- one-line errors for bad input (unknown keys, wrong types, missing files) instead of tracebacks; a bad
  value of a nested option names the key, the value and the valid choices (Literal) or the expected type;
- one validation pass before anything is written: trainer arguments (and Lightning's own argument errors),
  out_dir, the checkpoint's task and architecture against the config, ``--ckpt_path last`` (an error
  without a checkpoint; ``last_or_new`` starts fresh), weights for validate/test/predict (``--ckpt_path``
  or ``--random_weights true``); then the run lock ``out_dir/.pikv.lock`` (see :mod:`pikv_train.run_lock`);
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
        if base is None:
            raise ConfigError(f"config file {p} is empty; a recipe needs at least model: and data: settings "
                              "(start from one in recipes/)")
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
        parser.add_argument(
            "--random_weights", type=bool, default=False,
            help="validate/test/predict without --ckpt_path: run on freshly initialised (untrained) weights. "
            "Without it those commands refuse to run without a checkpoint.",
        )

    def before_instantiate_classes(self) -> None:
        sub = self.config.get("subcommand")
        cfg = self.config[sub] if sub else self.config
        check_run_settings(sub, cfg)
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
        if ckpt and ckpt not in _CKPT_WORDS and not str(ckpt).startswith("registry"):
            from pikv_train.tasks.teacher import read_checkpoint

            check_checkpoint_fits(read_checkpoint(ckpt), ckpt, self.config[sub].get("model"))
        # what the command asked for, before Lightning puts the checkpoint's hyper-parameters in its place
        self._asked_model = copy.deepcopy(self.config[sub].get("model")) if sub else None
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
        try:
            return self._instantiate_trainer_checked(config, callbacks)
        except UserError:
            raise
        except Exception as e:
            from lightning.fabric.utilities.exceptions import MisconfigurationException

            if not isinstance(e, (MisconfigurationException, ValueError, TypeError)):
                raise
            raise ConfigError(f"Lightning rejected the trainer settings: {_one_line(e)[:300]}; fix the trainer.* "
                              "setting it names (see python -m pikv_train fit --help)") from None

    def _instantiate_trainer_checked(self, config, callbacks):
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
        if sub == "fit":
            _check_val_interval(self.trainer, dm)
        self._resolve_last(sub)
        from pikv_train.run_lock import take_run_lock

        take_run_lock(self.config[sub].out_dir)  # the last check: from here on, files are written

    def _resolve_last(self, sub: str) -> None:
        """``--ckpt_path last`` needs a checkpoint to resume; ``last_or_new`` starts fresh without one."""
        ckpt = self.config[sub].get("ckpt_path")
        if ckpt not in ("last", "last_or_new"):
            return
        found = _last_checkpoints(self.trainer)
        if not found:
            if ckpt == "last":
                where = " or ".join(str(d) for d in _checkpoint_dirs(self.trainer)) or "the checkpoint folder"
                raise ConfigError(
                    f"--ckpt_path last: no checkpoint to resume in {where}; check out_dir, or pass "
                    "--ckpt_path last_or_new to resume if there is one and start fresh otherwise"
                )
            rank_zero_info("--ckpt_path last_or_new: no checkpoint yet, starting a new run")
            new = None
        else:
            from pikv_train.tasks.teacher import read_checkpoint

            newest = max(found, key=os.path.getmtime)
            check_checkpoint_fits(read_checkpoint(newest), newest, getattr(self, "_asked_model", None))
            new = "last"
        self.config[sub].ckpt_path = new
        if isinstance(getattr(self, "config_init", None), dict) or hasattr(self, "config_init"):
            self.config_init[sub]["ckpt_path"] = new

    def _print_config(self, sub: str) -> None:
        if os.environ.get("PIKV_QUIET_CONFIG"):
            return
        text = self._parser(sub).dump(self.config[sub], skip_none=False) if sub in self.config else ""
        rank_zero_info(f"---- resolved config ({sub}) ----\n{text}---------------------------------")

_CKPT_WORDS = ("last", "best", "hpc", "last_or_new")


def _fail(key: str, value, valid: str, fix: str) -> None:
    raise ConfigError(f"{key}={value!r} is invalid (must be {valid}); {fix}")


def check_run_settings(sub: str | None, cfg) -> None:
    """Trainer arguments, paths and weights, checked after parsing and before anything is created."""
    _check_trainer(cfg.get("trainer"))
    _check_out_dir(cfg.get("out_dir"))
    if sub in ("validate", "test", "predict") and not cfg.get("ckpt_path") and not cfg.get("random_weights"):
        init = cfg.get("model", {}).get("init_args") if cfg.get("model") is not None else None
        if init is None or not init.get("student_init"):
            raise ConfigError(
                f"{sub} without --ckpt_path would run on random (untrained) weights; pass --ckpt_path "
                "<out_dir>/checkpoints/last.ckpt, or --random_weights true if untrained weights are intended"
            )


def _check_trainer(t) -> None:
    if t is None:
        return
    acc = t.get("accumulate_grad_batches")
    if acc is not None and (not isinstance(acc, int) or acc < 1):
        _fail("trainer.accumulate_grad_batches", acc, "a whole number >= 1",
              "set it to 1 (no accumulation) or more")
    vci = t.get("val_check_interval")
    if vci is not None and vci <= 0:
        _fail("trainer.val_check_interval", vci, "a batch count >= 1 or a fraction of an epoch in (0, 1]",
              "e.g. 1.0 (once per epoch) or 100 (every 100 batches)")
    if isinstance(vci, float) and vci > 1 and not vci.is_integer():
        _fail("trainer.val_check_interval", vci, "a fraction must lie in (0, 1], a batch count must be whole",
              "e.g. 0.5 or 100")
    steps = t.get("max_steps")
    if steps is not None and steps < -1:
        _fail("trainer.max_steps", steps, "-1 (no limit) or a step count >= 0", "e.g. 1000")
    epochs = t.get("max_epochs")
    if epochs is not None and epochs < -1:
        _fail("trainer.max_epochs", epochs, "-1 (no limit), null or an epoch count >= 0", "e.g. 1")
    every = t.get("check_val_every_n_epoch")
    if every is not None and every < 1:
        _fail("trainer.check_val_every_n_epoch", every, "null or a whole number >= 1",
              "e.g. 1, or null to count val_check_interval across epochs")
    devices = t.get("devices")
    if devices is not None and str(devices).strip() in ("0", "[]", ""):
        _fail("trainer.devices", devices, "'auto', -1 (all), a device count >= 1 or a list of device ids",
              "e.g. 1, or --trainer.accelerator cpu for a CPU run")
    if isinstance(devices, int) and devices < -1:
        _fail("trainer.devices", devices, "'auto', -1 (all), a device count >= 1 or a list of device ids", "e.g. 1")
    nodes = t.get("num_nodes")
    if nodes is not None and nodes < 1:
        _fail("trainer.num_nodes", nodes, "a whole number >= 1", "e.g. 1")
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches"):
        v = t.get(key)
        if v is not None and (v < 0 or (isinstance(v, float) and v > 1 and not v.is_integer())):
            _fail(f"trainer.{key}", v, "null (all), a batch count >= 0 or a fraction in [0, 1]", "e.g. 10 or 0.25")
    log = t.get("log_every_n_steps")
    if log is not None and log < 0:
        _fail("trainer.log_every_n_steps", log, "a whole number >= 0", "e.g. 10")
    clip = t.get("gradient_clip_val")
    if clip is not None and clip < 0:
        _fail("trainer.gradient_clip_val", clip, "null or a number >= 0", "e.g. 1.0")


def _check_out_dir(out_dir) -> None:
    """The run folder can be created (or is a folder) and written to."""
    import tempfile

    if out_dir is None or not str(out_dir).strip():
        raise ConfigError(f"out_dir={out_dir!r} is empty: it must name the folder for this run's outputs; "
                          "e.g. --out_dir runs/my_run")
    path = Path(str(out_dir)).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"out_dir={str(out_dir)!r} is an existing file, not a folder; pick a folder path "
                          "(e.g. --out_dir runs/my_run) or move the file")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"out_dir={str(out_dir)!r} cannot be created: {probe} is a file, not a folder; "
                          "pick another out_dir")
    writable = os.access(probe, os.W_OK | os.X_OK)
    if writable:
        try:  # an unnamed file (O_TMPFILE where supported): nothing visible is left behind
            with tempfile.TemporaryFile(dir=probe):
                pass
        except OSError:
            writable = False
    if not writable:
        what = "is read-only" if probe == path else f"cannot be created: {probe} is read-only"
        raise ConfigError(f"out_dir={str(out_dir)!r} {what}; pick a folder you can write to (--out_dir ...)")


def _task_kind(class_path) -> str | None:
    name = str(class_path or "").rsplit(".", 1)[-1]
    return {"LanguageModelTask": "lm", "DistillationTask": "distill"}.get(name)


_TASK_NAMES = {"lm": "LanguageModelTask", "distill": "DistillationTask"}


def _flat(node, prefix: str = "") -> dict:
    """A nested model config (dict or jsonargparse Namespace, maybe with class_path/init_args) as dotted keys."""
    if hasattr(node, "as_dict"):
        node = node.as_dict()
    if hasattr(node, "__dataclass_fields__"):
        from dataclasses import asdict

        node = asdict(node)
    if isinstance(node, dict):
        if "init_args" in node and "class_path" in node:
            node = node["init_args"] or {}
        out = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: list(node) if isinstance(node, tuple) else node}


def check_checkpoint_fits(ckpt: dict, path, model) -> None:
    """Refuse a checkpoint of another task or architecture than the configured ``model`` (its namespace)."""
    if model is None or not ckpt.get("pikv_task"):
        return
    if hasattr(model, "as_dict"):
        model = model.as_dict()
    kind = _task_kind(model.get("class_path"))
    theirs = ckpt.get("pikv_task")
    if kind is not None and theirs != kind:
        raise ConfigError(
            f"checkpoint {str(path)!r} was written by {_TASK_NAMES.get(theirs, theirs)}, but the config runs "
            f"{_TASK_NAMES[kind]}; pass a checkpoint of this task (or the matching recipe)"
        )
    stored = ckpt.get("pikv_model_config")
    init = model.get("init_args") or {}
    key = {"lm": "model", "distill": "student"}.get(kind)
    if not isinstance(stored, dict) or key is None or init.get(key) is None:
        return
    asked, have = _flat(init[key]), _flat(stored)
    diff = [f"{k} {have[k]!r} in the checkpoint vs {asked[k]!r} configured" for k in sorted(asked)
            if k in have and asked[k] != have[k]]
    # a section that is null on one side and set on the other (e.g. a dense checkpoint, an MoE config)
    diff += [f"{k} null in the checkpoint vs set configured" for k in sorted(have)
             if have[k] is None and any(a.startswith(k + ".") for a in asked)]
    diff += [f"{k} set in the checkpoint vs null configured" for k in sorted(asked)
             if asked[k] is None and any(h.startswith(k + ".") for h in have)]
    if diff:
        more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
        raise ConfigError(
            f"checkpoint {str(path)!r} has another architecture than model.init_args.{key}: {'; '.join(diff[:3])}"
            f"{more}; use the config the checkpoint was trained with, or another checkpoint"
        )


def _checkpoint_dirs(trainer) -> list[Path]:
    from lightning.pytorch.callbacks import ModelCheckpoint

    return [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks
            if isinstance(cb, ModelCheckpoint) and cb.dirpath is not None]


def _last_checkpoints(trainer) -> list[str]:
    """The files Lightning would resume from with ``--ckpt_path last`` (``last*.ckpt`` of the checkpoint folders)."""
    found = []
    for d in _checkpoint_dirs(trainer):
        found += [str(p) for p in d.glob("last*.ckpt") if p.is_file()]
    return found


def _check_val_interval(trainer, dm) -> None:
    """Lightning's "val_check_interval must be less than or equal to the number of training batches", early."""
    import math

    vci = trainer.val_check_interval
    if not isinstance(vci, int) or trainer.check_val_every_n_epoch is None:
        return
    train_set = getattr(dm, "train_set", None)
    bs = getattr(getattr(dm, "hparams", None), "batch_size", None)
    if train_set is None or not bs:
        return
    n = len(dm.train_dataloader()) if trainer.world_size == 1 else math.ceil(len(train_set) / trainer.world_size) // bs
    lim = trainer.limit_train_batches
    if isinstance(lim, int):
        n = min(n, lim)
    elif lim is not None and lim < 1.0:
        n = max(1, int(n * lim)) if lim > 0 else 0
    if vci > n:
        raise ConfigError(
            f"trainer.val_check_interval={vci} is larger than the {n} training batches of an epoch "
            f"({len(train_set)} training sequences, data.batch_size={bs}); set trainer.val_check_interval <= {n}, "
            "a fraction such as 1.0 (once per epoch), or trainer.check_val_every_n_epoch null to count across epochs"
        )


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
    from pikv_train.run_lock import release_run_lock

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
    finally:
        release_run_lock()


def _find_user_error(e: BaseException) -> UserError | None:
    """Our own error inside a chain of wrappers (jsonargparse re-raises what dataclass checks raise)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, UserError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _bad_value(msg: str, top: str) -> str | None:
    """A value the parser rejected for a known key: name the key, the value and the valid choices or type."""
    import re

    found = re.findall(r"Expected a (.+?)\. Got value: (.*)", msg)
    if not found:
        return None
    expected, value = found[-1]  # the innermost reason
    keys = re.findall(r'Parser key "([^"]+)"', msg)
    nested = re.findall(r"NestedArg\(key='([^']+)'", msg)
    key = keys[-1] if keys else top
    if nested and top:  # the outermost NestedArg holds the whole path below the top-level key
        key = f"{top}.init_args.{nested[-1]}" if "class_path" in msg else f"{top}.{nested[-1]}"
    elif top and key != top:
        key = f"{top}.{key}"
    choices = re.match(r"typing\.Literal\[(.*)\]$", expected.strip())
    if choices:
        names = ", ".join(c.strip().strip("'\"") for c in choices.group(1).split(","))
        return f"{key}: {value.strip()!r} is not a valid choice; choose one of: {names}"
    kind = re.sub(r"<class '([^']+)'>", r"\1", expected).replace("typing.", "").strip()
    return f"{key}: {value.strip()!r} is not of the expected type {kind}; give a value of type {kind}"


def _summarise_parse_error(msg: str) -> str:
    """jsonargparse reports a nested tree of reasons; keep the most specific one, plus a hint."""
    import re

    hint = " (check the spelling against `python -m pikv_train fit --print_config`)"
    nested = re.search(r"NestedArg\(key='([^']+)'", msg)
    group = re.search(r'Parser key "([^"]+)"', msg)
    value_error = _bad_value(msg, group.group(1) if group else "")
    if value_error:
        return value_error
    if "Unexpected config:" in msg and not msg.split("Unexpected config:", 1)[1].strip():
        return "a config file holds no settings; give a recipe with model: and data: settings (see recipes/)"
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
