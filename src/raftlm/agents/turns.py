"""One trajectory between its model turns: the sampled turn appended (cut to the trajectory's
token budget), its tool calls or environment step run, their answers recorded and the
observation appended — or the trajectory finished and journaled.

Running the calls (`Turns.run`) touches nothing shared, so it may run in a thread of its own
while the sampler decodes other trajectories (`rollout.py`); everything else, the tokenizer
included, runs in the caller's thread.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from raftlm.agents.calls import ToolCall, parse_tool_calls
from raftlm.agents.chat_format import ChatFormat
from raftlm.agents.environments import as_step
from raftlm.agents.tools import Outcome, Tool, describe, run_at_once, run_calls
from raftlm.agents.trajectory import Trajectory
from raftlm.config.sections import RolloutConfig
from raftlm.sampling.kept_kv import KVStore


@dataclass
class Live:
    """One trajectory being sampled."""

    prompt: int  # index into the rollout's prompts
    sample: int
    prompt_id: int
    prompt_ids: list[int]
    tools: dict[str, Tool]
    environment: Any = None
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    log_probs: list[float] | None = field(default_factory=list)
    turns: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str = "length"
    finished: bool = False
    opening: str = ""  # prefilled text the next model turn starts with (rollout.tool_choice)
    model_turns: int = 0  # sampled so far: the index of the next one

    def context(self) -> list[int]:
        """What the next model turn continues: the prompt and the trajectory so far."""
        return self.prompt_ids + self.ids


# What running a turn's calls gave (`Turns.run`): (call, Outcome) per tool call, or the step's
# (value, error) for a step-shaped environment.
Ran = list[Any]


@dataclass
class Turns:
    """A rollout's per-trajectory steps, sharing its settings, its rows and its KV store."""

    rollout: RolloutConfig
    chat: ChatFormat
    tokenizer: Any
    step_shaped: bool
    rows: list[list[Any]]  # per prompt, its trajectories (set as each finishes)
    journal: Any  # None: nothing journaled (evaluation, chat)
    kept: KVStore  # each trajectory's KV between its turns

    def finish(self, t: Live) -> None:
        t.finished = True
        self.kept.drop((t.prompt, t.sample))
        trajectory = _trajectory(t, self.tokenizer)
        self.rows[t.prompt][t.sample] = trajectory
        if self.journal is not None:
            self.journal.add_sample(t.prompt_id, t.sample, dataclasses.asdict(trajectory))

    def add_model_turn(self, t: Live, completion: Any) -> list[int] | None:
        """Append a sampled turn; its ids when it waits for an answer, None when it finished
        the trajectory (the token budget is spent, or no turn is left to answer a call)."""
        room = self.rollout.max_trajectory_tokens - len(t.ids)
        said = _add_model_turn(t, completion, room, self.tokenizer)
        t.model_turns += 1
        if len(said) >= room or (self.last(t) and not self.step_shaped):
            self.finish(t)
            return None
        return said

    def last(self, t: Live) -> bool:
        return t.model_turns >= self.rollout.max_turns

    def run(self, t: Live) -> Ran:
        """Run the trajectory's calls of its last turn, all at once (or its step), each under
        `rollout.tool_timeout_s`; touches nothing shared, so it may run in a thread of its
        own."""
        content, timeout_s = t.turns[-1]["content"], self.rollout.tool_timeout_s
        if self.step_shaped:
            return run_at_once([partial(t.environment.step, content)], timeout_s)
        calls = parse_tool_calls(content)
        return list(zip(calls, run_calls([(call, t.tools) for call in calls], timeout_s)))

    def answer(self, t: Live, said: list[int], ran: Ran) -> bool:
        """Record what `run` gave and append the observation; True when the trajectory takes
        another model turn, else it is finished."""
        messages, ended = (self._step(t, ran[0]) if self.step_shaped
                           else self._tool_messages(t, ran))
        if ended or self.last(t):
            self.finish(t)
            return False
        observation = self.chat.observation_ids(messages, said)
        if len(t.ids) + len(observation) >= self.rollout.max_trajectory_tokens:
            t.finish_reason = "length"  # no room for the observation and a next turn
            for record in t.turns[len(t.turns) - len(messages):]:
                record["shown"] = False  # ran, but the model never saw it
            self.finish(t)
            return False
        t.ids += observation
        t.mask += [0] * len(observation)
        if t.log_probs is not None:
            t.log_probs += [0.0] * len(observation)  # masked: never read
        return True

    def _tool_messages(self, t: Live, ran: Ran) -> tuple[list[dict], bool]:
        """The turn's tool messages; it ended the trajectory when it made no call (a turn
        without a call is the final answer)."""
        cut = _cutter(self.rollout.max_tool_output_tokens, self.tokenizer)
        messages = []
        for call, outcome in ran:
            record = _call_record(call, dataclasses.replace(outcome, text=cut(outcome.text)))
            t.turns.append(record)
            messages.append({"role": "tool", "name": record["name"], "content": record["content"]})
        return messages, not ran

    def _step(self, t: Live, ran: tuple[Any, BaseException | None]) -> tuple[list[dict], bool]:
        """The environment's observation (a user message) and whether it is done; a step that
        raised or timed out is an error observation."""
        value, error = ran
        if error is None:
            step = as_step(t.environment, value)  # another shape: the environment's bug
            cut = _cutter(self.rollout.max_tool_output_tokens, self.tokenizer)
            record = {"role": "user", "content": cut(step.observation), "reward": step.reward,
                      "done": step.done, "error": None}
        else:
            timed_out = isinstance(error, TimeoutError)
            record = {"role": "user", "reward": None, "done": False,
                      "content": f"Error: step {'timed out' if timed_out else 'raised'}: "
                                 f"{describe(error)}",
                      "error": "timeout" if timed_out else "raised"}
        t.turns.append(record)
        return [{"role": "user", "content": record["content"]}], record["done"]


def _add_model_turn(t: Live, completion: Any, room: int, tokenizer: Any) -> list[int]:
    """Append a sampled turn (cut to the trajectory's token budget); its ids."""
    ids, log_probs = list(completion.token_ids), completion.token_log_probs
    text, reason = completion.text, completion.finish_reason
    if len(ids) > room:  # the sampler's first `room` tokens: what a call capped there gives
        ids, reason = ids[:room], "length"
        log_probs = None if log_probs is None else log_probs[:room]
        text = tokenizer.decode(ids, skip_special_tokens=True)
    t.ids += ids
    t.mask += [1] * len(ids)
    t.log_probs = None if log_probs is None or t.log_probs is None else t.log_probs + log_probs
    turn = {"role": "assistant", "content": t.opening + text, "finish_reason": reason}
    if t.opening:  # the turn's call reads whole; which part was not the model's choice
        turn["prefilled"], t.opening = t.opening, ""
    t.turns.append(turn)
    t.finish_reason = reason
    return ids


def _call_record(call: ToolCall, outcome: Outcome) -> dict[str, Any]:
    return {"role": "tool", "name": call.name, "arguments": call.arguments,
            "content": outcome.text, "error": outcome.error}


def _cutter(max_tokens: int, tokenizer: Any) -> Callable[[str], str]:
    """Cuts an observation's text to `max_tokens` tokens (`max_tool_output_tokens`)."""
    def cut(text: str) -> str:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])
    return cut


def _trajectory(t: Live, tokenizer: Any) -> Trajectory:
    return Trajectory(text=tokenizer.decode(t.ids, skip_special_tokens=True),
                      token_ids=list(t.ids), finish_reason=t.finish_reason,
                      token_log_probs=t.log_probs, loss_mask=list(t.mask), turns=t.turns)
