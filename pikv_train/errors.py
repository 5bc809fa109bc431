"""User-facing errors: the CLI prints these as one line (``error: ...``) instead of a traceback."""


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
