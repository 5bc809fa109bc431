"""One run per folder: ``out_dir/.pikv.lock`` holds the pid, host and start time of the run using it.

The launching process (rank 0 on node 0) takes the lock after the configuration has been validated and
before anything else is written, and removes it on exit (normal, error or Ctrl-C). A lock whose pid is not
alive on this host (the run was killed) is stale: it is taken over with a warning. Any other lock refuses
the run, naming the file and the pid holding it.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

from pikv_train.errors import ConfigError

LOCK_NAME = ".pikv.lock"
_RANK_VARS = ("LOCAL_RANK", "NODE_RANK", "RANK", "GROUP_RANK", "SLURM_PROCID")
_held: "RunLock | None" = None


def is_launching_process() -> bool:
    """Whether this process launches the run (not a rank that Lightning, torchrun or SLURM started)."""
    return all(os.environ.get(v, "0") in ("0", "") for v in _RANK_VARS)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


class RunLock:
    """The lock file of one run folder. ``acquire`` raises :class:`ConfigError` if another run holds it."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.owned = False

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return None

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.owned = True
            return
        raise ConfigError(f"cannot take the run lock {self.path}; another run keeps taking it")

    def _take_over_if_stale(self) -> None:
        holder = self._holder()
        if holder == {}:
            return  # removed meanwhile: try again
        if holder is None or not isinstance(holder.get("pid"), int):
            try:
                young = time.time() - self.path.stat().st_mtime < 10
            except FileNotFoundError:
                return
            if young:  # being written by a run starting right now
                raise ConfigError(f"out_dir {self.folder} is in use by another run starting now ({self.path}); "
                                  "use another out_dir or wait for that run to finish")
            warnings.warn(f"taking over the unreadable run lock {self.path}", stacklevel=2)
        else:
            pid, host = holder["pid"], holder.get("host", "?")
            if host != socket.gethostname() or _alive(pid):
                raise ConfigError(
                    f"out_dir {self.folder} is in use by another run: {self.path} is held by pid {pid} on host "
                    f"{host} (started {holder.get('started', '?')}); wait for it to finish, use another out_dir, or "
                    f"delete {self.path} if that run is gone"
                )
            warnings.warn(f"taking over the stale run lock {self.path} (pid {pid} on {host}, started "
                          f"{holder.get('started', '?')}, is no longer running)", stacklevel=2)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def release(self) -> None:
        if not self.owned:
            return
        self.owned = False
        holder = self._holder()
        if holder and holder.get("pid") == os.getpid():
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass


def take_run_lock(folder: str | Path) -> RunLock | None:
    """Take the lock of ``folder`` for this process's run (only in the launching process); see the module."""
    global _held
    if not is_launching_process():
        return None
    if _held is not None and _held.owned and _held.folder.resolve() == Path(folder).resolve():
        return _held
    release_run_lock()
    _held = RunLock(folder)
    _held.acquire()
    return _held


def release_run_lock() -> None:
    """Release the lock this process holds, if any (called when the CLI exits, however it exits)."""
    global _held
    if _held is not None:
        _held.release()
        _held = None
