"""``python -m pikv_train fit|validate|test|predict --config recipe.yaml`` (also the ``pikv-train`` script), and
``python -m pikv_train export --ckpt PATH --out DIR`` (a checkpoint as a Hugging Face folder: :mod:`pikv_train.hf.command`).

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
  without a checkpoint; ``last_or_new`` starts fresh, outside ``fit`` only with ``--random_weights true``),
  weights for validate/test/predict (``--ckpt_path``, ``init_from`` / ``student_init`` or
  ``--random_weights true``), a fresh ``fit`` into a folder that already holds a run (refused unless
  ``--overwrite true``); then the run lock ``out_dir/.pikv.lock`` (see :mod:`pikv_train.run_lock`);
- a refused run prints its one ``error:`` line and nothing else: Lightning's info lines and warnings are held
  back until the checks pass, then shown;
- ``--ckpt_path FILE`` and ``--ckpt_path last`` behave alike: the command's settings are used (outside
  ``fit``, the checkpoint's cache policy unless cache settings are given), and settings that differ from the
  checkpoint's are listed in one warning;
- the resolved config printed once the checks pass (``fit`` saves it as ``out_dir/config.yaml``,
  ``validate``/``test``/``predict`` as ``out_dir/<subcommand>-config.yaml``).
"""

from __future__ import annotations

import copy
import logging
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
from pikv_train.errors import ConfigError, MissingFileError, UserError, warn_once  # noqa: E402

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
        elif used == 2 and value.startswith("-") and _is_number(value):
            # `--key -1e-3`: argparse takes a dash-prefixed value it does not read as a number (an exponent,
            # inf) for an option and reports "expected one argument"; `--key=-1e-3` is unambiguous.
            out.append(f"{key}={value}")
        else:
            out.append(a)
            used = 1
        i += used
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _cache_given(cache, argv: list[str]) -> bool:
    """Whether the user set cache settings: on the command line, or values other than the defaults."""
    from pikv_train.cache.config import CacheConfig

    if any(a.startswith(("--model.init_args.cache", "--model.cache")) for a in argv):
        return True
    values, default = _flat(cache), _flat(CacheConfig())
    return any(k in default and v != default[k] for k, v in values.items())


class PiKVCLI(LightningCLI):
    """LightningCLI with the data module fixed to :class:`TextDataModule` and tasks chosen by class_path."""

    def __init__(self, *args, **kwargs):
        self._argv = list(kwargs.get("args") or [])  # the (expanded) command line, for "was this given"
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--out_dir", type=str, default="runs/default", help="Folder for this run's outputs.")
        parser.add_argument(
            "--random_weights", type=bool, default=False,
            help="validate/test/predict without a checkpoint: run on freshly initialised (untrained) weights. "
            "Without it those commands refuse to run without a checkpoint.",
        )
        parser.add_argument(
            "--overwrite", type=bool, default=False,
            help="fit without --ckpt_path into an out_dir that already holds a run (checkpoints): start a new run "
            "there, removing the previous run's checkpoints. Without it such a fit is refused.",
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
        if sub in ("validate", "test", "predict"):
            # The training run's config.yaml stays the training run's: evaluations save their own.
            self.save_config_kwargs = {**self.save_config_kwargs, "config_filename": f"{sub}-config.yaml"}
        _use_model_tokenizer(cfg)
        _use_teacher_tokenizer(cfg)

    def _parse_ckpt_path(self) -> None:
        """Lightning replaces the model's settings with the checkpoint's hyper-parameters here when
        ``--ckpt_path`` names a file (not with ``last``). We do not: with either form the command's settings
        are used (see :meth:`_use_checkpoint`). The file is checked first (a missing, damaged or foreign file,
        another task or architecture: a one-line error)."""
        sub = self.config.get("subcommand")
        if not sub:
            return
        cfg = self.config[sub]
        _use_model_tokenizer(cfg)
        _use_teacher_tokenizer(cfg)  # the student's vocabulary as the run will have it, before comparing
        ckpt = cfg.get("ckpt_path")
        if ckpt and ckpt not in _CKPT_WORDS and not str(ckpt).startswith("registry"):
            from pikv_train.tasks.teacher import read_checkpoint

            self._use_checkpoint(sub, read_checkpoint(ckpt), ckpt)

    def _use_checkpoint(self, sub: str, saved: dict, path, model=None) -> None:
        """Before the run uses checkpoint ``saved``: refuse another task or architecture; outside ``fit`` take
        its cache settings unless the command gives some (any checkpoint can be evaluated under any policy;
        ``model``: the task already built, for ``--ckpt_path last``); in ``fit`` make the command's optimizer
        settings hold after Lightning restores the optimizer state; list what differs in one warning."""
        cfg = self.config[sub]
        model_cfg = cfg.get("model")
        check_checkpoint_fits(saved, path, model_cfg)
        hparams = saved.get("hyper_parameters") or {}
        init = model_cfg.get("init_args") if model_cfg is not None else None
        cache = init.get("cache") if init is not None else None
        if sub != "fit" and cache is not None:
            given = _cache_given(cache, self._argv)
            theirs = hparams.get("cache")
            if not given and theirs is not None:
                _update_namespace(cache, _plain(theirs))
                if model is not None and hasattr(model, "student_model"):
                    from pikv_train.cache.config import CacheConfig, build_policy

                    student = model.student_model
                    student.set_cache_policy(build_policy(CacheConfig.from_dict(_plain(cache)), student.cfg))
            if given or theirs is not None:
                rank_zero_info(f"{sub}: cache policy {cache.get('policy', 'full')} "
                               f"({'as given' if given else 'from the checkpoint'})")
        diff = setting_differences(hparams, model_cfg, sub)
        if not diff:
            return
        if sub == "fit" and any(key.startswith("model.init_args.optim.") for key, _, _ in diff):
            self._restore_command_optim = True
        shown = "; ".join(f"{key}: {_show(theirs)} in the checkpoint, {_show(ours)} now" for key, theirs, ours in diff[:8])
        more = f" (and {len(diff) - 8} more)" if len(diff) > 8 else ""
        what = f"resuming from {str(path)!r}" if sub == "fit" else f"{sub} of {str(path)!r}"
        warn_once(f"{what} with settings that differ from the checkpoint's; the command's are used: {shown}{more}")

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
        """Fail on bad input before Lightning writes anything (config.yaml, W&B files, checkpoints); then take
        the run lock, show what was held back and the resolved config."""
        _default_checkpoint_dirs(self.trainer)
        dm, model = self.datamodule, self.model
        if dm is not None and hasattr(model, "preflight"):
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
        old = self._check_fresh_fit(sub)
        from pikv_train.run_lock import take_run_lock

        take_run_lock(self.config[sub].out_dir)  # the last check: from here on, files are written
        if old:
            _remove_checkpoints(old, self.config[sub].out_dir)
        if getattr(self, "_restore_command_optim", False):
            self.trainer.callbacks.append(_CommandOptimizerSettings())
        _HELD.release()
        self._print_config(sub)

    def _resolve_last(self, sub: str) -> None:
        """``--ckpt_path last`` needs a checkpoint to resume; ``last_or_new`` starts fresh without one (outside
        ``fit``: only when random weights are asked for)."""
        cfg = self.config[sub]
        ckpt = cfg.get("ckpt_path")
        if ckpt not in ("last", "last_or_new"):
            return
        found = _last_checkpoints(self.trainer)
        where = " or ".join(str(d) for d in _checkpoint_dirs(self.trainer)) or "the checkpoint folder"
        if not found:
            if ckpt == "last":
                raise ConfigError(
                    f"--ckpt_path last: no checkpoint to resume in {where}; check out_dir, or pass "
                    "--ckpt_path last_or_new to resume if there is one and start fresh otherwise"
                )
            if sub != "fit" and not _has_weights(cfg):
                raise ConfigError(
                    f"{sub} --ckpt_path last_or_new: no checkpoint in {where}, so {sub} would run on random "
                    f"(untrained) weights; check out_dir, pass --ckpt_path <file>, or --random_weights true if "
                    "untrained weights are intended"
                )
            rank_zero_info(f"--ckpt_path last_or_new: no checkpoint yet, {'starting a new run' if sub == 'fit' else 'using the initial weights'}")
            new = None
        else:
            from pikv_train.tasks.teacher import read_checkpoint

            newest = max(found, key=os.path.getmtime)
            self._use_checkpoint(sub, read_checkpoint(newest), newest, model=self.model)
            new = "last"
        cfg.ckpt_path = new
        if hasattr(self, "config_init"):
            self.config_init[sub]["ckpt_path"] = new

    def _check_fresh_fit(self, sub: str) -> list[Path]:
        """A fit without a checkpoint to resume into an out_dir that holds checkpoints would write over the run
        there (config.yaml, last-v1.ckpt beside last.ckpt): refused unless ``--overwrite true``, which returns
        the old checkpoints to remove once the lock is taken."""
        from pikv_train.run_lock import is_launching_process

        cfg = self.config[sub]
        if sub != "fit" or cfg.get("ckpt_path") or not is_launching_process():
            return []
        old = [p for d in _checkpoint_dirs(self.trainer) if d.is_dir() for p in sorted(d.glob("*.ckpt")) if p.is_file()]
        if not old:
            return []
        if cfg.get("overwrite"):
            return old
        last = [p for p in old if p.name.startswith("last")]
        shown = (last or old)[0]
        try:
            shown = shown.relative_to(Path(str(cfg.out_dir)).resolve())
        except ValueError:
            pass
        raise ConfigError(
            f"{cfg.out_dir} already holds a run ({shown}); resume with --ckpt_path last, or choose another "
            "--out_dir / delete it (--overwrite true starts a new run there, removing its checkpoints)"
        )

    def _print_config(self, sub: str) -> None:
        if os.environ.get("PIKV_QUIET_CONFIG"):
            return
        text = self._parser(sub).dump(self.config[sub], skip_none=False) if sub in self.config else ""
        rank_zero_info(f"---- resolved config ({sub}) ----\n{text}---------------------------------")


_CKPT_WORDS = ("last", "best", "hpc", "last_or_new")


def _fail(key: str, value, valid: str, fix: str) -> None:
    raise ConfigError(f"{key}={value!r} is invalid (must be {valid}); {fix}")


def _has_weights(cfg) -> bool:
    """Whether a validate/test/predict run has weights other than random ones without a checkpoint to load:
    --random_weights true, or the task starts from a checkpoint (student_init, LanguageModelTask's init_from) or a
    Hugging Face folder (the model's hf_path)."""
    if cfg.get("random_weights"):
        return True
    init = cfg.get("model", {}).get("init_args") if cfg.get("model") is not None else None
    if init is None:
        return False
    from_folder = any(hasattr(init.get(k), "get") and init.get(k).get("hf_path") for k in ("student", "model"))
    return bool(init.get("student_init") or init.get("init_from") or from_folder)


def check_run_settings(sub: str | None, cfg) -> None:
    """Trainer arguments, paths and weights, checked after parsing and before anything is created."""
    _check_trainer(cfg.get("trainer"))
    _check_out_dir(cfg.get("out_dir"))
    if sub in ("validate", "test", "predict") and not cfg.get("ckpt_path") and not _has_weights(cfg):
        raise ConfigError(
            f"{sub} without --ckpt_path would run on random (untrained) weights; pass --ckpt_path "
            "<out_dir>/checkpoints/last.ckpt, or --random_weights true if untrained weights are intended"
        )


def _num(v) -> bool:
    """A number to range-check (Lightning also takes strings, e.g. a time for val_check_interval, and bools)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_trainer(t) -> None:
    if t is None:
        return
    acc = t.get("accumulate_grad_batches")
    if acc is not None and (not isinstance(acc, int) or acc < 1):
        _fail("trainer.accumulate_grad_batches", acc, "a whole number >= 1",
              "set it to 1 (no accumulation) or more")
    vci = t.get("val_check_interval")  # also a time ("DD:HH:MM:SS", a timedelta or a dict): Lightning checks it
    if _num(vci) and vci <= 0:
        _fail("trainer.val_check_interval", vci, "a batch count >= 1 or a fraction of an epoch in (0, 1]",
              "e.g. 1.0 (once per epoch) or 100 (every 100 batches)")
    if isinstance(vci, float) and vci > 1 and not vci.is_integer():
        _fail("trainer.val_check_interval", vci, "a fraction must lie in (0, 1], a batch count must be whole",
              "e.g. 0.5 or 100")
    steps = t.get("max_steps")
    if _num(steps) and steps < -1:
        _fail("trainer.max_steps", steps, "-1 (no limit) or a step count >= 0", "e.g. 1000")
    epochs = t.get("max_epochs")
    if _num(epochs) and epochs < -1:
        _fail("trainer.max_epochs", epochs, "-1 (no limit), null or an epoch count >= 0", "e.g. 1")
    every = t.get("check_val_every_n_epoch")
    if _num(every) and every < 1:
        _fail("trainer.check_val_every_n_epoch", every, "null or a whole number >= 1",
              "e.g. 1, or null to count val_check_interval across epochs")
    devices = t.get("devices")
    if devices is not None and str(devices).strip() in ("0", "[]", ""):
        _fail("trainer.devices", devices, "'auto', -1 (all), a device count >= 1 or a list of device ids",
              "e.g. 1, or --trainer.accelerator cpu for a CPU run")
    if _num(devices) and devices < -1:
        _fail("trainer.devices", devices, "'auto', -1 (all), a device count >= 1 or a list of device ids", "e.g. 1")
    nodes = t.get("num_nodes")
    if _num(nodes) and nodes < 1:
        _fail("trainer.num_nodes", nodes, "a whole number >= 1", "e.g. 1")
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches"):
        v = t.get(key)
        if _num(v) and (v < 0 or (isinstance(v, float) and v > 1 and not v.is_integer())):
            _fail(f"trainer.{key}", v, "null (all), a batch count >= 0 or a fraction in [0, 1]", "e.g. 10 or 0.25")
    log = t.get("log_every_n_steps")
    if _num(log) and log < 0:
        _fail("trainer.log_every_n_steps", log, "a whole number >= 0", "e.g. 10")
    clip = t.get("gradient_clip_val")
    if _num(clip) and clip < 0:
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


# The model fields that decide the parameters' shapes (what a checkpoint's weights can be loaded into); every
# other field (router kernel and loss weights, capacity, max_seq_len, rope_base, ...) is behaviour: a resumed
# run uses the command's value, listed in a warning (see setting_differences). d_ff counts for dense models
# only; a router name counts when the two routers hold different parameters (checked by building them).
_SHAPE_FIELDS = ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "tie_embeddings", "qkv_bias",
                 "moe.n_experts", "moe.d_expert", "moe.shared_expert")


def _router_parameters(model_cfg: dict) -> dict | None:
    """Names and shapes of the router's parameters and buffers for a model config (built on the meta device:
    no memory, no compute); None when it cannot be built."""
    import torch

    from pikv_train.models.config import ModelConfig
    from pikv_train.models.decoder import Decoder

    try:
        cfg = copy.deepcopy(model_cfg)
        cfg["n_layer"] = 1
        with torch.device("meta"):
            decoder = Decoder(ModelConfig.from_dict(cfg))
        return {k.split(".router.", 1)[1]: tuple(v.shape) for k, v in decoder.state_dict().items() if ".router." in k}
    except Exception:  # noqa: BLE001 - unknown: treat another router name as another architecture
        return None


def architecture_differences(asked: dict, have: dict) -> list[str]:
    """What differs between two model configs (plain nested dicts) in a way that changes the parameters."""
    a, h = _flat(asked), _flat(have)
    diff = [f"{k} {h[k]!r} in the checkpoint vs {a[k]!r} configured" for k in _SHAPE_FIELDS
            if k in a and k in h and a[k] != h[k]]
    a_dense, h_dense = a.get("moe", ...) is None, h.get("moe", ...) is None
    if a_dense and h_dense and "d_ff" in a and "d_ff" in h and a["d_ff"] != h["d_ff"]:
        diff.append(f"d_ff {h['d_ff']!r} in the checkpoint vs {a['d_ff']!r} configured")
    if h_dense and not a_dense:
        diff.append("moe null in the checkpoint vs set configured")
    if a_dense and not h_dense:
        diff.append("moe set in the checkpoint vs null configured")
    name = "moe.router.name"
    if not diff and a.get(name, ...) != h.get(name, ...) and name in a and name in h:
        mine, theirs = _router_parameters(asked), _router_parameters(have)
        if mine is None or theirs is None or mine != theirs:
            diff.append(f"{name} {h[name]!r} in the checkpoint vs {a[name]!r} configured (their parameters differ)")
    return diff


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
    asked = _plain(init[key])
    if isinstance(asked, dict) and (asked.get("hf_path") or asked.get("upcycle")):
        from pikv_train.models.build import resolve_config
        from pikv_train.models.config import ModelConfig

        asked = resolve_config(ModelConfig.from_dict(asked)).to_dict()  # the architecture the run will build
    diff = architecture_differences(asked, stored)
    if diff:
        more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
        raise ConfigError(
            f"checkpoint {str(path)!r} has another architecture than model.init_args.{key}: {'; '.join(diff[:3])}"
            f"{more}; use the config the checkpoint was trained with, or another checkpoint"
        )


# Settings that do not change what a run computes, only how (or only how a new run starts): not listed
# when they differ from a checkpoint's. Keys relative to model.init_args.
_SAME_RESULT = ("init_from", "student_init", "activation_checkpointing", "chunk_size", "loss.chunk_size")
# ... and those that only training uses, outside fit.
_TRAINING_ONLY = ("optim", "nonfinite")


def setting_differences(hparams: dict, model, sub: str | None) -> list[tuple[str, object, object]]:
    """(key, checkpoint's value, command's value) for each model setting of the command that differs from the
    checkpoint's hyper-parameters ``hparams`` and matters for ``sub``. In ``fit`` the cache is left out: a
    resumed run continues under the checkpoint's cache policy (the task says so when it differs)."""
    if not hparams or model is None:
        return []
    ours = _flat(model)
    theirs = _flat({k: v for k, v in hparams.items() if not str(k).startswith("_")})
    skip = _SAME_RESULT + (("cache",) if sub == "fit" else _TRAINING_ONLY)
    out: list[tuple[str, object, object]] = []
    seen: set[str] = set()

    def add(key, theirs_value, ours_value):
        if key not in seen:
            seen.add(key)
            out.append((f"model.init_args.{key}", theirs_value, ours_value))

    for k in sorted(set(ours) | set(theirs)):
        if any(k == s or k.startswith(s + ".") for s in skip):
            continue
        if k in ours and k in theirs:
            if not _same_value(ours[k], theirs[k]):
                add(k, theirs[k], ours[k])
            continue
        # a section null on one side and set on the other (e.g. a router capacity block, a teacher)
        side = theirs if k in ours else ours
        head = next((p for p in _prefixes(k) if p in side and side[p] is None), None)
        if head is not None:
            add(head, None, _SET) if k in ours else add(head, _SET, None)
    return out


class _SetSection:
    def __repr__(self) -> str:
        return "set"


_SET = _SetSection()


def _prefixes(key: str) -> list[str]:
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _same_value(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b and type(a) is type(b)
    return a == b


def _show(value) -> str:
    return repr(value) if isinstance(value, str) else "null" if value is None else str(value)


def _plain(node):
    """A config node (jsonargparse Namespace, dataclass, dict) as plain nested dicts and lists."""
    if hasattr(node, "as_dict"):
        node = node.as_dict()
    if hasattr(node, "__dataclass_fields__"):
        from dataclasses import asdict

        node = asdict(node)
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_plain(v) for v in node]
    return node


def _update_namespace(ns, values: dict) -> None:
    """Set the settings of ``values`` (plain dicts) that ``ns`` has, keeping its types (nested namespaces,
    tuples)."""
    for k, v in values.items():
        if k not in ns:
            continue
        cur = ns[k]
        if isinstance(v, dict) and hasattr(cur, "as_dict"):
            _update_namespace(cur, v)
        elif isinstance(cur, tuple) and isinstance(v, list):
            ns[k] = tuple(v)
        else:
            ns[k] = v


def _default_checkpoint_dirs(trainer) -> None:
    """A ModelCheckpoint without a dirpath gets ``<default_root_dir>/checkpoints`` (Lightning's folder for a
    run without a logger; out_dir/checkpoints unless trainer.default_root_dir says otherwise) now, instead of
    at setup: so ``--ckpt_path last`` (ours and Lightning's lookup, which runs before setup) looks where the
    checkpoints are, and with a logger they stay there too instead of a new folder per W&B run."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath is None:
            cb.dirpath = os.path.realpath(os.path.join(str(trainer.default_root_dir), "checkpoints"))


def _remove_checkpoints(old: list[Path], out_dir) -> None:
    """``--overwrite true``: the previous run's checkpoints go (so the new run's are not saved beside them as
    last-v1.ckpt, and ``--ckpt_path last`` finds only the new run's)."""
    for p in old:
        p.unlink(missing_ok=True)
    rank_zero_info(f"--overwrite: removed the {len(old)} checkpoint(s) of the previous run in {out_dir}")


class _CommandOptimizerSettings:
    """A callback for a resumed fit whose optimizer settings differ from the checkpoint's: Lightning restores
    the optimizer and schedule state from the checkpoint, their hyper-parameters (peak lr, betas, weight
    decay) included. After that restore, the command's are put back (taken from a freshly configured
    optimizer, so the task's group layout and per-group factors hold); moments and the step count stay."""

    def __new__(cls):
        from lightning.pytorch.callbacks import Callback

        class CommandOptimizerSettings(Callback):
            def on_train_start(self, trainer, pl_module) -> None:
                _apply_command_optimizer_settings(trainer, pl_module)

        return CommandOptimizerSettings()


def _apply_command_optimizer_settings(trainer, pl_module) -> None:
    from lightning.pytorch.core.optimizer import _init_optimizers_and_lr_schedulers

    fresh_opts, fresh_scheds = _init_optimizers_and_lr_schedulers(pl_module)
    for old, new in zip(trainer.optimizers, fresh_opts):
        if len(old.param_groups) != len(new.param_groups):
            return
        for g_old, g_new in zip(old.param_groups, new.param_groups):
            g_old.update({k: v for k, v in g_new.items() if k != "params"})
    for old_cfg, new_cfg in zip(trainer.lr_scheduler_configs, fresh_scheds):
        old_s, new_s = old_cfg.scheduler, new_cfg.scheduler
        if hasattr(old_s, "base_lrs") and hasattr(new_s, "base_lrs"):
            old_s.base_lrs = list(new_s.base_lrs)
        if hasattr(old_s, "lr_lambdas"):  # LambdaLR: the lr of the step the run resumes at
            for g, base, f in zip(old_s.optimizer.param_groups, old_s.base_lrs, old_s.lr_lambdas):
                g["lr"] = base * f(old_s.last_epoch)
            old_s._last_lr = [g["lr"] for g in old_s.optimizer.param_groups]


def _use_teacher_tokenizer(cfg) -> None:
    """A Hugging Face teacher brings its tokenizer: unless set otherwise, the data uses it, and a student
    vocabulary of 258 (the byte tokenizer's size, the building blocks' value) too small for it is resized to
    it, with a warning; a 258 that holds the tokenizer stays (rows past it are padding). Idempotent."""
    init = cfg.get("model", {}).get("init_args") if cfg.get("model") is not None else None
    teacher = init.get("teacher") if init is not None else None
    hf_path = teacher.get("hf_path") if teacher is not None else None
    if not hf_path:
        return
    _take_folder_tokenizer(cfg, "teacher", hf_path)
    student = init.get("student")
    if student is not None and student.get("hf_path"):
        return  # a student from a Hugging Face folder has that model's vocabulary (see _use_model_tokenizer)
    if student is not None and student.vocab_size == 258 and cfg.data.tokenizer == hf_path:
        from pikv_train.data.tokenizer import build_tokenizer

        size = build_tokenizer(hf_path).vocab_size
        if size > 258:
            student.vocab_size = size
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(
                f"student.vocab_size 258 (the byte tokenizer's size) cannot hold the teacher tokenizer's {size} "
                f"tokens: using {size}; set model.init_args.student.vocab_size to choose another size"
            )


def _use_model_tokenizer(cfg) -> None:
    """A trained model started from a Hugging Face folder (``student.hf_path``, or the language-model task's
    ``model.hf_path``) brings its tokenizer, as a Hugging Face teacher does: unless data.tokenizer is given, the
    data use the folder's; the model's vocabulary is the folder's (config.json, see pikv_train.hf.load).
    Idempotent; runs before :func:`_use_teacher_tokenizer`, so with both the student's tokenizer wins."""
    init = cfg.get("model", {}).get("init_args") if cfg.get("model") is not None else None
    if init is None:
        return
    for name in ("student", "model"):
        node = init.get(name)
        hf_path = node.get("hf_path") if node is not None and hasattr(node, "get") else None
        if not hf_path:
            continue
        _take_folder_tokenizer(cfg, name, hf_path)
        return


def _take_folder_tokenizer(cfg, name: str, hf_path) -> None:
    """``model.init_args.<name>.hf_path`` must be a folder; unless data.tokenizer is set, the data use its tokenizer."""
    if not Path(str(hf_path)).expanduser().is_dir():
        raise MissingFileError(
            f"model.init_args.{name}.hf_path: Hugging Face model folder not found: {str(hf_path)!r}; set it to a "
            "local folder written by save_pretrained (config.json, the weights and the tokenizer)"
        )
    if cfg.data.tokenizer == "byte":
        cfg.data.tokenizer = hf_path
        rank_zero_info(f"data.tokenizer: using the {name}'s tokenizer ({hf_path})")


class _HeldOutput:
    """What Lightning and the libraries print while the run is being checked (Lightning's info lines through
    its loggers, warnings, anything written to ``sys.stderr`` such as the datasets library's progress bars),
    held back from the start of the CLI until the checks pass (:meth:`release`: then shown, in order), so a
    run refused for bad input prints its one ``error:`` line and nothing else (:meth:`drop`). Anything else
    that ends the run (a crash, ``--help``, Ctrl-C) shows what was held."""

    _LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")

    def __init__(self) -> None:
        self.active = False
        self._items: list = []
        self._handlers: dict[str, list] = {}
        self._showwarning = self._mine = None
        self._stderr = self._proxy = None

    def start(self) -> None:
        if self.active:
            return
        self.active, self._items = True, []
        held = self

        class Hold(logging.Handler):
            def __init__(self, targets):
                super().__init__(logging.NOTSET)
                self.targets = targets

            def emit(self, record):
                held._items.append(("log", self.targets, record))

        for name in self._LOGGERS:
            lg = logging.getLogger(name)
            self._handlers[name] = lg.handlers[:]
            if lg.handlers:
                lg.handlers = [Hold(self._handlers[name])]
        self._showwarning = warnings.showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None):
            held._items.append(("warning", (message, category, filename, lineno, file, line)))

        self._mine = warnings.showwarning = showwarning
        self._stderr = sys.stderr
        self._proxy = sys.stderr = _HeldStream(self._stderr, self._items)

    def _stop(self) -> list:
        if not self.active:
            return []
        self.active = False
        for name, handlers in self._handlers.items():
            logging.getLogger(name).handlers = handlers
        if warnings.showwarning is self._mine:
            warnings.showwarning = self._showwarning
        if sys.stderr is self._proxy:
            sys.stderr = self._stderr
        items, self._items = self._items, []
        return items

    def release(self) -> None:
        for kind, *rest in self._stop():
            if kind == "log":
                targets, record = rest
                for h in targets:
                    if record.levelno >= h.level:
                        h.handle(record)
            elif kind == "text":
                stream, text = rest
                stream.write(text)
                stream.flush()
            else:  # as warnings.warn shows one (a recorder such as pytest's gets it)
                show = getattr(warnings, "_showwarnmsg", None)
                if show is not None:
                    show(warnings.WarningMessage(*rest[0]))
                else:  # pragma: no cover
                    warnings.showwarning(*rest[0])

    def drop(self) -> None:
        self._stop()


class _HeldStream:
    """``sys.stderr`` while output is held: writes are kept (in order with the held log lines and warnings)."""

    def __init__(self, stream, items: list):
        self._stream, self._items = stream, items

    def write(self, text: str) -> int:
        self._items.append(("text", self._stream, text))
        return len(text)

    def flush(self) -> None:
        pass

    def __getattr__(self, name):  # isatty, encoding, fileno, ...: the real stream's
        return getattr(self._stream, name)


_HELD = _HeldOutput()


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

    vci = getattr(trainer, "val_check_interval", None)  # unset when validation runs by time ("00:00:01:00")
    if not isinstance(vci, int) or isinstance(vci, bool) or trainer.check_val_every_n_epoch is None:
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
    if argv[:1] in (["-h"], ["--help"]):  # LightningCLI's help lists its own subcommands only
        print("python -m pikv_train export --ckpt CKPT --out DIR: a checkpoint as a Hugging Face folder "
              "(python -m pikv_train export --help)\n")
    if argv[:1] == ["export"]:  # not a Lightning subcommand: a checkpoint to a Hugging Face folder
        from pikv_train.hf.command import main as export_main

        export_main(argv[1:])
        return None
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    from pikv_train.errors import one_line_warnings
    from pikv_train.run_lock import release_run_lock

    one_line_warnings()
    _HELD.start()
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
        _HELD.drop()
        print(f"error: {_one_line(_name_model_key(str(e), argv))}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as e:  # jsonargparse parse errors (unknown keys, bad types), possibly wrapping ours
        if os.environ.get("PIKV_DEBUG"):
            raise
        inner = _find_user_error(e)
        if inner is not None:
            _HELD.drop()
            print(f"error: {_one_line(_name_model_key(str(inner), argv))}", file=sys.stderr)
        elif type(e).__name__ == "ArgumentError":
            _HELD.drop()
            print(f"error: {_name_model_key(_summarise_parse_error(str(e)), argv)}", file=sys.stderr)
        else:
            raise
        raise SystemExit(2) from None
    finally:
        _HELD.release()  # what is still held when the run ends otherwise (a crash, --help, Ctrl-C)
        release_run_lock()


_MODEL_PLACEHOLDER = "{model|student}"  # how pikv_train.models.config.MODEL_KEY names the model setting


def _name_model_key(message: str, argv: list[str]) -> str:
    """Messages of the model config name it ``model.init_args.{model|student}`` (the same dataclass serves
    both tasks): name the setting of the task this command runs."""
    if _MODEL_PLACEHOLDER not in message:
        return message
    key = {"lm": "model", "distill": "student"}.get(_task_of_args(argv))
    return message.replace(_MODEL_PLACEHOLDER, key) if key else message


def _task_of_args(argv: list[str]) -> str | None:
    """The task ('lm' or 'distill') an expanded argument list selects: the last model class_path named by a
    --config (a file or YAML text) or by --model / --model.class_path."""
    kind = None
    for i, a in enumerate(argv):
        key, value = a, None
        if a.startswith("--") and "=" in a:
            key, value = a.split("=", 1)
        elif i + 1 < len(argv):
            value = argv[i + 1]
        if value is None:
            continue
        class_path = None
        if key == "--config":
            try:
                text = Path(value).read_text() if "\n" not in value and Path(value).is_file() else value
                data = yaml.safe_load(text)
            except (OSError, ValueError, yaml.YAMLError):
                continue
            model = data.get("model") if isinstance(data, dict) else None
            class_path = model.get("class_path") if isinstance(model, dict) else model
        elif key in ("--model", "--model.class_path"):
            class_path = value
        found = _task_kind(class_path) if isinstance(class_path, str) else None
        kind = found or kind
    return kind


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
