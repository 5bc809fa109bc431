"""User-facing errors: the CLI prints these as one line (``error: ...``) instead of a traceback."""

import os


class UserError(Exception):
    """Bad input the user can fix; the message names the problem and the fix."""


class ConfigError(UserError, ValueError):
    """A configuration value or combination that cannot work."""


class DataError(UserError, ValueError):
    """Data that is empty, malformed or does not fit the model."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder named in the config does not exist."""


class NonFiniteError(UserError, RuntimeError):
    """A loss or gradient became NaN or infinite; the message names the step and the loss terms."""


class RollbackError(UserError, RuntimeError):
    """A cache that cannot undo tokens by hiding positions (evicting policies, shard summaries); the message
    names the fix: ``cache.snapshot()`` before the speculative tokens and ``cache.restore()``."""


def bad_value(key: str, value, valid: str, fix: str) -> ConfigError:
    """The one-line error for a setting outside its range: ``key=value is invalid: valid; fix``.

    ``key`` is the setting's config path (``model.init_args.optim.lr``), ``valid`` the range or choices.
    """
    return ConfigError(f"{key}={value!r} is invalid: {valid}; {fix}")


def check_range(key: str, value, *, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False,
                fix: str | None = None) -> None:
    """Raise :func:`bad_value` unless ``lo <= value <= hi`` (``<`` on an open end; None = unbounded)."""
    low_ok = lo is None or (value > lo if lo_open else value >= lo)
    high_ok = hi is None or (value < hi if hi_open else value <= hi)
    if low_ok and high_ok and value == value:  # value == value is False for NaN
        return
    if lo is not None and hi is not None:
        valid = f"must lie in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    elif lo is not None:
        valid = f"must be {'>' if lo_open else '>='} {lo}"
    else:
        valid = f"must be {'<' if hi_open else '<='} {hi}"
    raise bad_value(key, value, valid, fix or f"set {key} within that range")


_WARNED: dict[str, None] = {}  # insertion-ordered set of the warnings issued in this process
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def one_line_warnings() -> None:
    """Show warnings raised in pikv_train as one line (``file:line: Category: message``), without the source
    line Python adds below; other warnings keep their format. Installed over whatever format is current
    (Lightning installs its own), once."""
    import warnings

    current = warnings.formatwarning
    if getattr(current, "_pikv_one_line", False):
        return

    def formatwarning(message, category, filename, lineno, line=None):
        if str(filename).startswith(_PACKAGE_DIR + os.sep):
            return f"{filename}:{lineno}: {category.__name__}: {message}\n"
        return current(message, category, filename, lineno, line)

    formatwarning._pikv_one_line = True
    warnings.formatwarning = formatwarning


def warn_once(message: str) -> None:
    """A legal but probably unintended setting: one warning per message and process (rank zero only),
    through Python's warnings, so the console log and W&B's captured output show it."""
    if message in _WARNED:
        return
    _WARNED[message] = None
    from lightning.pytorch.utilities import rank_zero_warn

    one_line_warnings()

    rank_zero_warn(message, category=UserWarning)


def issued_warnings() -> list[str]:
    """The warnings :func:`warn_once` has issued in this process, in order (the tasks copy them to W&B)."""
    return list(_WARNED)
