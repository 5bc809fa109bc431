"""Weights & Biases logging that never blocks or stops training.

``WandbLogger`` here is Lightning's, with four changes: it goes offline by itself when no credentials
are configured (no prompt, no network wait), it gives up quickly when a server is unreachable (falling
back to offline), if W&B cannot start at all the run goes on without it, with one warning, and it honours
W&B's own environment variables (:func:`wandb_env_mode`): ``WANDB_MODE=disabled`` or
``WANDB_DISABLED=true`` turn it into a do-nothing logger (no run, no files, no W&B process; the CLI then
creates no W&B logger at all), ``WANDB_MODE=offline`` keeps it offline and ``WANDB_MODE=online`` asks for
an online run (offline, with a warning, when no credentials exist).
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.loggers.logger import DummyExperiment
from lightning.pytorch.utilities import rank_zero_warn


def wandb_env_mode() -> str | None:
    """The mode W&B's environment variables ask for: ``disabled`` (WANDB_MODE=disabled, or WANDB_DISABLED set
    to true/1/yes), ``offline`` (WANDB_MODE=offline or dryrun), ``online`` (WANDB_MODE=online or run), or
    None when they say nothing."""
    if os.environ.get("WANDB_DISABLED", "").strip().lower() in ("true", "1", "yes", "on"):
        return "disabled"
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    return {"disabled": "disabled", "offline": "offline", "dryrun": "offline", "online": "online",
            "run": "online"}.get(mode)


def wandb_disabled_reason() -> str | None:
    """Which variable disables W&B (for messages), or None when W&B is not disabled."""
    if wandb_env_mode() != "disabled":
        return None
    by_mode = os.environ.get("WANDB_MODE", "").strip().lower() == "disabled"
    return "WANDB_MODE=disabled" if by_mode else "WANDB_DISABLED=true"


def wandb_credentials_present() -> bool:
    """True when an API key is set in the environment or in ~/.netrc for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc(os.environ.get("NETRC", str(Path.home() / ".netrc"))).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class WandbLogger(_LightningWandbLogger):
    """Lightning's WandbLogger, offline unless credentials exist, and never fatal.

    Args: as :class:`lightning.pytorch.loggers.WandbLogger`; ``offline=None`` (default) means
    "offline when no credentials are configured or WANDB_MODE says so".
    """

    def __init__(
        self,
        name: str | None = None,
        save_dir: str = ".",
        project: str | None = "pikv_train",
        offline: bool | None = None,
        log_model: bool = False,
        version: str | None = None,
        tags: list[str] | None = None,
        group: str | None = None,
        prefix: str = "",
    ):
        env_mode = wandb_env_mode()
        self._disabled = env_mode == "disabled"
        if self._disabled:
            offline = True  # never probe a server or start W&B; experiment is a do-nothing run
        if offline is None:
            offline = env_mode == "offline" or not wandb_credentials_present()
            if env_mode == "online" and offline:
                rank_zero_warn("WANDB_MODE=online but no W&B credentials (WANDB_API_KEY or ~/.netrc); logging offline")
        kwargs = {}
        try:
            import wandb

            # Short timeout: an unreachable server must not stall training start.
            kwargs["settings"] = wandb.Settings(init_timeout=30, silent=True)
        except Exception:  # pragma: no cover - wandb missing or broken
            pass
        if tags:
            kwargs["tags"] = tags
        if group:
            kwargs["group"] = group
        base_url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        if not offline and not _reachable(base_url):
            # Decide now, in seconds, rather than wait for W&B's own time-outs at the first log call.
            rank_zero_warn(f"W&B server {base_url} is unreachable; logging offline (sync later with `wandb sync`)")
            offline = True
            os.environ["WANDB_MODE"] = "offline"
        if offline:
            if not self._disabled:  # WANDB_MODE=disabled stays as it is
                os.environ.setdefault("WANDB_MODE", "offline")
            log_model = False  # Lightning refuses log_model with offline=True
        # save_dir is created when the W&B run starts (the first log call), not here: a run refused by the
        # checks that follow the trainer's construction must not leave a new out_dir behind.
        super().__init__(
            name=name, save_dir=save_dir, project=project, offline=offline, log_model=log_model,
            version=version, prefix=prefix, **kwargs,
        )
        self._failed = False

    @property
    def experiment(self):
        if self._failed or self._disabled:
            return self._disabled_run()
        try:
            if self._experiment is None and self.save_dir:
                Path(self.save_dir).mkdir(parents=True, exist_ok=True)
            return super().experiment
        except Exception as e:  # noqa: BLE001 - any W&B failure must leave training alone
            if not self._offline:
                rank_zero_warn(f"W&B online init failed ({type(e).__name__}: {str(e)[:200]}); logging offline instead")
                self._go_offline()
                try:
                    return super().experiment
                except Exception as e2:  # noqa: BLE001
                    e = e2
            rank_zero_warn(f"W&B is unavailable ({type(e).__name__}: {str(e)[:200]}); training continues without it")
            self._failed = True
            return self._disabled_run()

    def _go_offline(self) -> None:
        self._offline = True
        self._wandb_init["mode"] = "offline"
        os.environ["WANDB_MODE"] = "offline"
        self._experiment = None

    def _disabled_run(self):
        """A do-nothing W&B run (every API call accepted, nothing sent or written)."""
        if self._experiment is None or not (self._failed or self._disabled):
            import wandb

            self._experiment = wandb.init(mode="disabled")
        return self._experiment


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the W&B server opens within ``timeout`` seconds."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        with socket.create_connection((u.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False
