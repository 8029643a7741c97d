"""The run folder's lock: one writer at a time, and the processes that may join the holder.

The runner holds an OS lock (``flock``) on ``<run_dir>/.lock`` for its whole run; every other writer (a
stage's ``run()`` in a notebook run by hand, a stage entry point, each rank of an accelerate launch) takes
it or joins its holder: the holder's own children (the runner's stage kernels, by a token in their
environment), ranks > 0 of the holder's job, or the holder itself. The OS drops the lock when its holder
dies, even by SIGKILL, so a lock file left behind never blocks.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

from refine_af_utils.errors import RunLockedError
from refine_af_utils.layout import RunLayout
from refine_af_utils.processes import is_main_process, world_size


def _command_line() -> str:
    """This process's command line, as typed (``python -m refine_af_utils.run ...``) where /proc has it."""
    try:
        parts = [p.decode(errors="replace") for p in Path("/proc/self/cmdline").read_bytes().split(b"\0") if p]
    except OSError:
        parts = [sys.executable, *sys.argv]
    return shlex.join(parts).replace("\n", "\\n")  # one line, in the lock file and in messages


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[Path]:
    """Hold the run folder's lock (``flock`` on ``<run_dir>/.lock``) for the ``with`` block.

    Raises :class:`~refine_af_utils.errors.RunLockedError` at once, naming the holder's PID and
    command line, when another process holds it. The OS releases the lock when its holder
    exits, even by SIGKILL, so a stale lock file never blocks.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = RunLayout(run_dir).lock
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(path.read_text())
                who = f"pid {holder['pid']}: {holder['command']}"
            except (OSError, ValueError, KeyError, TypeError):
                who = "a process that is just starting"
            raise RunLockedError(f"{run_dir}: another runner is using this run ({who}); "
                                 "wait for it to finish or stop it") from None
        token = f"{os.getpid()}-{uuid.uuid4().hex}"
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps({"pid": os.getpid(), "command": _command_line(), "token": token,
                                  "job": _job_key(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
                      + "\n").encode())
        key = str(run_dir.resolve())
        previous = os.environ.get(LOCK_TOKEN_ENV)
        os.environ[LOCK_TOKEN_ENV] = f"{token} {key}"  # the processes it starts (the stage kernels) join it
        _HELD.add(key)
        try:
            yield path
        finally:
            _HELD.discard(key)
            if previous is None:
                os.environ.pop(LOCK_TOKEN_ENV, None)
            else:
                os.environ[LOCK_TOKEN_ENV] = previous
            os.ftruncate(fd, 0)  # still locked: nobody reads a stale holder
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


LOCK_TOKEN_ENV = "REFINE_AF_RUN_LOCK"  # "<token> <run_dir>": set by a lock's holder for the processes it starts
_HELD: set[str] = set()  # run folders whose lock this process holds


def _job_key() -> Optional[str]:
    """The accelerate / torchrun job this process is a rank of (its launcher's pid on this host), else None."""
    if world_size() <= 1:
        return None
    import socket

    return f"{socket.gethostname()}:{os.getppid()}"


def _lock_holder(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads(RunLayout(run_dir).lock.read_text())
    except (OSError, ValueError):
        return {}


def _joins_holder(run_dir: Path) -> bool:
    """True when this process may write under a lock another process holds for it: it was started by the
    holder (the runner's stage kernels inherit its token), or it is a rank > 0 of the holder's job."""
    key = str(run_dir.resolve())
    if key in _HELD:
        return True
    token, _, where = os.environ.get(LOCK_TOKEN_ENV, "").partition(" ")
    if token and where == key and is_locked(run_dir) and _lock_holder(run_dir).get("token") == token:
        return True
    if _job_key() is not None and not is_main_process():
        for _ in range(600):  # rank 0 takes the lock as it starts; wait for it (up to 60 s)
            if is_locked(run_dir) and _lock_holder(run_dir).get("job") == _job_key():
                return True
            time.sleep(0.1)
    return False


@contextlib.contextmanager
def hold_or_join_lock(run_dir: str | Path) -> Iterator[None]:
    """Write into ``run_dir`` only under its lock: take it, or join it where the holder started this process
    (the runner's stage kernels, a rank > 0 of an accelerate job whose rank 0 holds it, or this process
    itself); refuse in one line (:class:`RunLockedError`) while anyone else holds it."""
    run_dir = Path(run_dir)
    if _joins_holder(run_dir):
        yield
        return
    with run_lock(run_dir):
        yield


def is_locked(run_dir: str | Path) -> bool:
    """True while a runner (or a study copying into it) holds ``run_dir``'s lock; nothing is written."""
    path = RunLayout(run_dir).lock
    if not path.is_file():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock just taken
    return False
