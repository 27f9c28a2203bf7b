"""Environments (`rollout.environment: file.py:Class`), one instance per trajectory, in either
of two shapes:

- TRL's `environment_factory` shape: `reset(**row) -> str | None` (text appended to the first
  user turn, or nothing) and public methods that are the tools (typed, with a docstring);
- the step shape of OpenRLHF and SkyRL-gym: `reset(**row)` the same, and
  `step(action_text) -> (observation, reward | None, done)` called with each model turn.

The class is called with no arguments (TRL's factory); `row` is the prompt row: `prompt` and
every other column of the prompt file.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from raftlm.agents.tools import Tool, run_at_once, tool_of
from raftlm.config import ConfigError
from raftlm.config.registry import load_object
from raftlm.errors import UserError

_NOT_TOOLS = {"reset", "step"}


class EnvironmentFailure(UserError, RuntimeError):
    """An environment broke its contract (reset raised, step returned the wrong shape)."""


@dataclass(frozen=True)
class Step:
    """What `step` gave for one model turn."""

    observation: str
    reward: float | None
    done: bool


def load_environment(spec: str) -> Callable[[], Any]:
    """`rollout.environment`: the class (or factory) `pkg.mod:Class` / `file.py:Class` names."""
    factory = load_object(spec, "rollout.environment")
    if not callable(factory):
        raise ConfigError(f"rollout.environment {spec!r}: not a class or factory")
    return factory


def is_step_shaped(instance: Any) -> bool:
    """Whether an environment takes whole model turns (`step`) rather than tool calls."""
    return callable(getattr(instance, "step", None))


def environment_tools(instance: Any) -> list[Tool]:
    """The tools of a TRL-shaped environment: its public methods (bound to `instance`), but
    `reset`."""
    methods = inspect.getmembers(type(instance), inspect.isfunction)
    return [tool_of(getattr(instance, name), f"rollout.environment {type(instance).__name__}")
            for name, _ in methods if not name.startswith("_") and name not in _NOT_TOOLS]


def reset(instance: Any, row: dict[str, Any]) -> str | None:
    """`instance.reset(**row)` when it has one: the text to append to the first user turn."""
    if not callable(getattr(instance, "reset", None)):
        return None
    try:
        text = instance.reset(**row)
    except Exception as err:
        raise EnvironmentFailure(f"rollout.environment {type(instance).__name__}.reset raised "
                                f"{type(err).__name__}: {err}") from err
    if text is not None and not isinstance(text, str):
        raise EnvironmentFailure(f"rollout.environment {type(instance).__name__}.reset returned "
                                f"{type(text).__name__}; expected text or None")
    return text


def as_step(instance: Any, value: Any) -> Step:
    """A `step` return value as a Step; EnvironmentFailure when it has another shape."""
    if not (isinstance(value, tuple) and len(value) == 3):
        raise EnvironmentFailure(f"rollout.environment {type(instance).__name__}.step returned "
                                f"{value!r:.80}; expected (observation, reward | None, done)")
    observation, reward, done = value
    return Step("" if observation is None else str(observation),
                None if reward is None else float(reward), bool(done))


def replayed(factory: Callable[[], Any], row: dict[str, Any], turns: list[dict[str, Any]],
             timeout_s: float) -> Any:
    """A fresh instance brought to where a trajectory left its own: `reset(**row)`, then every
    call of the environment's tools (or every `step`) the trajectory ran, in order, with the
    same arguments. For a reward that declares `environments` when the live instance is gone
    (a resumed stage, `raftlm score`, evaluation); the same state when the environment is
    deterministic. Calls that never ran (unparsed, unknown tool, bad arguments) are not
    replayed; one that raised or timed out is, since it did run; what a replayed call gives
    or raises is ignored."""
    instance = factory()
    reset(instance, row)
    if is_step_shaped(instance):
        said = [turn["content"] for turn in turns if turn["role"] == "assistant"]
        steps = [turn for turn in turns if turn["role"] == "user"]  # one per step that ran
        calls = [partial(instance.step, text) for text, _ in zip(said, steps)]
    else:
        own = {tool.name: tool.fn for tool in environment_tools(instance)}
        calls = [partial(own[turn["name"]], **turn["arguments"]) for turn in turns
                 if turn["role"] == "tool" and turn.get("error") in (None, "raised", "timeout")
                 and turn.get("name") in own]
    for call in calls:
        run_at_once([call], timeout_s)
    return instance
