"""What a reward term is, and how one reports failure.

A term is any callable with TRL's reward-function convention,
``fn(prompts=[...], completions=[...], **columns) -> list[float]``, plain or `async def`.
`async def` terms (servers, judges) run concurrently in a `BackgroundLoop`. The weighted sum
(`reward.Reward`) asks a term about itself through optional attributes, never its class:

- ``blame_items`` (default True): after a failed batch call, call the term item by item to
  find the candidates to blame and keep the others. Terms whose failure is an outage (a
  server: each item call would time out again) set it False.
- ``models()``: what an offload manager moves between devices (objects with ``.to(device)``).
- ``columns_needed``: the columns it cannot do without, when its signature does not say.
- ``chunk_size``: how many candidates it scores at once (its in-flight window); a caller
  that records results as they come (`score(..., on_scored=)`) scores in chunks of that size.

A term that scored part of a batch raises `TermFailure` with what it did score.
"""

from __future__ import annotations

import asyncio
import math
import numbers
import os
import threading
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raftlm.errors import UserError


@dataclass(frozen=True)
class ErrorPolicy:
    """What `reward.on_error` does with a failure a candidate is to blame for."""

    stops_run: bool  # raise a RewardError naming it; else the candidate gets NaN, counted


# `reward.on_error`'s choices (the config lists these names).
ERROR_POLICIES: dict[str, ErrorPolicy] = {
    "raise": ErrorPolicy(stops_run=True),
    "skip": ErrorPolicy(stops_run=False),
}


class RewardError(UserError, RuntimeError):
    """A reward term failed; the message names the term and, where known, the item."""


class TermFailure(Exception):
    """Part of a batch failed: `scores` holds every item's value, None where it failed; the
    message (one line) says what failed, without the term's name."""

    def __init__(self, message: str, scores: list[Any]):
        super().__init__(message)
        self.scores = scores


class WrongCount(Exception):
    """A term (or its server) gave another number of scores than completions: no single
    candidate is to blame, so the run stops whatever `on_error` says."""


def raised_where(err: BaseException, fn: Callable) -> str:
    """`file:line in function` where `err` was raised in `fn`'s own file (else its deepest
    frame), so a one-line error still points at the user's code; '' without a traceback."""
    frames = traceback.extract_tb(err.__traceback__)
    code = getattr(fn, "__code__", None) or getattr(type(fn).__call__, "__code__", None)
    own = [f for f in frames if code is not None and f.filename == code.co_filename]
    if not (own or frames):
        return ""
    frame = (own or frames)[-1]
    path = Path(frame.filename)
    try:
        path = path.relative_to(Path.cwd())
    except ValueError:
        pass
    return f"{os.fspath(path)}:{frame.lineno} in {frame.name}"


def one_line(text: Any, limit: int = 200) -> str:
    """`text` on one line, cut to `limit` characters (for error messages)."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class BackgroundLoop:
    """Runs one coroutine in its own thread and event loop while the caller works, so that
    I/O-bound terms overlap the CPU-bound ones (which stay in the calling thread)."""

    def __init__(self, coroutine: Awaitable[Any]):
        self._coroutine = coroutine
        self._ready = threading.Event()
        self._outcome: tuple[bool, Any] = (False, None)
        self._thread = threading.Thread(target=self._run, name="raftlm-reward", daemon=True)
        self._thread.start()
        self._ready.wait()

    def _run(self) -> None:
        async def main() -> Any:
            self._loop, self._task = asyncio.get_running_loop(), asyncio.current_task()
            self._ready.set()
            return await self._coroutine

        try:
            self._outcome = (True, asyncio.run(main()))
        except BaseException as err:  # handed to the caller's thread by result()
            self._outcome = (False, err)
        finally:
            self._ready.set()

    def cancel(self) -> None:
        """Stop early (another term failed); waits until the coroutine has cleaned up."""
        try:
            self._loop.call_soon_threadsafe(self._task.cancel)
        except (AttributeError, RuntimeError):  # never started, or already finished
            pass
        self._thread.join()

    def result(self) -> Any:
        self._thread.join()
        ok, value = self._outcome
        if not ok:
            raise value
        return value


def as_list(output: Any) -> list | None:
    """A term's output as a list (numpy arrays and torch tensors too); None if it is none."""
    if hasattr(output, "tolist") and not isinstance(output, (str, bytes)):
        output = output.tolist()  # numpy arrays and torch tensors
    if isinstance(output, (list, tuple)):
        return list(output)
    return None


def invalid(value: Any) -> str | None:
    """Why a score is unusable, or None when it is a finite number."""
    if not isinstance(value, numbers.Real):
        return f"a non-number ({type(value).__name__}: {value!r:.40})"
    if not math.isfinite(float(value)):
        return str(float(value))
    return None
