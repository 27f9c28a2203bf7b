"""Verifiable rewards: 1.0 when a response's answer matches the prompt's reference `answer`."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

from raftlm.rewards.environment import environment_return

# A number: "1,234.5" (thousands groups) or "-12.5"; never the "-" of "10-5".
# A number as answers write it: thousands separators, a sign, decimals (the evaluation's
# answer rules read numbers by the same pattern).
NUMBER = r"(?<![\d.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUMBER = re.compile(NUMBER)


def _to_decimal(text: str) -> Decimal | None:
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    try:
        return Decimal(matches[-1].replace(",", ""))
    except InvalidOperation:
        return None


def numeric_answer(prompts: list, completions: list[str], answer: list,
                   trajectories: list | None = None, **kwargs) -> list[float]:
    """1.0 where the last number in the completion equals the reference answer, else 0.0.

    The last number, because small chat models restate the question ("17 + 25 = 42"). A
    multi-turn trajectory's answer is its last model turn: a number in a tool's output is not
    the model's answer.
    """
    if trajectories is not None:
        completions = [_last_model_turn(turns, text)
                       for turns, text in zip(trajectories, completions, strict=True)]
    scores = []
    for completion, reference in zip(completions, answer, strict=True):
        expected = _to_decimal(str(reference))
        if expected is None:
            raise ValueError(f"reference answer {reference!r} is not a number")
        got = _to_decimal(completion)
        scores.append(1.0 if got is not None and got == expected else 0.0)
    return scores


def _last_model_turn(turns: list[dict] | None, text: str) -> str:
    said = [turn["content"] for turn in turns or [] if turn["role"] == "assistant"]
    return said[-1] if said else text


def math_answer(prompts: list, completions: list[str], answer: list,
                trajectories: list | None = None, **kwargs) -> list[float]:
    """1.0 where math_verify finds the completion's answer equivalent to the reference (a
    trajectory's: its last model turn's, as `numeric_answer`)."""
    from math_verify import parse, verify  # optional dependency (raftlm[math])

    if trajectories is not None:
        completions = [_last_model_turn(turns, text)
                       for turns, text in zip(trajectories, completions, strict=True)]
    # math_verify's timeouts use SIGALRM, which only the main thread may set.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    scores = []
    for completion, reference in zip(completions, answer, strict=True):
        gold = parse(str(reference), parsing_timeout=timeout)
        pred = parse(completion, parsing_timeout=timeout)
        scores.append(1.0 if gold and pred and verify(gold, pred, timeout_seconds=timeout) else 0.0)
    return scores


BUILTIN_REWARDS: dict[str, Callable[..., list[float]]] = {
    "numeric_answer": numeric_answer,
    "math_answer": math_answer,
    "environment_return": environment_return,  # a step-shaped environment's own rewards
}
