"""One writer per run directory: an advisory lock on `RUN/.lock`.

`fcntl.flock` locks belong to the open file, so the kernel drops the lock when its process dies
however it dies (SIGKILL included): a stale lock file never blocks a later run. A second
`raftlm train` on a locked directory, with or without `--overwrite` or `--resume`, refuses at
once instead of deleting or interleaving with the run that holds it.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from raftlm.errors import UserError

LOCK_NAME = ".lock"


class RunInUseError(UserError, RuntimeError):
    """Another process holds the run directory's lock."""


@contextmanager
def run_lock(root: str | Path) -> Iterator[None]:
    """Hold the lock of run directory `root` (created if needed) for the duration."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunInUseError(
            f"{root} is in use by a running raftlm (pid {holder}); wait for it to finish or stop "
            "it first (one writer per run directory)"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)  # for the message above; the lock is flock's
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
