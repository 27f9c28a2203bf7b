"""`raftlm sample` (K responses to one prompt, with their rewards) and `raftlm chat` (an
interactive, multi-turn chat that streams its replies), on a run's policy or on a model.

Both render prompts with the chat template and system prompt of training
(`raftlm.data.prompts.render_chat`) and sample with raftlm's sampler
(`raftlm.sampling.generate`). The sampler returns whole responses, so chat streams by
decoding a few tokens per call and continuing from them (each call prefills the conversation
again: fine for chat-sized models and replies).

With tools (a tool run's `rollout` section, or `--tool`), both run the tool loop of training
(`raftlm.agents.roll_out`): the model writes, its calls run, it reads their results and
writes again, with the run's `tool_choice`; each turn is shown as it came (chat does not stream
then: a turn is shown once the loop has it).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from raftlm.agents import messages as turn_messages
from raftlm.agents import roll_out
from raftlm.config import GenerationConfig
from raftlm.data.prompts import PromptRecord, render_chat
from raftlm.errors import InvalidInput
from raftlm.rewards.reward import RewardError, build_reward, score
from raftlm.sampling.completion import stop_end
from raftlm.sampling.generate import generate, sample_seeds
from raftlm.tools.target import Target

STREAM_TOKENS = 4  # tokens decoded per sampler call while streaming a chat reply
EXIT_COMMANDS = {"/exit", "/quit"}
RESET_COMMANDS = {"/reset", "/clear"}
HELP = """\
Commands (never sent to the model):
  /help           this list
  /reset, /clear  forget the conversation and start a new one
  /exit, /quit    quit (Ctrl-D too)
"""


@dataclass
class SampleResult:
    text: str
    finish_reason: str
    reward: float | None  # None: no reward configured, or it could not score this prompt
    turns: list[dict] | None = None  # with tools: the trajectory's turns (calls, results)


def sample_responses(target: Target, prompt: str, n: int, generation: GenerationConfig,
                     columns: dict[str, Any] | None = None, seed: int = 0,
                     ) -> tuple[list[SampleResult], str | None]:
    """`n` responses to `prompt`; rewards when `target` is a run (its configured reward).

    Returns the results and, when the reward could not be computed, why (e.g. a column it
    needs, such as `answer`, was not given).
    """
    record = PromptRecord(0, prompt, "", [], dict(columns or {}))
    if target.config.rollout is not None:  # the tool loop, first turns seeded as below
        config = dataclasses.replace(target.config, generation=generation,
                                     run=dataclasses.replace(target.config.run, seed=seed))
        rolled = roll_out(target.model, target.tokenizer, [record], [n], config, 0)
        record, completions = rolled.prompts[0], rolled.rows[0]
    else:
        text, ids = render_chat(prompt, target.tokenizer, target.config.data.system_prompt)
        record = dataclasses.replace(record, text=text, token_ids=ids)
        completions = generate(target.model, target.tokenizer, [ids], n, generation,
                               seeds=sample_seeds(seed, 0, [0]), desc="sample")[0]
    rewards: list[float | None] = [None] * n
    problem = None
    if target.run_dir is not None:
        try:
            scores = score(build_reward(target.config.reward), [record], [completions]).scores
            rewards = [None if np.isnan(s) else float(s) for s in scores]
        except (RewardError, TypeError, ValueError) as err:
            problem = f"{err} (pass the columns the reward needs with --column KEY=VALUE)"
    results = [SampleResult(c.text, c.finish_reason, r, getattr(c, "turns", None))
               for c, r in zip(completions, rewards)]
    return results, problem


def tool_reply(target: Target, messages: list[dict], generation: GenerationConfig,
               write: Callable[[str], Any], seed: int = 0) -> list[dict]:
    """The model's turns after `messages` through the tool loop (calls run, results read),
    each written as it came; returns them as chat messages."""
    config = dataclasses.replace(target.config, generation=generation,
                                 run=dataclasses.replace(target.config.run, seed=seed))
    record = PromptRecord(0, [dict(m) for m in messages], "", [], {})
    (trajectory,) = roll_out(target.model, target.tokenizer, [record], [1], config,
                             len(messages)).rows[0]
    for turn in trajectory.turns:
        write(format_turn(turn))
    return turn_messages(trajectory) or []


def format_turn(turn: dict) -> str:
    """One turn of a trajectory as a line of the terminal: the model's text, or a tool's
    result (`[calculator] 408`) or error, or an environment's observation."""
    if turn["role"] == "assistant":
        return f"assistant> {turn['content']}\n"
    name = turn.get("name") or "environment"
    return f"  [{name}] {turn['content']}\n"


def stream_reply(target: Target, messages: list[dict], generation: GenerationConfig,
                 write: Callable[[str], Any], seed: int = 0) -> str:
    """Sample the assistant's reply to `messages`, writing its text as it is decoded."""
    tokenizer = target.tokenizer
    _, prompt_ids = render_chat(messages, tokenizer, target.config.data.system_prompt)
    chunk = dataclasses.replace(generation, stop_strings=[])  # stops are checked on the whole
    reply_ids: list[int] = []
    shown = ""
    for call in range(-(-generation.max_new_tokens // STREAM_TOKENS)):
        room = min(STREAM_TOKENS, generation.max_new_tokens - len(reply_ids))
        (completion,) = generate(
            target.model, tokenizer, [prompt_ids + reply_ids], 1, chunk,
            seeds=sample_seeds(seed, call, [len(messages)]), max_new_tokens=room, desc="reply",
        )[0]
        reply_ids += completion.token_ids
        text = tokenizer.decode(reply_ids, skip_special_tokens=True)
        end = stop_end(text, generation.stop_strings) if generation.stop_strings else None
        text = text if end is None else text[:end]
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            write(text[len(shown):])
            shown = text
        if completion.finish_reason != "length" or end is not None:
            break
    if shown != text:
        write(text[len(shown):])
    return text


def chat(target: Target, generation: GenerationConfig, read_line: Callable[[str], str] = input,
         write: Callable[[str], Any] | None = None) -> list[dict]:
    """An interactive chat until /exit or end of input (Ctrl-D); returns the conversation."""
    if not getattr(target.tokenizer, "chat_template", None):
        raise InvalidInput("chat needs a tokenizer with a chat template; use `raftlm sample`")
    write = write or _write_stdout
    messages: list[dict] = []
    write("Chat with the model: /help for commands, /exit or Ctrl-D to quit.\n")
    while True:
        try:
            line = read_line("you> ")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt
            write("\n")
            break
        command = line.strip()
        if command in EXIT_COMMANDS:
            break
        if not command:
            continue
        if command == "/help":
            write(HELP)
            continue
        if command in RESET_COMMANDS:
            messages = []
            write("(conversation forgotten; a new one starts)\n")
            continue
        if command.startswith("/") and " " not in command:
            write(f"unknown command {command}; /help lists them\n")
            continue
        messages.append({"role": "user", "content": line})
        if target.config.rollout is not None:
            messages += tool_reply(target, messages, generation, write, seed=len(messages))
            continue
        write("assistant> ")
        reply = stream_reply(target, messages, generation, write, seed=len(messages))
        write("\n")
        messages.append({"role": "assistant", "content": reply})
    return messages


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
