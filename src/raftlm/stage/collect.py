"""The one Collect primitive: bring prompts to a number of samples each, score what is new,
gather every process's rollouts.

Every collector (`collectors.py`) and the `raftlm generate | score` jobs call it. It holds the
stage's bookkeeping in one place: what this attempt sampled and scored so far (by prompt id) and
the journal of what an interrupted attempt finished, so a resumed stage reuses both.

A sample's randomness comes from (run seed, stage, prompt id, sample index) alone, so a prompt
brought from 4 to 12 samples gets the 12 it would have got at once, and N processes (or N
`generate` shards) draw the samples of one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from raftlm.agents import roll_out, scoring_environments
from raftlm.config import RaftConfig
from raftlm.config.teaching import active_hints
from raftlm.data.prompts import PromptOrder, PromptRecord, PromptSet
from raftlm.models.distributed import gather, shard
from raftlm.rewards.kinds import reward_fingerprint
from raftlm.rewards.reward import Reward, RewardResult, score
from raftlm.run.journal import StageJournal
from raftlm.sampling.completion import Completion
from raftlm.sampling.generate import GENERATION_BACKENDS, generate, sample_seeds
from raftlm.sampling.teacher import Teacher, teacher_seeds
from raftlm.stage.rollouts import (
    Rollout,
    Rollouts,
    gather_rollouts,
    nan_to_none,
    reward_rows_to_rollouts,
)


class StageRun(Protocol):
    """What Collect and the collectors use of a run (`raftlm.stage.build.Run` has it)."""

    config: RaftConfig
    tokenizer: Any
    reward: Reward
    train_prompts: PromptSet
    prompt_order: PromptOrder
    teacher: Teacher | None  # samples a share of each prompt's K (`generation.teacher`)

    def sampling_policy(self) -> AbstractContextManager[Any]: ...


class Timer:
    """`with timer("generate"):` accumulates wall time into `seconds["time/generate_s"]`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            key = f"time/{name}_s"
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start


@dataclass
class Collect:
    """`collect(prompts, counts)`: each process brings its share of `prompts` to `counts[i]`
    samples (keeping those it has) and scores the new ones; returns all processes' rollouts."""

    run: StageRun
    stage: int
    journal: StageJournal
    timer: Timer = field(default_factory=Timer)
    step: int | None = None  # the optimizer step the stage starts from (reward terms may ask)
    samples: dict[int, list[Rollout]] = field(default_factory=dict)  # this attempt's, by id
    reward_rows: dict[int, dict[str, Any]] = field(default_factory=dict)  # by prompt id
    # the environment each of this attempt's trajectories ran in, by (prompt id, sample)
    environments: dict[tuple[int, int], Any] = field(default_factory=dict)
    rounds: int = 0  # calls so far: the collector's rounds of sampling

    def __call__(self, prompts: list[PromptRecord], counts: list[int],
                 shown: list[PromptRecord] | None = None) -> Rollouts:
        """`shown[i]`, when given, is what the policy samples prompt i's new responses from
        (STaR's hinted prompt, `hints.py`); they are scored and recorded as prompt i's."""
        self.rounds += 1
        mine = shard(list(range(len(prompts))))
        local = [prompts[i] for i in mine]
        # `sample` turns a rollout's prompts into the prompts as the model saw them (tools, in
        # place): without hints those are `local`, what scoring and training then use.
        asked = local if shown is None else [shown[i] for i in mine]
        with self.timer("generate"), self.run.sampling_policy() as policy:
            responses = self.sample(policy, asked, [counts[i] for i in mine])
        with self.timer("reward"):
            rows = self.score(local, responses)
        # Every process names every term, so gather_rollouts' collectives match (a process may
        # have no prompt in a small round).
        terms = sorted({name for names in gather([sorted({n for r in rows for n in r["terms"]})])
                        for name in names})
        return gather_rollouts(reward_rows_to_rollouts(local, responses, rows, terms))

    def sample(self, policy: Any, prompts: list[PromptRecord], counts: list[int]
               ) -> list[list[Rollout]]:
        """`counts[i]` samples of prompt i: those this attempt or the journal holds are kept,
        the rest sampled (and journaled as they finish). Backends whose samples depend on more
        than (seed, index) sample only the missing ones, seeded by (run seed, stage, prompt id,
        first new index)."""
        config, journal, stage = self.run.config, self.journal, self.stage
        ids = [p.id for p in prompts]
        have = [self.samples.get(pid, []) for pid in ids]
        if config.rollout is not None:  # tools or an environment: trajectories (agents/)
            rolled = roll_out(policy, self.run.tokenizer, prompts, counts, config, stage,
                              have=have, journal=journal, timer=self.timer)
            prompts[:] = rolled.prompts  # as the model saw them (tools): what all else uses
            self.environments.update({(pid, j): env for pid, envs in zip(ids, rolled.environments)
                                      for j, env in enumerate(envs) if env is not None})
            rows = [[r if isinstance(r, Rollout) else Rollout.of(r, stage - 1)
                     for r in row] for row in rolled.rows]
            self.samples.update(zip(ids, rows))
            return rows
        if GENERATION_BACKENDS[config.generation.backend].keeps_done:
            start, seeds, wanted = [0] * len(ids), sample_seeds(config.run.seed, stage, ids), counts
            done = {(i, j): have[i][j] if j < len(have[i]) else
                    _journaled(journal.samples[(pid, j)])
                    for i, pid in enumerate(ids) for j in range(counts[i])
                    if j < len(have[i]) or (pid, j) in journal.samples}
            if self.run.teacher is not None:  # its share first: the policy samples the rest
                with self.timer("teacher"):
                    done.update(self.teach(prompts, counts, done))
        else:
            start = [len(h) for h in have]
            wanted = [max(0, n - s) for n, s in zip(counts, start)]
            seeds = [sample_seeds(config.run.seed, stage, [pid])[0] if s == 0 else
                     int(np.random.SeedSequence([config.run.seed, stage, pid, s])
                         .generate_state(1, np.uint64)[0] >> 1) for pid, s in zip(ids, start)]
            done = {}
        new = generate(
            policy, self.run.tokenizer, [p.token_ids for p in prompts], wanted, config.generation,
            seeds=seeds, desc=f"collect stage {stage}", done=done,
            on_finish=lambda i, j, c: journal.add_sample(ids[i], start[i] + j,
                                                         dataclasses.asdict(c)))
        rows = [(h[:s] + [r if isinstance(r, Rollout) else Rollout.of(r, stage - 1)
                          for r in row])[:n]
                for h, s, row, n in zip(have, start, new, counts)]
        self.samples.update(zip(ids, rows))
        return rows

    def teach(self, prompts: list[PromptRecord], counts: list[int],
              done: dict[tuple[int, int], Completion]) -> dict[tuple[int, int], Rollout]:
        """The teacher's samples of each prompt: positions K - t .. K - 1 of its row (t of K,
        `generation.teacher.share`), those in `done` kept, the rest sampled by the teacher
        (seeded by run seed, stage, prompt id, sample index) and journaled as they finish."""
        teacher, k = self.run.teacher, self.run.config.raft.samples_per_prompt
        first = k - self.run.config.generation.teacher.samples(k)
        ids = [p.id for p in prompts]

        def rollout(c: Completion) -> Rollout:
            return dataclasses.replace(Rollout.of(c), source=teacher.name, token_log_probs=None)

        rows = teacher.sample(
            self.run.config.generation, prompts, [max(0, min(n, k) - first) for n in counts],
            teacher_seeds(self.run.config.run.seed, self.stage, ids),
            {(i, j - first): c for (i, j), c in done.items() if first <= j < k},
            lambda i, j, c: self.journal.add_sample(ids[i], first + j,
                                                    dataclasses.asdict(rollout(c))))
        return {(i, first + j): rollout(c) for i, row in enumerate(rows)
                for j, c in enumerate(row)}

    def score(self, prompts: list[PromptRecord], responses: list[list[Rollout]]
              ) -> list[dict[str, Any]]:
        """Reward rows of `responses`: a prompt's responses scored before (this attempt, or an
        interrupted one per the journal) keep their rewards and only the new ones are scored,
        each chunk's rows journaled as soon as it is scored (a reward server dying mid-stage
        loses only the chunk in flight)."""
        journal = self.journal
        for p in prompts:
            known = [r for r in (self.reward_rows.get(p.id), journal.rewards.get(p.id)) if r]
            self.reward_rows[p.id] = max(known, key=lambda r: len(r["rewards"]), default=_EMPTY)
        start = [min(len(self.reward_rows[p.id]["rewards"]), len(row))
                 for p, row in zip(prompts, responses)]
        todo = [i for i, row in enumerate(responses) if start[i] < len(row)]

        def keep(first: int, last: int, part: RewardResult) -> None:
            offset = 0
            for i in todo[first:last]:
                end = offset + len(responses[i]) - start[i]
                old = _prefix(self.reward_rows[prompts[i].id], start[i])
                names = set(old["terms"]) | set(part.per_term)
                row = {"rewards": old["rewards"] + nan_to_none(part.scores[offset:end]),
                       "terms": {name: old["terms"].get(name, [None] * start[i]) + nan_to_none(
                           part.per_term[name][offset:end] if name in part.per_term
                           else np.full(end - offset, np.nan)) for name in sorted(names)}}
                self.reward_rows[prompts[i].id] = row
                journal.add_rewards(prompts[i].id, row["rewards"], row["terms"])
                offset = end
            journal.sync()

        if todo:
            records, new = [prompts[i] for i in todo], [responses[i][start[i]:] for i in todo]
            envs = None
            if self.run.reward.declares("environments"):  # the live ones, else replayed
                envs = scoring_environments(
                    self.run.config, records, new,
                    [[self.environments.get((prompts[i].id, j)) for j in
                      range(start[i], len(responses[i]))] for i in todo])
            score(self.run.reward, records, new, stage=self.stage, step=self.step,
                  on_scored=keep, tokenizer=self.run.tokenizer, environments=envs)
        return [_prefix(self.reward_rows[p.id], len(row)) for p, row in zip(prompts, responses)]

    def close(self) -> None:
        """All written: nothing more to journal, whether the stage failed or not."""
        self.journal.close()


def open_journal(folder: Path, process_index: int, config: RaftConfig,
                 prompts: list[PromptRecord], announce: Callable[[str], None] = print
                 ) -> StageJournal:
    """This process's journal of the stage in `folder`, holding what an interrupted attempt
    finished. Only the raftlm backend's samples depend on nothing but (seed, prompt, sample
    index), so only it reuses finished samples; other backends re-sample the stage. Samples
    are reused only for the very prompts (their token ids: the file's rows, the system prompt,
    the chat template) and the model they were drawn with."""
    header = {"stage": int(folder.name), "prompt_ids": [p.id for p in prompts],
              "prompts": _digest([p.token_ids for p in prompts]),
              "model": _digest([config.model.path, config.model.gguf_file, config.model.dtype,
                                dataclasses.asdict(config.model.lora)]),
              "samples_per_prompt": config.raft.samples_per_prompt,
              "generation": dataclasses.asdict(config.generation), "seed": config.run.seed,
              "scoring": reward_fingerprint(config.reward),
              **({"hints": dataclasses.asdict(hints)} if (hints := active_hints(config)) else {}),
              **({"rollout": dataclasses.asdict(config.rollout)} if config.rollout else {})}
    journal = StageJournal(folder, process_index, header,
                           reuse=GENERATION_BACKENDS[config.generation.backend].keeps_done)
    if journal.discarded and process_index == 0:
        announce(f"stage {int(folder.name)}: not reusing its earlier samples "
                 f"({journal.discarded})")
    return journal


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


_EMPTY: dict[str, Any] = {"rewards": [], "terms": {}}


def _journaled(sample: dict[str, Any]) -> Completion:
    """A journaled sample: the policy's Completion, or a teacher's Rollout (it names its
    source)."""
    return Rollout(**sample) if "source" in sample else Completion(**sample)


def _prefix(row: dict[str, Any], n: int) -> dict[str, Any]:
    return {"rewards": row["rewards"][:n], "terms": {k: v[:n] for k, v in row["terms"].items()}}
