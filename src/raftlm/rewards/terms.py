"""What a reward term is, and how one reports failure.

A term is any callable with TRL's reward-function convention,
``fn(prompts=[...], completions=[...], **columns) -> list[float]``, plain or `async def`.
The weighted sum (`reward.Reward`) asks a term about itself through optional attributes,
never through its class:

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

from typing import Any


class RewardError(RuntimeError):
    """A reward term failed; the message names the term and, where known, the item."""


class TermFailure(Exception):
    """Part of a batch failed: `scores` holds every item's value, None where it failed; the
    message (one line) says what failed, without the term's name."""

    def __init__(self, message: str, scores: list[Any]):
        super().__init__(message)
        self.scores = scores


def one_line(text: Any, limit: int = 200) -> str:
    """`text` on one line, cut to `limit` characters (for error messages)."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
