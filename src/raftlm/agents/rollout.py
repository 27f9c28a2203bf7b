"""Multi-turn rollouts: each sample of a prompt is a trajectory of model turns and observations
(tool results or an environment's), sampled turn by turn.

A model turn's prompt is the prompt's ids followed by the trajectory's ids so far: the exact ids
the sampler produced and each observation's ids as appended, never a re-tokenized conversation.
The first turn samples a prompt's trajectories as one prompt's samples (one prefill, sample j
from the prompt's seed, as a single-turn stage draws it); on the raftlm backend every later turn
continues from the KV the trajectory's last turn left (`raftlm.sampling.kept_kv`), prefilling
only the observation; the other backends re-prefill the whole trajectory. Turn t >= 2 of
sample j of prompt p is seeded by (run seed, stage, p, j, t) alone, so a trajectory is the
same however trajectories are batched, and a resumed stage (its finished trajectories read
back from the journal) gives what an uninterrupted one gives, when the tools are
deterministic.

A trajectory's calls (or step) start in a thread of their own as soon as its turn is sampled.
On a backend that lets prompts join a running call (raftlm: `generate(more=...)`) the whole
rollout is one sampler call: a trajectory's next turn joins the running batch when its tool
answers, so other rows keep decoding while one waits. The others sample turn by turn, each
turn waiting for the slowest answer of the one before. Both give the same trajectories.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np

from raftlm.agents.calls import CALL_CLOSE, forced_opening
from raftlm.agents.chat_format import ChatFormat
from raftlm.agents.environments import (
    EnvironmentFailure,
    environment_tools,
    is_step_shaped,
    load_environment,
    replayed,
    reset,
)
from raftlm.agents.tools import Tool, load_tools
from raftlm.agents.trajectory import Trajectory
from raftlm.agents.turns import Live, Turns
from raftlm.config import ConfigError, RaftConfig
from raftlm.data.prompts import PromptRecord
from raftlm.sampling.completion import Completion
from raftlm.sampling.generate import GENERATION_BACKENDS, generate, sample_seeds
from raftlm.sampling.kept_kv import KeepKV, KVStore

Timer = Callable[[str], AbstractContextManager[Any]]  # `with timer("tools"):` (stage.collect)


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
    # per prompt and sample, the environment instance the trajectory ran in (None: kept from
    # before, or no `rollout.environment`): what a reward that declares `environments` gets
    environments: list[list[Any]]


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
    instances: list[list[Any]] = []
    for i, record in enumerate(prompts):
        kept = [j < len(have[i]) or (reuse and (record.id, j) in journal.samples)
                for j in range(counts[i])]
        envs = [factory() if factory and not k else None for k in kept]
        instances.append(envs)
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
        return Rolled(rows, seen, instances)
    if agent.opening:  # forced function calling: ids appended as an observation's, no loss
        opening = tokenizer(agent.opening, add_special_tokens=False)["input_ids"]
        for t in live:
            t.opening, t.ids, t.mask = agent.opening, list(opening), [0] * len(opening)
            t.log_probs = [0.0] * len(opening)
    generation = config.generation
    if not step_shaped:  # a turn with a call ends at it: the model waits for the result
        generation = dataclasses.replace(generation,
                                         stop_strings=[*generation.stop_strings, CALL_CLOSE])
    turns = Turns(rollout, chat, tokenizer, step_shaped, rows, journal, KVStore())
    # The tool prompt every trajectory starts with, prefilled once per sampler call.
    prefix = chat.shared_prefix(config.data.system_prompt)
    call = _first_call(live, config.run.seed, stage)
    while call is not None:
        waiting = _sample(policy, tokenizer, call, generation, greedy, turns, timer,
                          config.run.seed, stage, prefix)
        call = _next_call(waiting, config.run.seed, stage) if waiting else None
    return Rolled(rows, seen, instances)


def scoring_environments(config: RaftConfig, prompts: list[PromptRecord],
                         rows: list[list[Any]], live: list[list[Any]] | None = None
                         ) -> list[list[Any]] | None:
    """Each trajectory's environment for a reward that declares `environments`: the instance
    it ran in (`live[i][j]`, from `Rolled.environments`), else one replayed from its turns
    (`environments.replayed`); None where the run has no `rollout.environment`."""
    if config.rollout is None or not config.rollout.environment:
        return None
    factory = load_environment(config.rollout.environment)
    timeout_s = config.rollout.tool_timeout_s
    return [[(live[i][j] if live and j < len(live[i]) and live[i][j] is not None else
              replayed(factory, {"prompt": record.prompt, **record.columns},
                       getattr(trajectory, "turns", None) or [], timeout_s))
             for j, trajectory in enumerate(row)]
            for i, (record, row) in enumerate(zip(prompts, rows))]


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


@dataclass
class _Call:
    """One sampler call: its prompts (a context, a sample count and a seed each) and, per
    prompt, the trajectory each sample index is the next turn of."""

    contexts: list[list[int]]
    counts: list[int]
    seeds: list[int]
    trajectories: list[dict[int, Live]]
    done: dict[tuple[int, int], Completion]  # the samples no trajectory asks for
    desc: str


def _first_call(live: list[Live], run_seed: int, stage: int) -> _Call:
    """Every trajectory's first turn: a prompt's trajectories sampled as the samples of one
    prompt (one prefill, sharing the prefilled opening, if any), sample j from the prompt's
    seed as a single-turn stage draws it; the samples a prompt does not need (kept from
    before) are passed as done, not drawn."""
    prompts = list(dict.fromkeys(t.prompt for t in live))
    mine = {i: {t.sample: t for t in live if t.prompt == i} for i in prompts}
    first = [next(iter(mine[i].values())) for i in prompts]  # its trajectories share it
    counts = [max(mine[i]) + 1 for i in prompts]
    skipped = Completion("", [], "length")  # stands for a sample nobody asks for
    return _Call(
        contexts=[t.context() for t in first], counts=counts,
        seeds=sample_seeds(run_seed, stage, [t.prompt_id for t in first]),
        trajectories=[mine[i] for i in prompts],
        done={(g, j): skipped for g, i in enumerate(prompts) for j in range(counts[g])
              if j not in mine[i]},
        desc=f"collect stage {stage} turns")


def _next_call(waiting: list[Live], run_seed: int, stage: int) -> _Call:
    """The next turn of trajectories that waited for their answers (backends that sample
    turn by turn), each continuing its own ids."""
    return _Call(contexts=[t.context() for t in waiting], counts=[1] * len(waiting),
                 seeds=[_next_turn_seed(t, run_seed, stage) for t in waiting],
                 trajectories=[{0: t} for t in waiting], done={},
                 desc=f"collect stage {stage} turn {waiting[0].model_turns + 1}")


def _next_turn_seed(t: Live, run_seed: int, stage: int) -> int:
    return turn_seed(run_seed, stage, t.prompt_id, t.sample, t.model_turns)


def _sample(policy: Any, tokenizer: Any, call: _Call, generation: Any, greedy: bool,
            turns: Turns, timer: Timer, run_seed: int, stage: int, prefix: list[int]
            ) -> list[Live]:
    """Sample `call`'s turns; each trajectory's calls start in a thread of their own as its
    turn finishes, and its next turn joins the running call when they answer (backends that
    ask `more()`). Returns the trajectories still waiting for a turn when the call ends:
    none on such a backend, else those whose answers came (in the rollout's order)."""
    rows = list(call.trajectories)  # per prompt of the call, joining turns after the others
    answers: queue.SimpleQueue = queue.SimpleQueue()
    sampling = sum(len(row) for row in rows)  # turns handed to the sampler, not yet back
    at_tools = 0  # trajectories whose calls are running
    reported: set[tuple[int, int]] = set()

    def on_finish(i: int, j: int, completion: Completion) -> None:
        nonlocal sampling, at_tools
        reported.add((i, j))
        sampling -= 1
        t = rows[i][j]
        said = turns.add_model_turn(t, completion)
        if said is not None:
            at_tools += 1
            threading.Thread(target=_run_answer, args=(turns, t, said, answers), daemon=True,
                             name="raftlm-tools").start()

    def answered(block: bool) -> list[Live]:
        """The trajectories whose answers came (waiting for one if `block`) that go on."""
        nonlocal at_tools
        going_on = []
        while at_tools:
            try:
                t, said, ran = answers.get(block=block)
            except queue.Empty:
                break
            block = False
            at_tools -= 1
            if isinstance(ran, BaseException):
                raise ran
            if turns.answer(t, said, ran):
                going_on.append(t)
        return going_on

    def more() -> list[tuple[list[int], int, int]]:
        nonlocal sampling
        joining = answered(block=False)
        while not joining and sampling == 0 and at_tools:  # nothing decodes: wait for one
            with timer("tools"):
                joining = answered(block=True)
        rows.extend({0: t} for t in joining)
        sampling += len(joining)
        return [(t.context(), 1, _next_turn_seed(t, run_seed, stage)) for t in joining]

    # Any cap at least a row's room gives its turn: `add_model_turn` cuts it to the room.
    room = max(turns.rollout.max_trajectory_tokens - len(t.ids)
               for row in call.trajectories for t in row.values())
    sampled = generate(
        policy, tokenizer, call.contexts, call.counts, generation, seeds=call.seeds,
        done=call.done, desc=call.desc, max_new_tokens=min(generation.max_new_tokens, room),
        greedy=greedy, on_finish=on_finish, more=more,
        keep_kv=KeepKV(turns.kept, lambda i, j: (rows[i][j].prompt, rows[i][j].sample)),
        shared_prefix=prefix)
    for i, row in enumerate(call.trajectories):  # a backend that reports none as they finish
        for j in row:
            if (i, j) not in reported:
                on_finish(i, j, sampled[i][j])
    waiting = []
    with timer("tools"):
        while at_tools:
            waiting += answered(block=True)
    return sorted(waiting, key=lambda t: (t.prompt, t.sample))


def _run_answer(turns: Turns, t: Live, said: list[int], answers: queue.SimpleQueue) -> None:
    """Run one trajectory's calls (in its own thread) and hand back what they gave, or the
    error that stopped them (raised again in the sampler's thread)."""
    try:
        answers.put((t, said, turns.run(t)))
    except BaseException as err:  # handed over: a thread's error would be lost with it
        answers.put((t, said, err))


def turn_seed(run_seed: int, stage: int, prompt_id: int, sample: int, turn: int) -> int:
    """The sampling seed of a later turn (`turn` >= 1, counted from 0) of one trajectory: from
    (run seed, stage, prompt id, sample index, turn) alone, so neither batching nor resuming
    changes it."""
    state = np.random.SeedSequence([run_seed, stage, prompt_id, sample, turn])
    return int(state.generate_state(1, np.uint64)[0] >> 1)
