"""Multi-turn rollouts: each sample of a prompt is a trajectory of model turns and observations
(tool results or an environment's), sampled turn by turn for all trajectories at once.

Each turn calls the run's sampler (`sampling.generate`) on every unfinished trajectory, its
prompt being the prompt's ids followed by the trajectory's ids so far: the exact ids the
sampler produced and each observation's ids as appended, never a re-tokenized conversation.
The first turn samples a prompt's trajectories as one prompt's samples (one prefill, sample j
from the prompt's seed, as a single-turn stage draws it); on the raftlm backend every later turn
continues from the KV the trajectory's last turn left (`raftlm.sampling.kept_kv`), prefilling
only the observation; the other backends re-prefill the whole trajectory. Turn t >= 2 of
sample j of prompt p is seeded by (run seed, stage, p, j, t) alone, so a trajectory is the
same however trajectories are batched, and a resumed stage (its finished trajectories read
back from the journal) gives what an uninterrupted one gives, when the tools are
deterministic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from raftlm.agents.calls import CALL_CLOSE, ToolCall, forced_opening, parse_tool_calls
from raftlm.agents.chat_format import ChatFormat
from raftlm.agents.environments import (
    EnvironmentFailure,
    as_step,
    environment_tools,
    is_step_shaped,
    load_environment,
    reset,
)
from raftlm.agents.tools import Outcome, Tool, describe, load_tools, run_at_once, run_calls
from raftlm.agents.trajectory import Trajectory
from raftlm.config import ConfigError, RaftConfig
from raftlm.data.prompts import PromptRecord
from raftlm.sampling.completion import Completion
from raftlm.sampling.generate import GENERATION_BACKENDS, generate, sample_seeds
from raftlm.sampling.kept_kv import KeepKV, KVStore

Timer = Callable[[str], AbstractContextManager[Any]]  # `with timer("tools"):` (stage.collect)


@dataclass
class Live:
    """One trajectory being sampled."""

    prompt: int  # index into the call's prompts
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


@dataclass(frozen=True)
class Agent:
    """A run's tools, its environment class and its chat format, loaded and checked."""

    tools: list[Tool]  # rollout.tools
    factory: Any  # rollout.environment's class (or factory), None without one
    step_shaped: bool  # the environment takes whole turns (`step`) rather than calls
    chat: ChatFormat
    opening: str = ""  # what the first model turn starts with (rollout.tool_choice)

    @classmethod
    def of(cls, config: RaftConfig, tokenizer: Any) -> Agent:
        """Load `config.rollout`'s tools and environment and check the chat template can hold
        a trajectory: ConfigError or TemplateError in one line otherwise."""
        static = load_tools(config.rollout.tools)
        factory = (load_environment(config.rollout.environment) if config.rollout.environment
                   else None)
        probe = factory() if factory else None  # the class's shape and tools (never reset)
        step_shaped = probe is not None and is_step_shaped(probe)
        if step_shaped and static:
            raise ConfigError("rollout: a step-shaped environment takes whole turns; it cannot "
                              "be combined with rollout.tools")
        own = environment_tools(probe) if probe is not None and not step_shaped else []
        try:
            opening = forced_opening(config.rollout.tool_choice,
                                     [] if step_shaped else [t.schema for t in static + own])
        except ValueError as err:
            raise ConfigError(f"rollout.tool_choice: {err}") from None
        return cls(static, factory, step_shaped, ChatFormat(tokenizer, static + own), opening)


def check_rollout(config: RaftConfig, tokenizer: Any) -> None:
    """At the start of a run rather than at its first stage: a tool or an environment that
    does not load, or a chat template that cannot hold a trajectory, stops it in one line."""
    if config.rollout is not None:
        Agent.of(config, tokenizer)


@dataclass
class Rolled:
    """What `roll_out` gives: each prompt's trajectories, and each prompt as the model saw it
    (tools, system prompt, the environment's `reset` text): what training and the rewards
    must condition the trajectories on."""

    rows: list[list[Any]]
    prompts: list[PromptRecord]


def roll_out(policy: Any, tokenizer: Any, prompts: list[PromptRecord], counts: list[int],
             config: RaftConfig, stage: int, *, have: list[list[Any]] | None = None,
             journal: Any = None, timer: Timer | None = None, greedy: bool = False) -> Rolled:
    """`counts[i]` trajectories of prompt i: those this attempt holds (`have[i]`) or the journal
    finished (backends whose samples depend on the seed alone) are kept, the rest sampled and
    journaled (`journal.add_sample`) as each finishes. Without a journal (evaluation, chat)
    nothing is reused or journaled. `greedy`: every turn by argmax (evaluation)."""
    rollout, timer = config.rollout, timer or (lambda name: nullcontext())
    reuse = journal is not None and GENERATION_BACKENDS[config.generation.backend].keeps_done
    have = have or [[] for _ in prompts]
    agent = Agent.of(config, tokenizer)
    static, factory, step_shaped, chat = (agent.tools, agent.factory, agent.step_shaped,
                                          agent.chat)
    own = factory is not None and not step_shaped
    rows: list[list[Any]] = []
    seen: list[PromptRecord] = []
    live: list[Live] = []
    for i, record in enumerate(prompts):
        kept = [j < len(have[i]) or (reuse and (record.id, j) in journal.samples)
                for j in range(counts[i])]
        envs = [factory() if factory and not k else None for k in kept]
        text, ids = chat.prompt(record.prompt, config.data.system_prompt,
                                _reset_text(factory, envs, record))
        seen.append(dataclasses.replace(record, text=text, token_ids=ids))
        rows.append([have[i][j] if j < len(have[i]) else
                     Trajectory.from_dict(journal.samples[(record.id, j)]) if kept[j] else None
                     for j in range(counts[i])])
        live += [Live(i, j, record.id, ids, {t.name: t for t in static + (
            environment_tools(env) if own else [])}, env)
                 for j, env in enumerate(envs) if not kept[j]]
    if not live:
        return Rolled(rows, seen)
    if agent.opening:  # forced function calling: ids appended as an observation's, no loss
        opening = tokenizer(agent.opening, add_special_tokens=False)["input_ids"]
        for t in live:
            t.opening, t.ids, t.mask = agent.opening, list(opening), [0] * len(opening)
            t.log_probs = [0.0] * len(opening)
    generation = config.generation
    if not step_shaped:  # a turn with a call ends at it: the model waits for the result
        generation = dataclasses.replace(generation,
                                         stop_strings=[*generation.stop_strings, CALL_CLOSE])

    kept = KVStore()  # each trajectory's KV between its turns (backends that keep_kv)

    def finish(t: Live) -> None:
        t.finished = True
        kept.drop((t.prompt, t.sample))
        trajectory = _trajectory(t, tokenizer)
        rows[t.prompt][t.sample] = trajectory
        if journal is not None:
            journal.add_sample(t.prompt_id, t.sample, dataclasses.asdict(trajectory))

    for turn in range(rollout.max_turns):
        active = [t for t in live if not t.finished]
        if not active:
            break
        room = [rollout.max_trajectory_tokens - len(t.ids) for t in active]
        sample = _first_turns if turn == 0 else _next_turns
        sampled = sample(policy, tokenizer, active, generation, config.run.seed, stage, turn,
                         min(generation.max_new_tokens, max(room)), greedy, kept)
        last = turn == rollout.max_turns - 1
        waiting = []
        for t, completion, left in zip(active, sampled, room):
            said = _add_model_turn(t, completion, left, tokenizer)
            if len(said) >= left or (last and not step_shaped):
                finish(t)  # the token budget is spent, or no turn is left to answer a call
            else:
                waiting.append((t, said))
        cut = _cutter(rollout.max_tool_output_tokens, tokenizer)
        with timer("tools"):
            answers = (_steps(waiting, rollout.tool_timeout_s, cut) if step_shaped
                       else _tool_answers(waiting, rollout.tool_timeout_s, cut))
        for (t, said), (messages, ended) in zip(waiting, answers):
            if ended or last:
                finish(t)
                continue
            observation = chat.observation_ids(messages, said)
            if len(t.ids) + len(observation) >= rollout.max_trajectory_tokens:
                t.finish_reason = "length"  # no room for the observation and a next turn
                for record in t.turns[len(t.turns) - len(messages):]:
                    record["shown"] = False  # ran, but the model never saw it
                finish(t)
                continue
            t.ids += observation
            t.mask += [0] * len(observation)
            if t.log_probs is not None:
                t.log_probs += [0.0] * len(observation)  # masked: never read
    for t in live:
        if not t.finished:
            finish(t)
    return Rolled(rows, seen)


def _reset_text(factory: Any, envs: list[Any], record: PromptRecord) -> str | None:
    """The text `reset(**row)` appends to a prompt's user turn: one text for all its
    trajectories, since a prompt's trajectories train under one prompt (an instance of its own
    when every trajectory of the prompt is already sampled)."""
    if factory is None:
        return None
    row = {"prompt": record.prompt, **record.columns}
    texts = {reset(env, row) for env in envs if env is not None} or {reset(factory(), row)}
    if len(texts) > 1:
        raise EnvironmentFailure(
            f"rollout.environment: reset(**row) gave different texts for one row (prompt id "
            f"{record.id}); a prompt's trajectories train under one prompt, so reset's text must "
            "depend on the row alone (seed any randomness from it)")
    return texts.pop()


def _first_turns(policy: Any, tokenizer: Any, active: list[Live], generation: Any,
                 run_seed: int, stage: int, turn: int, max_new_tokens: int, greedy: bool,
                 kept: KVStore) -> list[Any]:
    """Every trajectory's first turn: a prompt's trajectories sampled as the samples of one
    prompt (one prefill), sample j from the prompt's seed as a single-turn stage draws it;
    the samples a prompt does not need (kept from before) are passed as done, not drawn."""
    prompts = list(dict.fromkeys(t.prompt for t in active))
    needed = {i: {t.sample for t in active if t.prompt == i} for i in prompts}
    first = {t.prompt: t for t in active}
    counts = [max(needed[i]) + 1 for i in prompts]
    skipped = Completion("", [], "length")  # stands for a sample nobody asks for
    rows = generate(  # a prompt's trajectories share the prefilled opening, if any
        policy, tokenizer, [first[i].prompt_ids + first[i].ids for i in prompts], counts,
        generation, seeds=sample_seeds(run_seed, stage, [first[i].prompt_id for i in prompts]),
        done={(g, j): skipped for g, i in enumerate(prompts) for j in range(counts[g])
              if j not in needed[i]},
        desc=f"collect stage {stage} turn 1", max_new_tokens=max_new_tokens, greedy=greedy,
        keep_kv=KeepKV(kept, lambda g, j: (prompts[g], j)))
    where = {i: g for g, i in enumerate(prompts)}
    return [rows[where[t.prompt]][t.sample] for t in active]


def _next_turns(policy: Any, tokenizer: Any, active: list[Live], generation: Any,
                run_seed: int, stage: int, turn: int, max_new_tokens: int, greedy: bool,
                kept: KVStore) -> list[Any]:
    """Every trajectory's next turn, each continuing its own ids: from the KV its last turn
    kept, prefilling only the observation (backends that keep_kv), else a prefill each."""
    rows = generate(
        policy, tokenizer, [t.prompt_ids + t.ids for t in active], 1, generation,
        seeds=[turn_seed(run_seed, stage, t.prompt_id, t.sample, turn) for t in active],
        desc=f"collect stage {stage} turn {turn + 1}", max_new_tokens=max_new_tokens,
        greedy=greedy, keep_kv=KeepKV(kept, lambda r, _: (active[r].prompt, active[r].sample)))
    return [row[0] for row in rows]


def turn_seed(run_seed: int, stage: int, prompt_id: int, sample: int, turn: int) -> int:
    """The sampling seed of a later turn (`turn` >= 1, counted from 0) of one trajectory: from
    (run seed, stage, prompt id, sample index, turn) alone, so neither batching nor resuming
    changes it."""
    state = np.random.SeedSequence([run_seed, stage, prompt_id, sample, turn])
    return int(state.generate_state(1, np.uint64)[0] >> 1)


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


def _tool_answers(waiting: list[tuple[Live, list[int]]], timeout_s: float,
                  cut: Callable[[str], str]) -> list[tuple[list[dict], bool]]:
    """Each waiting trajectory's tool messages (every call of its turn run, all trajectories'
    at once), or that it ended: a turn without a call is the final answer."""
    calls = [parse_tool_calls(t.turns[-1]["content"]) for t, _ in waiting]
    jobs = [(call, t.tools) for (t, _), mine in zip(waiting, calls) for call in mine]
    outcomes = iter(run_calls(jobs, timeout_s))
    answers = []
    for (t, _), mine in zip(waiting, calls):
        messages = []
        for call in mine:
            outcome = next(outcomes)
            outcome = dataclasses.replace(outcome, text=cut(outcome.text))
            record = _call_record(call, outcome)
            t.turns.append(record)
            messages.append({"role": "tool", "name": record["name"], "content": outcome.text})
        answers.append((messages, not mine))
    return answers


def _steps(waiting: list[tuple[Live, list[int]]], timeout_s: float, cut: Callable[[str], str]
           ) -> list[tuple[list[dict], bool]]:
    """Each waiting trajectory's environment observation (a user message) and whether the
    environment is done, every trajectory's step run at once; a step that raises or times
    out is an error observation."""
    finished = run_at_once([partial(t.environment.step, t.turns[-1]["content"])
                            for t, _ in waiting], timeout_s)
    answers = []
    for (t, _), (value, error) in zip(waiting, finished):
        if error is None:
            step = as_step(t.environment, value)  # another shape: the environment's bug
            record = {"role": "user", "content": cut(step.observation), "reward": step.reward,
                      "done": step.done, "error": None}
        else:
            timed_out = isinstance(error, TimeoutError)
            record = {"role": "user", "reward": None, "done": False,
                      "content": f"Error: step {'timed out' if timed_out else 'raised'}: "
                                 f"{describe(error)}",
                      "error": "timeout" if timed_out else "raised"}
        t.turns.append(record)
        answers.append(([{"role": "user", "content": record["content"]}], record["done"]))
    return answers


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
