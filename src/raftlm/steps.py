"""The steps of a RAFT stage, each a function of the components it uses.

`loop.raft_stage` calls them in order — collect (sample, then score), rank, fine-tune — and the
commands that run one step on its own call the very same functions, so a stage means the same
thing however it is run. None of them needs a run directory, a tracker or an optimizer unless
it says so.

A stage's candidates may be ragged (a different number of responses per prompt): their reward
tables are [prompts, max count] with NaN where a prompt has fewer, which the selectors and the
group objectives already treat as "no candidate".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from raftlm.config import RaftConfig
from raftlm.core import token_pooled_nll
from raftlm.data.prompts import PromptRecord
from raftlm.evaluation.metrics import nanmean, reward_distribution
from raftlm.models.distributed import gather, shard, whole_model
from raftlm.rewards.reward import Reward, RewardResult, score
from raftlm.rewards.selection import Selection, select
from raftlm.run.journal import StageJournal
from raftlm.sampling.completion import Completion
from raftlm.sampling.generate import GENERATION_BACKENDS, generate, sample_seeds
from raftlm.training.batches import Example, response_log_probs
from raftlm.training.objectives import (
    OBJECTIVES,
    TrainingExample,
    shaped_rewards,
    training_examples,
)
from raftlm.training.trainer import SFTTrainer


@dataclass
class Candidates:
    """A stage's prompts, their sampled responses (a count per prompt) and rewards."""

    prompts: list[PromptRecord]
    responses: list[list[Completion]]
    rewards: np.ndarray  # float [P, max count]: the weighted sum; NaN = invalid or no candidate
    per_term: dict[str, np.ndarray] = field(default_factory=dict)  # each term's [P, max count]
    sampling: dict[str, Any] = field(default_factory=dict)  # sampling/* of the mode that drew them

    def table(self, value: Callable[[Completion], Any], fill: Any = 0) -> np.ndarray:
        """`value(response)` of every candidate as a [P, max count] array (`fill` where none)."""
        out = np.full(self.rewards.shape, fill)
        for p, row in enumerate(self.responses):
            out[p, : len(row)] = [value(r) for r in row]
        return out


@dataclass
class Ranked:
    """The Rank step's decision: what to train on, with which weight or advantage."""

    selection: Selection
    examples: list[TrainingExample]
    stats: dict[str, Any]  # train/groups_dropped, train/n_examples, train/entropy


# --------------------------------------------------------------------------- 1. collect


def open_journal(folder: Path, process_index: int, config: RaftConfig,
                 prompt_ids: list[int]) -> StageJournal:
    """This process's journal of the stage in `folder`, holding what an interrupted attempt
    finished. Only the raftlm backend's samples depend on nothing but (seed, prompt, sample
    index), so only it reuses finished samples; other backends re-sample the stage."""
    header = {"stage": int(folder.name), "prompt_ids": prompt_ids,
              "samples_per_prompt": config.raft.samples_per_prompt,
              "generation": dataclasses.asdict(config.generation), "seed": config.run.seed,
              "scoring": scoring_fingerprint(config)}
    journal = StageJournal(folder, process_index, header,
                           reuse=GENERATION_BACKENDS[config.generation.backend].keeps_done)
    if journal.discarded and process_index == 0:
        print(f"stage {int(folder.name)}: not reusing its earlier samples ({journal.discarded})")
    return journal


def scoring_fingerprint(config: RaftConfig) -> str:
    """A short hash of what turns samples into rewards: a journal's rewards are reused only
    under the same reward config."""
    text = json.dumps(dataclasses.asdict(config.reward), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def generate_candidates(policy: Any, tokenizer: Any, prompts: list[PromptRecord],
                        num_samples: int | list[int], config: RaftConfig, stage: int,
                        journal: StageJournal | None = None) -> list[list[Completion]]:
    """Sample `num_samples` responses to each prompt (a count per prompt allowed). Each sample's
    randomness comes from (run seed, stage, prompt id, sample index) alone; with a journal,
    finished samples are reused and new ones written to it as they finish."""
    ids = [p.id for p in prompts]
    finished = {} if journal is None else {
        (i, j): Completion(**journal.samples[(pid, j)])
        for i, pid in enumerate(ids) for j in range(max_count(num_samples, i))
        if (pid, j) in journal.samples}
    on_finish = None if journal is None else (
        lambda i, j, c: journal.add_sample(ids[i], j, dataclasses.asdict(c)))
    return generate(
        policy, tokenizer, [p.token_ids for p in prompts], num_samples, config.generation,
        seeds=sample_seeds(config.run.seed, stage, ids), desc=f"collect stage {stage}",
        done=finished, on_finish=on_finish,
    )


def max_count(num_samples: int | list[int], i: int) -> int:
    return num_samples if isinstance(num_samples, int) else num_samples[i]


def score_candidates(reward: Reward, prompts: list[PromptRecord],
                     responses: list[list[Completion]], stage: int,
                     journal: StageJournal | None = None) -> Candidates:
    """Reward every response; with a journal, prompts it already holds rewards for are not
    scored again, and each chunk's rewards are written to it as soon as it is scored (a reward
    server dying mid-stage loses only the chunk in flight)."""
    scored = {} if journal is None else dict(journal.rewards)
    todo = [i for i, p in enumerate(prompts)  # a prompt sampled further is scored again
            if p.id not in scored or len(scored[p.id]["rewards"]) != len(responses[i])]

    def keep(first: int, last: int, part: RewardResult) -> None:
        start = 0
        for i in todo[first:last]:
            end = start + len(responses[i])
            scored[prompts[i].id] = row = {
                "rewards": _nan_to_none(part.scores[start:end]),
                "terms": {name: _nan_to_none(v[start:end]) for name, v in part.per_term.items()},
            }
            start = end
            if journal is not None:
                journal.add_rewards(prompts[i].id, row["rewards"], row["terms"])
        if journal is not None:
            journal.sync()

    if todo:
        score(reward, [prompts[i] for i in todo], [responses[i] for i in todo], stage=stage,
              on_scored=keep)
    rows = [scored[p.id] for p in prompts]
    width = max((len(r) for r in responses), default=0)
    terms = sorted({name for row in rows for name in row["terms"]})
    return Candidates(
        prompts, responses, _table([row["rewards"] for row in rows], width),
        {name: _table([row["terms"].get(name, []) for row in rows], width) for name in terms},
    )


def gather_candidates(local: Candidates) -> Candidates:
    """Every process's candidates, in prompt order (a no-op in a single process)."""
    prompts = gather(local.prompts)
    responses = gather(local.responses)
    width = max((len(r) for r in responses), default=0)
    rows = gather([_row(local.rewards[i], len(r)) for i, r in enumerate(local.responses)])
    terms = {name: _table(gather([_row(t[i], len(r)) for i, r in enumerate(local.responses)]),
                          width) for name, t in local.per_term.items()}
    return Candidates(prompts, responses, _table(rows, width), terms)


def collect(sampling_policy: Callable[[], AbstractContextManager[Any]], tokenizer: Any,
            reward: Reward, prompts: list[PromptRecord], config: RaftConfig, stage: int,
            journal: StageJournal | None, timer: Timer) -> Candidates:
    """Collect (fixed sampling): each process samples K responses to its share of the prompts
    and scores them; the candidates of all processes are gathered."""
    mine = shard(prompts)
    try:
        with timer("generate"), sampling_policy() as policy:
            responses = generate_candidates(policy, tokenizer, mine,
                                            config.raft.samples_per_prompt, config, stage, journal)
        with timer("reward"):
            local = score_candidates(reward, mine, responses, stage, journal)
    finally:
        if journal is not None:
            journal.close()  # all written: nothing more to journal, whether it failed or not
    return gather_candidates(local)


# --------------------------------------------------------------------------- 2. rank


def rank(candidates: Candidates, config: RaftConfig, stage: int) -> Ranked:
    """Filters and the selection strategy, then the configured objective's training examples
    (weights or advantages)."""
    lengths = candidates.table(lambda r: len(r.token_ids))
    rewards = shaped_rewards(candidates.rewards, lengths, config.training,
                             config.generation.max_new_tokens)  # DAPO's overlong penalty, if set
    selection = select(
        rewards, [[r.text for r in row] for row in candidates.responses], lengths,
        config.selection,
        candidates.table(lambda r: r.finish_reason == "length", False),
        tie_break=np.random.default_rng([config.run.seed, stage]).random(rewards.shape),
    )
    _warn_about_all_equal_prompts(rewards, selection, config)
    examples, stats = training_examples(candidates.prompts, candidates.responses, rewards,
                                        selection, config.training, stage)
    return Ranked(selection, examples, stats)


_warned: set[str] = set()


def _warn_about_all_equal_prompts(rewards: np.ndarray, selection: Selection,
                                  config: RaftConfig) -> None:
    """Once per run: with a 0/1 reward, best_per_prompt and no min_reward, the 'best' of a
    prompt whose answers are all wrong is a wrong answer, and RAFT imitates it."""
    sel = config.selection
    if "all_equal" in _warned or sel.min_reward is not None or sel.drop_uniform_prompts:
        return
    valid = ~np.isnan(rewards)
    low = np.nanmin(np.where(valid, rewards, np.inf), axis=1)
    high = np.nanmax(np.where(valid, rewards, -np.inf), axis=1)
    uniform = (valid.sum(axis=1) > 1) & (low == high) & selection.mask.any(axis=1)
    if uniform.any() and not OBJECTIVES[config.training.objective].trains_on_all_samples:
        _warned.add("all_equal")
        print(f"raftlm: note: {int(uniform.sum())} prompt(s) had all rewards equal (e.g. every "
              "answer wrong) and one of them was kept for training; set selection.min_reward "
              "or selection.drop_uniform_prompts to train only on better-than-average answers",
              file=sys.stderr)


# --------------------------------------------------------------------------- 3. fine-tune


def fine_tune(trainer: SFTTrainer, candidates: Candidates, ranked: Ranked, stage: int,
              pad_id: int, temperature: float) -> dict[str, Any]:
    """The configured objective on the Rank step's examples; `train/sft_loss` is the kept
    set's SFT loss before the update (raft_alignment's loss)."""
    sft_loss = selected_sft_loss(trainer, candidates, ranked.selection.mask, pad_id, temperature)
    return {"train/sft_loss": sft_loss, **trainer.train(ranked.examples, stage)}


def selected_sft_loss(trainer: SFTTrainer, candidates: Candidates, mask: np.ndarray,
                      pad_id: int, temperature: float = 1.0) -> float | None:
    """Token-pooled NLL of the selected responses under the current policy (at temperature 1,
    the SFT loss): from the log-probs recorded while sampling them when they were sampled at
    T = 1 (the sampler records log softmax(z / T)), else from a forward pass."""
    kept = [(candidates.prompts[p], candidates.responses[p][j]) for p, j in zip(*np.nonzero(mask))]
    if not kept:
        return None
    if temperature == 1 and all(c.token_log_probs is not None for _, c in kept):
        return token_pooled_nll([np.asarray(c.token_log_probs) for _, c in kept])
    examples = [Example(p.token_ids, c.token_ids) for p, c in kept]
    with whole_model(trainer.accelerator, trainer.model) as policy:
        log_probs = response_log_probs(policy, shard(examples), pad_id,
                                       trainer.config.micro_batch_size, trainer.accelerator.device)
    return token_pooled_nll(gather(log_probs))


# --------------------------------------------------------------------------- 4. record


def candidate_rows(candidates: Candidates, mask: np.ndarray | None = None) -> list[dict]:
    """`candidates.jsonl` rows: every prompt, response, reward (and each term's) and whether
    it was selected."""
    return [
        {
            "prompt_id": prompt.id, "prompt": prompt.text, "sample": j, "response": response.text,
            "original_prompt": prompt.prompt,  # as in the data: text or chat messages
            "reward": _float(candidates.rewards[p, j]),
            "rewards": {name: _float(t[p, j]) for name, t in candidates.per_term.items()},
            "selected": None if mask is None else bool(mask[p, j]),
            "finish_reason": response.finish_reason, "n_tokens": len(response.token_ids),
        }
        for p, (prompt, row) in enumerate(zip(candidates.prompts, candidates.responses))
        for j, response in enumerate(row)
    ]


def candidate_metrics(candidates: Candidates, ranked: Ranked) -> dict[str, Any]:
    """The stage's numbers about what was sampled and kept."""
    rewards, mask = candidates.rewards, ranked.selection.mask
    present = candidates.table(lambda r: True, False)
    return {
        "train/reward_mean": nanmean(rewards),
        "train/reward_selected_mean": nanmean(rewards[mask]),
        **reward_distribution(rewards, mask),
        "train/n_selected": ranked.selection.n_selected,
        "train/n_invalid_reward": int((np.isnan(rewards) & present).sum()),
        **{f"train/dropped_{name}": n for name, n in ranked.selection.dropped.items()},
        **ranked.stats,
        "tokens/generated": int(candidates.table(lambda r: len(r.token_ids)).sum()),
        **{f"reward/{name}/mean": nanmean(t) for name, t in candidates.per_term.items()},
        **candidates.sampling,
    }


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


def _nan_to_none(values: np.ndarray) -> list[float | None]:
    return [None if np.isnan(v) else float(v) for v in values]


def _float(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def _row(values: np.ndarray, n: int) -> list[float]:
    return [float(v) for v in values[:n]]


def _table(rows: list[list[float | None]], width: int) -> np.ndarray:
    out = np.full((len(rows), width), np.nan)
    for p, row in enumerate(rows):
        out[p, : len(row)] = [np.nan if v is None else v for v in row]
    return out
