"""An environment's own reward as a reward term: the built-in `environment_return`.

A step-shaped environment (`rollout.environment` with `step(action_text) -> (observation,
reward | None, done)`) scores its trajectory as it goes; the rollout keeps each step's reward
in the trajectory's turns (the `user` turn the step answered with, under `reward`). This term
hands those back to the weighted sum like any other: `- name: environment_return`.
"""

from __future__ import annotations

from typing import Any


def environment_return(prompts: list, completions: list[str],
                       trajectories: list | None = None, **kwargs: Any) -> list[float]:
    """The sum of each trajectory's step rewards (the RL return); a step that gave None adds
    nothing, so an environment that scores only when it is done returns None before. A
    trajectory with no step (cut by `rollout.max_trajectory_tokens` before its first one) gets
    0.0. Refuses responses that no step-shaped environment scored: a single-turn response or a
    tool trajectory."""
    trajectories = trajectories if trajectories is not None else [None] * len(completions)
    return [_step_return(turns) for turns in trajectories]


def _step_return(turns: list[dict[str, Any]] | None) -> float:
    if not turns:
        raise ValueError("environment_return needs multi-turn trajectories from a step-shaped "
                         "rollout.environment; this response is single-turn")
    if any(turn["role"] == "tool" for turn in turns):
        raise ValueError("environment_return reads a step-shaped rollout.environment's rewards; "
                         "this trajectory called tools, which give none")
    steps = [turn.get("reward") for turn in turns if turn["role"] == "user"]
    return float(sum(reward for reward in steps if reward is not None))
