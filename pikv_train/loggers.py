"""Weights & Biases logging that never blocks or stops training.

``WandbLogger`` here is Lightning's, with three changes: it goes offline by itself when no credentials
are configured (no prompt, no network wait), it gives up quickly when a server is unreachable (falling
back to offline), and if W&B cannot start at all the run goes on without it, with one warning.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.loggers.logger import DummyExperiment
from lightning.pytorch.utilities import rank_zero_warn


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
        if offline is None:
            offline = os.environ.get("WANDB_MODE") in ("offline", "dryrun") or not wandb_credentials_present()
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
            os.environ.setdefault("WANDB_MODE", "offline")
            log_model = False  # Lightning refuses log_model with offline=True
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        super().__init__(
            name=name, save_dir=save_dir, project=project, offline=offline, log_model=log_model,
            version=version, prefix=prefix, **kwargs,
        )
        self._failed = False

    @property
    def experiment(self):
        if self._failed:
            return self._disabled_run()
        try:
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
        if self._experiment is None or not self._failed:
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
