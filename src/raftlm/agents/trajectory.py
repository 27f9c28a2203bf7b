"""A trajectory as training and the record see it: one response whose tokens are the model's
turns and the observations between them, which tokens are whose, and the turns as messages.

`Trajectory` is a `Completion` (so every sampler consumer takes it) plus the `loss_mask` the
stage's `Rollout` carries (1: the model's token, trained on; 0: an observation's, never) and
`turns`, the conversation after the prompt as chat messages (TRL's conversational
completion), each with what the record needs: a tool call's name, arguments and error kind.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raftlm.sampling.completion import Completion


@dataclass
class Trajectory(Completion):
    """A multi-turn response: `token_ids` are everything after the prompt, `loss_mask` one per
    token, `token_log_probs` the sampler's for the model's tokens and 0.0 for the observations'
    (masked), `text` the whole decoded, `finish_reason` the last model turn's."""

    loss_mask: list[int] = field(default_factory=list)
    turns: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Trajectory:
        """A journaled trajectory (`dataclasses.asdict` of one) back; Rollout's own fields
        (`policy_stage`) that a journal line may hold are left out."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in names})


def messages(trajectory: Any) -> list[dict[str, str]] | None:
    """A trajectory's turns as plain chat messages ({role, content}, and a tool's name): the
    `completions` of TRL's conversational reward functions. None for a single-turn response."""
    turns = getattr(trajectory, "turns", None)
    if not turns:
        return None
    return [{k: v for k, v in turn.items() if k in ("role", "content", "name")}
            for turn in turns]


def final_text(trajectory: Any) -> str:
    """The last model turn's text (the whole text of a single-turn response): what an answer
    check should read, so a number inside a tool's output never counts as the model's."""
    turns = getattr(trajectory, "turns", None) or []
    said = [turn["content"] for turn in turns if turn["role"] == "assistant"]
    return said[-1] if said else trajectory.text


def rollout_metrics(trajectories: Iterable[Any]) -> dict[str, float | int]:
    """The stage's `rollout/*` metrics over its trajectories (single-turn responses count as
    one turn, no calls): turns and parsed tool calls per trajectory, failed calls and steps
    (parse failures included) and parse failures in all. Empty when none is multi-turn."""
    turns = [getattr(t, "turns", None) for t in trajectories]
    if not any(turns):
        return {}
    per = [turn or [] for turn in turns]
    answers = [[m for m in t if m["role"] != "assistant"] for t in per]  # calls, steps
    return {
        "rollout/turns_mean": float(np.mean(
            [max(1, sum(m["role"] == "assistant" for m in t)) for t in per])),
        "rollout/tool_calls_mean": float(np.mean(
            [sum(m["role"] == "tool" and m.get("error") != "parse" for m in row)
             for row in answers])),
        "rollout/tool_errors": sum(m.get("error") is not None for row in answers for m in row),
        "rollout/parse_failures": sum(m.get("error") == "parse" for row in answers for m in row),
    }
