"""One run per folder: ``out_dir/.pikv.lock`` holds the pid, host and start time of the run using it.

The launching process (rank 0 on node 0) takes the lock after the configuration has been validated and
before anything else is written, and removes it on exit (normal, error or Ctrl-C). The lock is an
``fcntl.flock`` held on that file for the whole run: the kernel releases it when the process ends, however
it ends, so "is a run using this folder" never depends on guessing from a pid. The file's content (pid, host,
start time) is only for the messages. A lock file that exists but that no process holds (its run was
killed, or a container restarted with the same pid) is stale: it is taken over with a warning. A held
lock refuses the run, naming the file and the pid holding it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import warnings
from datetime import datetime, timezone
from pathlib import Path

from pikv_train.errors import ConfigError

LOCK_NAME = ".pikv.lock"
# Set (to a rank other than 0) in the processes a launcher started for the other ranks: Lightning, torchrun
# and SLURM, and MPI launchers (Open MPI, MPICH/Intel MPI, IBM jsrun).
_RANK_VARS = ("LOCAL_RANK", "NODE_RANK", "RANK", "GROUP_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK",
              "JSM_NAMESPACE_RANK")
_held: "RunLock | None" = None


def is_launching_process() -> bool:
    """Whether this process launches the run (not a rank that Lightning, torchrun, SLURM or MPI started)."""
    return all(os.environ.get(v, "0") in ("0", "") for v in _RANK_VARS)


class RunLock:
    """The lock file of one run folder. ``acquire`` raises :class:`ConfigError` if another run holds it."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.owned = False
        self._fd: int | None = None

    def _holder(self) -> dict | None:
        """What the lock file says: {} when it is missing or empty, None when it cannot be read as a lock."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError:
            return None
        if not text.strip():
            return {}
        try:
            holder = json.loads(text)
        except ValueError:
            return None
        return holder if isinstance(holder, dict) else None

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by programs we start
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self._refuse()
            except BaseException:
                os.close(fd)
                raise
            # We hold the lock of the file we opened; the path must still name that file (a run that was
            # releasing its lock may have removed it between our open and our flock): otherwise try again.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self._fd = fd
            self._take_over_if_stale()
            me = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            self.owned = True
            return
        raise ConfigError(f"cannot take the run lock {self.path}; another run keeps taking and releasing it")

    def _refuse(self) -> None:
        holder = self._holder()
        if not holder or not isinstance(holder.get("pid"), int):  # the holder has not written itself yet
            raise ConfigError(f"out_dir {self.folder} is in use by another run starting now ({self.path}); "
                              "use another out_dir or wait for that run to finish")
        raise ConfigError(
            f"out_dir {self.folder} is in use by another run: {self.path} is held by pid {holder['pid']} on host "
            f"{holder.get('host', '?')} (started {holder.get('started', '?')}); wait for it to finish, or use "
            "another out_dir"
        )

    def _take_over_if_stale(self) -> None:
        """Called holding the lock: a lock file with content that no process held is left by a run that ended
        without removing it (killed, or its machine or container went away)."""
        holder = self._holder()
        if holder == {}:
            return  # a fresh file
        if holder is None or not isinstance(holder.get("pid"), int):
            warnings.warn(f"taking over the unreadable run lock {self.path}", stacklevel=3)
            return
        warnings.warn(f"taking over the stale run lock {self.path} (pid {holder['pid']} on {holder.get('host', '?')}, "
                      f"started {holder.get('started', '?')}, no longer holds it: that run has ended)", stacklevel=3)

    def release(self) -> None:
        if not self.owned:
            return
        self.owned = False
        fd, self._fd = self._fd, None
        try:
            # Remove the file while still holding its lock, so no other run can be holding it now; a run that
            # opened it meanwhile finds it gone once it gets the lock and takes a new file.
            if fd is not None and os.path.samestat(os.fstat(fd), os.stat(self.path)):
                self.path.unlink()
        except FileNotFoundError:
            pass
        finally:
            if fd is not None:
                os.close(fd)


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
