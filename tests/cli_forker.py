"""A fork server for CLI tests: imports ``pikv_train.cli`` once, then runs each requested command in a forked
child, so a test pays the ~6 s import of torch + Lightning + transformers once per worker instead of once per
command. Each command still gets its own process (own cwd, environment, file descriptors, exit status), as
``python -m pikv_train ARGS`` would.

Protocol (one JSON object per line): request ``{"args": [...], "env": {...}, "cwd": str, "out": str, "err": str,
"timeout": s}`` on stdin; reply ``{"rc": int}`` on stdout once the child has ended (its stdout and stderr are
in the files ``out`` and ``err``). rc is -9 when the child ran past the timeout and was killed.

Only used where a command fails during its checks or is short: the parent must hold no threads (forking
a process with OpenMP or W&B threads is unsafe), which holds because it only imports.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback


def _child(req: dict) -> None:
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    out = os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    err = os.open(req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(out, 1)
    os.dup2(err, 2)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # never read the parent's request pipe
    sys.argv = ["pikv_train", *req["args"]]
    code = 0
    try:
        from pikv_train.cli import main

        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - a traceback is what `python -m` would print
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def _wait(pid: int, timeout: float) -> int:
    end = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > end:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return -9
        time.sleep(0.005)


def serve() -> None:
    import pikv_train.cli  # noqa: F401 - the import every child would otherwise repeat

    assert threading.active_count() == 1, "the fork server must not hold threads"
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(req)
        rc = _wait(pid, req["timeout"])
        sys.stdout.write(json.dumps({"rc": rc}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    serve()
