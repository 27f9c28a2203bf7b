"""SIGINT/SIGTERM during `raftlm train`: stop safely, say how to continue.

Every file of a run is written atomically (temporary name + rename) or append-only with torn-line
detection, so stopping at any moment loses at most the work in flight. Only the writes
themselves are shielded: a signal that arrives inside `critical()` takes effect right after it
(the next safe point); anywhere else it raises `Interrupted` at once. A second signal exits
immediately (still safe: the next `--resume` drops torn lines and stray temporary files).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_state = {"requested": 0, "critical": 0, "installed": False}


class Interrupted(Exception):
    """The run was asked to stop (SIGINT or SIGTERM); `exit_code` is 128 + the signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum


def _handle(signum: int, frame: Any) -> None:
    if _state["requested"]:
        print(f"\n{signal.Signals(signum).name} again: stopping now", file=sys.stderr, flush=True)
        os._exit(128 + signum)
    _state["requested"] = signum
    print(f"\n{signal.Signals(signum).name}: stopping at the next safe point "
          "(send it again to stop at once)", file=sys.stderr, flush=True)
    if not _state["critical"]:
        raise Interrupted(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGINT/SIGTERM into `Interrupted` for the duration (the CLI wraps a run in it)."""
    previous = {s: signal.signal(s, _handle) for s in (signal.SIGINT, signal.SIGTERM)}
    _state.update(requested=0, critical=0, installed=True)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _state.update(requested=0, critical=0, installed=False)


@contextmanager
def critical() -> Iterator[None]:
    """A write that a first signal must not cut short; the signal acts when it ends."""
    _state["critical"] += 1
    try:
        yield
    finally:
        _state["critical"] -= 1
    if not _state["critical"] and _state["requested"]:
        raise Interrupted(_state["requested"])
