"""How a stage spends its samples (`raft.sampling`, docs/sampling.md): the Collect step's modes.

- `fixed` (the default, the paper's Algorithm 1): b prompts x K samples, `steps.collect`.
- `dynamic` (DAPO's dynamic sampling): sample K for each of the b drawn prompts; while fewer
  than b carry a learning signal (`useful_prompts`), draw as many more prompts as are missing,
  in the run's seeded order, and sample those, for at most `raft.max_sampling_rounds` rounds.
  The prompts set aside count as used (the order moved past them) and stay in the stage's
  candidates, where they select nothing: every sample drawn is recorded and counted.
- `gvm` (GVM-RAFT, Yao et al. NeurIPS 2025): `raft.gvm_first_samples` samples per prompt, then
  the stage's budget is shared out by GVM's rule (`raftlm.core_sampling`) from each prompt's
  acceptance rate and gradient norm; the second round extends the first (sample indices go on).

Each mode is called with the stage's first b prompts and its journal, and returns every prompt
it sampled (in draw order) with `sampling/*` statistics. A sample's randomness comes from (run
seed, stage, prompt id, sample index) alone, and every decision (which prompts are useful, how
many samples each gets) is taken from the candidates of all processes, so all processes take
the same one whatever their number. The journal holds samples and rewards by prompt id, and
the prompt order is restored from the last checkpoint, so a resumed stage replays the same
rounds, reusing what the interrupted attempt finished.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

import numpy as np

from raftlm.config import RaftConfig
from raftlm.core_sampling import gvm_allocation, has_reward_spread, logit_gradient_norm
from raftlm.data.prompts import PromptOrder, PromptRecord, PromptSet
from raftlm.models.distributed import gather, shard
from raftlm.rewards.reward import Reward, RewardResult, score
from raftlm.rewards.selection import Selection, select
from raftlm.run.journal import StageJournal
from raftlm.sampling.completion import Completion
from raftlm.sampling.generate import GENERATION_BACKENDS, generate, sample_seeds
from raftlm.steps import Candidates, Timer, collect, gather_candidates
from raftlm.training.objectives import OBJECTIVES, shaped_rewards


class StageRun(Protocol):
    """What a sampling mode uses of a run (`raftlm.build.Run` has it)."""

    config: RaftConfig
    tokenizer: Any
    reward: Reward
    train_prompts: PromptSet
    prompt_order: PromptOrder

    def sampling_policy(self) -> AbstractContextManager[Any]: ...


# (run, the stage's first b prompts, its journal, stage, timer) -> every prompt it sampled
SamplingMode = Callable[[StageRun, list[PromptRecord], StageJournal, int, Timer], Candidates]


def fixed(run: StageRun, prompts: list[PromptRecord], journal: StageJournal, stage: int,
          timer: Timer) -> Candidates:
    """K samples for each of the b prompts (`steps.collect`, unchanged)."""
    candidates = collect(run.sampling_policy, run.tokenizer, run.reward, prompts, run.config,
                         stage, journal, timer)
    candidates.sampling = sampling_stats(candidates, run.config, rounds=1)
    return candidates


def dynamic(run: StageRun, prompts: list[PromptRecord], journal: StageJournal, stage: int,
            timer: Timer) -> Candidates:
    """Rounds of K samples per prompt until b drawn prompts are useful or the rounds run out."""
    config, pool = run.config, _Pool()
    b, k = config.raft.prompts_per_stage, config.raft.samples_per_prompt
    parts, useful, rounds, seen = [], 0, 0, {p.id for p in prompts}
    try:
        while prompts:
            rounds += 1
            part = sample_round(run, prompts, [k] * len(prompts), stage, journal, timer, pool)
            parts.append(part)
            useful += int(useful_prompts(part, config).sum())
            if useful >= b or rounds == config.raft.max_sampling_rounds:
                break
            prompts = _draw_unseen(run, b - useful, seen)
    finally:
        journal.close()
    candidates = _concatenate(parts)
    candidates.sampling = sampling_stats(candidates, config, rounds)
    return candidates


def gvm(run: StageRun, prompts: list[PromptRecord], journal: StageJournal, stage: int,
        timer: Timer) -> Candidates:
    """A first round of n0 samples per prompt, then GVM's allocation of the stage's budget."""
    config, pool = run.config, _Pool()
    first = config.raft.gvm_first_samples
    try:
        candidates = sample_round(run, prompts, [first] * len(prompts), stage, journal, timer,
                                  pool)
        counts = gvm_counts(candidates, config)
        rounds = 1
        if any(n > first for n in counts):
            candidates = sample_round(run, prompts, counts, stage, journal, timer, pool)
            rounds = 2
    finally:
        journal.close()
    candidates.sampling = sampling_stats(candidates, config, rounds)
    return candidates


SAMPLING_MODES: dict[str, SamplingMode] = {"fixed": fixed, "dynamic": dynamic, "gvm": gvm}


# --------------------------------------------------------------------------- decisions


def ranked_view(candidates: Candidates, config: RaftConfig) -> tuple[np.ndarray, Selection]:
    """The rewards the Rank step sees (with DAPO's overlong shaping, if set) and the selection
    of each prompt's row on its own (strategy best_per_prompt: the filters and min_reward
    decide whether anything of a prompt can be kept, whatever the strategy)."""
    lengths = candidates.table(lambda r: len(r.token_ids))
    rewards = shaped_rewards(candidates.rewards, lengths, config.training,
                             config.generation.max_new_tokens)
    selection = select(
        rewards, [[r.text for r in row] for row in candidates.responses], lengths,
        dataclasses.replace(config.selection, strategy="best_per_prompt"),
        candidates.table(lambda r: r.finish_reason == "length", False))
    return rewards, selection


def useful_prompts(candidates: Candidates, config: RaftConfig) -> np.ndarray:
    """bool [P]: the prompts that carry a learning signal for the configured objective — for
    the RAFT family at least one response passes selection (filters, min_reward); for group
    objectives (grpo, reinforce_rej) eligible rewards that are not all equal."""
    rewards, selection = ranked_view(candidates, config)
    if OBJECTIVES[config.training.objective].trains_on_all_samples:
        return has_reward_spread(np.where(selection.eligible, rewards, np.nan))
    return selection.mask.any(axis=1)


def gvm_counts(candidates: Candidates, config: RaftConfig) -> list[int]:
    """Each prompt's sample count from its first-round candidates (all processes'), by GVM's
    rule: a response is accepted when eligible with a reward of at least `raft.gvm_accept_reward`
    (default `selection.min_reward`)."""
    raft = config.raft
    rewards, selection = ranked_view(candidates, config)
    threshold = raft.gvm_accept_reward if raft.gvm_accept_reward is not None else (
        config.selection.min_reward)
    accepted = selection.eligible & (np.nan_to_num(rewards, nan=-np.inf) >= threshold)
    if raft.gvm_grad_norm == "logits":
        norms = candidates.table(lambda r: 1.0 if r.token_log_probs is None
                                 else logit_gradient_norm(r.token_log_probs), 0.0)
    else:
        norms = np.ones(rewards.shape)
    budget = raft.gvm_budget or raft.prompts_per_stage * raft.samples_per_prompt
    counts = gvm_allocation(accepted, norms, [len(r) for r in candidates.responses], budget,
                            raft.gvm_first_samples, raft.gvm_max_samples, raft.gvm_alpha,
                            raft.gvm_beta)
    return [int(n) for n in counts]


def sampling_stats(candidates: Candidates, config: RaftConfig, rounds: int) -> dict[str, Any]:
    """The stage's `sampling/*` numbers: prompts drawn and useful, samples, rounds, and the
    spread of samples per prompt."""
    counts = np.array([len(r) for r in candidates.responses], dtype=np.float64)
    return {
        "sampling/prompts_drawn": len(candidates.prompts),
        "sampling/useful_prompts": int(useful_prompts(candidates, config).sum()),
        "sampling/samples": int(counts.sum()),
        "sampling/rounds": rounds,
        "sampling/samples_per_prompt_min": int(counts.min()) if len(counts) else 0,
        "sampling/samples_per_prompt_max": int(counts.max()) if len(counts) else 0,
        "sampling/samples_per_prompt_std": float(counts.std()) if len(counts) else 0.0,
    }


# --------------------------------------------------------------------------- rounds


@dataclasses.dataclass
class _Pool:
    """This process's samples and reward rows of the stage so far, by prompt id."""

    samples: dict[int, list[Completion]] = dataclasses.field(default_factory=dict)
    rows: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)


def sample_round(run: StageRun, prompts: list[PromptRecord], counts: list[int], stage: int,
                 journal: StageJournal, timer: Timer, pool: _Pool) -> Candidates:
    """Each process brings its share of `prompts` to `counts[i]` samples (keeping those it has)
    and scores the new ones; returns all processes' candidates of `prompts`."""
    mine = shard(list(range(len(prompts))))
    local = [prompts[i] for i in mine]
    with timer("generate"), run.sampling_policy() as policy:
        responses = _sample(policy, run.tokenizer, local, [counts[i] for i in mine], run.config,
                            stage, journal, pool)
    with timer("reward"):
        rows = _score(run.reward, local, responses, stage, journal, pool)
    # Every process names every term, so gather_candidates' collectives match (a process may
    # have no prompt in a small round).
    terms = sorted({name for names in gather([sorted({n for r in rows for n in r["terms"]})])
                    for name in names})
    width = max((len(r) for r in responses), default=0)
    return gather_candidates(Candidates(
        local, responses, _table([r["rewards"] for r in rows], width),
        {name: _table([r["terms"].get(name, [None] * len(r["rewards"])) for r in rows], width)
         for name in terms}))


def _sample(policy: Any, tokenizer: Any, prompts: list[PromptRecord], counts: list[int],
            config: RaftConfig, stage: int, journal: StageJournal,
            pool: _Pool) -> list[list[Completion]]:
    """`counts[i]` samples of prompt i: those in `pool` or the journal are kept, the rest
    sampled (and journaled as they finish). Backends whose samples depend on more than
    (seed, index) sample only the missing ones, seeded by (run seed, stage, prompt id, first
    new index)."""
    ids = [p.id for p in prompts]
    have = [pool.samples.get(pid, []) for pid in ids]
    if GENERATION_BACKENDS[config.generation.backend].keeps_done:
        start, seeds, wanted = [0] * len(ids), sample_seeds(config.run.seed, stage, ids), counts
        done = {(i, j): have[i][j] if j < len(have[i]) else Completion(**journal.samples[(pid, j)])
                for i, pid in enumerate(ids) for j in range(counts[i])
                if j < len(have[i]) or (pid, j) in journal.samples}
    else:
        start = [len(h) for h in have]
        wanted = [max(0, n - s) for n, s in zip(counts, start)]
        seeds = [sample_seeds(config.run.seed, stage, [pid])[0] if s == 0 else
                 int(np.random.SeedSequence([config.run.seed, stage, pid, s])
                     .generate_state(1, np.uint64)[0] >> 1) for pid, s in zip(ids, start)]
        done = {}
    new = generate(
        policy, tokenizer, [p.token_ids for p in prompts], wanted, config.generation,
        seeds=seeds, desc=f"collect stage {stage}", done=done,
        on_finish=lambda i, j, c: journal.add_sample(ids[i], start[i] + j, dataclasses.asdict(c)))
    rows = [(h[:s] + row)[:n] for h, s, row, n in zip(have, start, new, counts)]
    pool.samples.update(zip(ids, rows))
    return rows


def _score(reward: Reward, prompts: list[PromptRecord], responses: list[list[Completion]],
           stage: int, journal: StageJournal, pool: _Pool) -> list[dict[str, Any]]:
    """Reward rows of `responses`: a prompt's responses scored before (this attempt, or an
    interrupted one per the journal) keep their rewards and only the new ones are scored, each
    chunk's rows journaled as soon as it is scored."""
    for p in prompts:
        known = [r for r in (pool.rows.get(p.id), journal.rewards.get(p.id)) if r]
        pool.rows[p.id] = max(known, key=lambda r: len(r["rewards"]), default=_EMPTY)
    start = [min(len(pool.rows[p.id]["rewards"]), len(row)) for p, row in zip(prompts, responses)]
    todo = [i for i, row in enumerate(responses) if start[i] < len(row)]

    def keep(first: int, last: int, part: RewardResult) -> None:
        offset = 0
        for i in todo[first:last]:
            end = offset + len(responses[i]) - start[i]
            old = _prefix(pool.rows[prompts[i].id], start[i])
            names = set(old["terms"]) | set(part.per_term)
            row = {"rewards": old["rewards"] + _nan_to_none(part.scores[offset:end]),
                   "terms": {name: old["terms"].get(name, [None] * start[i]) + _nan_to_none(
                       part.per_term[name][offset:end] if name in part.per_term
                       else np.full(end - offset, np.nan)) for name in sorted(names)}}
            pool.rows[prompts[i].id] = row
            journal.add_rewards(prompts[i].id, row["rewards"], row["terms"])
            offset = end
        journal.sync()

    if todo:
        score(reward, [prompts[i] for i in todo], [responses[i][start[i]:] for i in todo],
              stage=stage, on_scored=keep)
    return [_prefix(pool.rows[p.id], len(row)) for p, row in zip(prompts, responses)]


def _draw_unseen(run: StageRun, n: int, seen: set[int]) -> list[PromptRecord]:
    """The next `n` prompts of the run's order that this stage has not sampled yet (fewer when
    the prompt set runs out); prompts passed over count as drawn."""
    records, drawn = run.train_prompts.records, []
    while len(drawn) < n and len(seen) < len(records):
        for position in run.prompt_order.draw(n - len(drawn)):
            if records[position].id not in seen:
                seen.add(records[position].id)
                drawn.append(records[position])
    return drawn


def _concatenate(parts: list[Candidates]) -> Candidates:
    """The rounds' candidates one after the other (prompts in draw order)."""
    width = max((p.rewards.shape[1] for p in parts), default=0)
    names = sorted({name for p in parts for name in p.per_term})

    def stack(tables: list[np.ndarray]) -> np.ndarray:
        out = [np.pad(t, ((0, 0), (0, width - t.shape[1])), constant_values=np.nan)
               for t in tables]
        return np.concatenate(out) if out else np.zeros((0, width))

    return Candidates(
        [p for part in parts for p in part.prompts],
        [row for part in parts for row in part.responses],
        stack([p.rewards for p in parts]),
        {name: stack([p.per_term.get(name, np.full(p.rewards.shape, np.nan)) for p in parts])
         for name in names})


_EMPTY: dict[str, Any] = {"rewards": [], "terms": {}}


def _prefix(row: dict[str, Any], n: int) -> dict[str, Any]:
    return {"rewards": row["rewards"][:n], "terms": {k: v[:n] for k, v in row["terms"].items()}}


def _nan_to_none(values: np.ndarray) -> list[float | None]:
    return [None if np.isnan(v) else float(v) for v in values]


def _table(rows: list[list[float | None]], width: int) -> np.ndarray:
    out = np.full((len(rows), width), np.nan)
    for p, row in enumerate(rows):
        out[p, : len(row)] = [np.nan if v is None else v for v in row]
    return out
