"""Rank: everything the stage knows about which rollouts to train on, and with what weight.

In order: DAPO's overlong shaping of the rewards (`shaped_rewards`), the filters (they mark
unusable rollouts invalid, NaN), a selection strategy of the NumPy core (which never picks NaN,
so filters compose with every strategy), then the objective's weighting turns the selection
into training examples. The collectors ask the same questions of a round (`ranked_view`,
`useful_prompts`) so that "useful" means what Rank will do with it.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raftlm.config import ConfigError, RaftConfig, SelectionConfig, TrainingConfig
from raftlm.core import best_per_prompt_mask, top_fraction_mask, top_k_per_prompt_mask
from raftlm.core.collectors import has_reward_spread
from raftlm.core.objectives import nominal_pairs, overlong_penalty
from raftlm.stage.rollouts import Rollouts
from raftlm.training.batches import PairExample, TrainingExample
from raftlm.training.objectives import objective_of


@dataclass
class Selection:
    mask: np.ndarray  # bool [P, K]: the responses to fine-tune on
    # bool [P, K]: candidates with a valid reward that passed the response filters (too short,
    # truncated, reject_pattern): what group objectives may compare (dedup, uniform-prompt and
    # min_reward filters are about which responses to imitate, not about response quality)
    eligible: np.ndarray
    dropped: dict[str, int] = field(default_factory=dict)  # candidates removed, by filter

    @property
    def n_selected(self) -> int:
        return int(self.mask.sum())


@dataclass
class Ranked:
    """The Rank step's decision: what to train on, with which weight or advantage."""

    selection: Selection
    examples: list[TrainingExample]
    stats: dict[str, Any]  # train/groups_dropped, train/n_examples, train/entropy


def rank(rollouts: Rollouts, config: RaftConfig, stage: int) -> Ranked:
    """Shaping, filters and the selection strategy, then the objective's training examples."""
    rewards = shaped_rewards(rollouts, config)
    selection = select(
        rewards, [[r.text for r in row] for row in rollouts.responses],
        rollouts.table(lambda r: len(r.token_ids)), config.selection,
        rollouts.table(lambda r: r.finish_reason == "length", False),
        tie_break=np.random.default_rng([config.run.seed, stage]).random(rewards.shape),
    )
    _warn_about_all_equal_prompts(rewards, selection, config)
    examples, stats = training_examples(rollouts, rewards, selection, config.training, stage)
    return Ranked(selection, examples, stats)


def shaped_rewards(rollouts: Rollouts, config: RaftConfig) -> np.ndarray:
    """The [P, K] rewards plus DAPO's soft overlong penalty of each response's token length
    (`training.overlong_buffer`, `training.overlong_penalty`; unchanged when either is 0).
    NaN rewards stay NaN."""
    lengths = rollouts.table(lambda r: len(r.token_ids))
    return np.asarray(rollouts.rewards, dtype=np.float64) + overlong_penalty(
        lengths, config.generation.max_new_tokens, config.training.overlong_buffer,
        config.training.overlong_penalty)


# --------------------------------------------------------------------------- selection


def select(
    rewards: np.ndarray,
    responses: list[list[str]],
    response_lengths: np.ndarray | list[list[int]],
    config: SelectionConfig,
    truncated: np.ndarray | None = None,
    tie_break: np.ndarray | None = None,
) -> Selection:
    """Apply the configured filters, then the strategy, to a [P, K] reward table (NaN = invalid).

    The table may be ragged, padded with NaN: `responses` has each prompt's own count, and
    `response_lengths` / `truncated` are [P, K] arrays (any value where padded). `truncated`
    marks responses cut at max_new_tokens (dropped when `drop_truncated` is set); `tie_break`
    [P, K] keys order equal rewards for `top_fraction` (the loop draws them from the run seed).
    """
    rewards = np.array(rewards, dtype=np.float64)
    width = rewards.shape[1] if rewards.ndim == 2 else 0
    present = np.array([[j < len(row) for j in range(width)] for row in responses],
                       dtype=bool).reshape(rewards.shape)
    eligible = ~np.isnan(rewards)
    dropped: dict[str, int] = {}

    def drop(name: str, where: np.ndarray) -> None:
        where = where & ~np.isnan(rewards)
        dropped[name] = int(where.sum())
        rewards[where] = np.nan

    response_filters = [("too_short", _padded(response_lengths, rewards.shape, 0)
                         < config.min_response_tokens)]
    if config.drop_truncated and truncated is not None:
        response_filters.append(("truncated", _padded(truncated, rewards.shape, False)))
    if config.reject_pattern:
        pattern = re.compile(config.reject_pattern)
        matches = [[bool(pattern.search(text)) for text in row] for row in responses]
        response_filters.append(("rejected_pattern", _padded(matches, rewards.shape, False)))
    for name, where in response_filters:
        drop(name, where)
        eligible &= ~where
    if config.drop_uniform_prompts:
        # Judged on what the response filters leave: a prompt whose only different answer was
        # filtered (e.g. its one correct answer truncated) has no signal left to rank by.
        valid = ~np.isnan(rewards)
        spread = np.nanmax(rewards, axis=1, initial=-np.inf, where=valid) - np.nanmin(
            rewards, axis=1, initial=np.inf, where=valid
        )
        drop("uniform_prompt", (spread == 0)[:, None] & valid)
    if config.deduplicate:
        drop("duplicate", _duplicates(responses, rewards.shape))

    mask = SELECTION_STRATEGIES[config.strategy].select(rewards, config, int(present.sum()),
                                                        tie_break)
    if config.min_reward is not None:
        below = mask & (rewards < config.min_reward)
        dropped["below_min_reward"] = int(below.sum())
        mask &= ~below
    return Selection(mask=mask, eligible=eligible, dropped=dropped)


@dataclass(frozen=True)
class SelectionStrategy:
    # (filtered rewards [P, K], config, number of real candidates, tie-break keys) -> mask
    select: Callable[[np.ndarray, SelectionConfig, int, np.ndarray | None], np.ndarray]
    # (b, K, config) -> responses kept per stage before filters: sizes the LR schedule
    nominal: Callable[[int, int, SelectionConfig], int]


SELECTION_STRATEGIES: dict[str, SelectionStrategy] = {
    "best_per_prompt": SelectionStrategy(
        lambda rewards, config, n, ties: best_per_prompt_mask(rewards),
        lambda b, k, config: b),
    "top_k_per_prompt": SelectionStrategy(
        lambda rewards, config, n, ties: top_k_per_prompt_mask(rewards, config.top_k),
        lambda b, k, config: b * min(config.top_k, k)),
    "top_fraction": SelectionStrategy(
        lambda rewards, config, n, ties: top_fraction_mask(rewards, config.top_fraction, n,
                                                           ties),
        lambda b, k, config: max(1, int(b * k * config.top_fraction))),
}


def expected_selected(config: RaftConfig) -> int:
    """Nominal training examples per stage (filters only lower it); sizes the LR schedule."""
    b, k = config.raft.prompts_per_stage, config.raft.samples_per_prompt
    dpo = config.training.dpo
    if objective_of(config.training).weighting.pairs:
        return b * nominal_pairs(dpo.pairs, k, dpo.max_pairs)
    if objective_of(config.training).weighting.group:
        return b * k  # these train on all K responses (groups with a reward spread)
    return SELECTION_STRATEGIES[config.selection.strategy].nominal(b, k, config.selection)


# --------------------------------------------------------------------------- collectors ask


def ranked_view(rollouts: Rollouts, config: RaftConfig) -> tuple[np.ndarray, Selection]:
    """The rewards Rank sees (shaped) and the selection of each prompt's row on its own
    (strategy best_per_prompt: the filters and min_reward decide whether anything of a prompt
    can be kept, whatever the strategy)."""
    rewards = shaped_rewards(rollouts, config)
    selection = select(
        rewards, [[r.text for r in row] for row in rollouts.responses],
        rollouts.table(lambda r: len(r.token_ids)),
        dataclasses.replace(config.selection, strategy="best_per_prompt"),
        rollouts.table(lambda r: r.finish_reason == "length", False))
    return rewards, selection


def useful_prompts(rollouts: Rollouts, config: RaftConfig) -> np.ndarray:
    """bool [P]: the prompts that carry a learning signal for the configured objective — for
    the RAFT family at least one response passes selection (filters, min_reward, on the
    shaped rewards Rank selects by); for group weightings (grpo, reinforce_rej) eligible raw
    rewards that are not all equal; for a pairing (dpo, rpo) at least one pair."""
    rewards, selection = ranked_view(rollouts, config)
    weighting = objective_of(config.training).weighting
    if weighting.pairs:
        pairs = weighting.pairs(pair_rewards(rollouts, rewards, selection), config.training)
        return np.isin(np.arange(len(rewards)), pairs[:, 0])
    if objective_of(config.training).weighting.group:
        # On the raw rewards, as DAPO filters on accuracy: the overlong penalty alone (all
        # answers right, of different lengths) makes a spread but no signal about the task.
        return has_reward_spread(np.where(selection.eligible, rollouts.rewards, np.nan))
    return selection.mask.any(axis=1)


# --------------------------------------------------------------------------- examples


def training_examples(rollouts: Rollouts, rewards: np.ndarray, selection: Selection,
                      config: TrainingConfig, stage: int
                      ) -> tuple[list[TrainingExample], dict[str, float | None]]:
    """The Rank step's output for the configured objective: the responses to train on, each
    with its weight or advantage (and recorded log-probs and loss mask), plus the stage's rank
    statistics (`train/groups_dropped`, `train/n_examples`, `train/entropy`).

    A pairing (dpo, rpo) hands over (chosen, rejected) pairs instead (`pair_examples`).
    Group weightings train on every eligible response (`selection.eligible`: a valid reward
    that passed the response filters) of the prompts they keep; the others on
    `selection.mask`. Weights and advantages are computed from eligible rewards only.

    `train/entropy` is -mean of the recorded token log-probs of all sampled responses: an
    estimate of the token entropy of the sampling distribution softmax(logits / T) (unbiased
    without top-p / top-k truncation); None when the sampler recorded none.
    """
    weighting = objective_of(config).weighting
    prompts, responses = rollouts.prompts, rollouts.responses
    if weighting.pairs:
        return pair_examples(rollouts, weighting.pairs(
            pair_rewards(rollouts, rewards, selection), config))
    rewards = np.where(selection.eligible, np.asarray(rewards, dtype=np.float64), np.nan)
    if rollouts.set_aside is not None:
        rewards[rollouts.set_aside] = np.nan
    weights, keep = weighting.weights(rewards, config)
    if weighting.group:
        chosen = keep[:, None] & ~np.isnan(rewards)
    else:
        chosen = np.asarray(selection.mask, dtype=bool)
    masked = {}
    if config.mask_truncated:  # in the statistics above, out of the loss
        truncated = rollouts.table(lambda r: r.finish_reason == "length", False) & chosen
        chosen = chosen & ~truncated
        masked = {"train/masked_truncated": int(truncated.sum())}
    if weighting.nonnegative:
        negative = chosen & (weights < 0)
        if negative.any():
            p, j = (int(i[0]) for i in np.nonzero(negative))
            raise ConfigError(
                f"stage {stage}, prompt {prompts[p].id}: reward {rewards[p, j]:g} is a "
                f"negative weight for {config.objective} (its weighting multiplies the "
                "log-likelihood); set training.weight_transform to minmax or rank")
        # A weight-0 response carries no gradient: leave it out of the step (and of the
        # token count) instead of spending forward and backward passes on it.
        chosen = chosen & (weights != 0)
    examples = [
        TrainingExample(prompts[p].token_ids, responses[p][j].token_ids, float(weights[p, j]),
                        responses[p][j].token_log_probs, responses[p][j].loss_mask)
        for p, j in zip(*np.nonzero(chosen))
    ]
    return examples, {
        "train/groups_dropped": int((~keep).sum()) if weighting.group else 0,
        "train/n_examples": len(examples),
        "train/entropy": _entropy(rollouts),
        **masked,
    }


def _entropy(rollouts: Rollouts) -> float | None:
    """-mean of the recorded token log-probs of every sampled response; None if none."""
    recorded = [lp for row in rollouts.responses for r in row
                if (lp := r.token_log_probs) is not None]
    return -float(np.mean(np.concatenate(recorded))) if recorded and any(
        len(lp) for lp in recorded) else None


def pair_rewards(rollouts: Rollouts, rewards: np.ndarray, selection: Selection) -> np.ndarray:
    """The [P, K] rewards a pairing pairs by: eligible responses (`selection.eligible`), each
    text once per prompt (a repeat would only repeat a pair), none of a prompt a collector set
    aside."""
    rewards = np.where(selection.eligible, np.asarray(rewards, dtype=np.float64), np.nan)
    rewards[_duplicates([[r.text for r in row] for row in rollouts.responses],
                        rewards.shape)] = np.nan
    if rollouts.set_aside is not None:
        rewards[rollouts.set_aside] = np.nan
    return rewards


def pair_examples(rollouts: Rollouts, pairs: np.ndarray
                  ) -> tuple[list[PairExample], dict[str, float | None]]:
    """A pairing's training examples, one per (prompt, chosen, rejected) row of `pairs`, and
    the stage's rank statistics (`train/n_pairs`, `train/n_examples`: the same number)."""
    examples = []
    for p, c, r in pairs.tolist():
        chosen, rejected = rollouts.responses[p][c], rollouts.responses[p][r]
        examples.append(PairExample(rollouts.prompts[p].token_ids, chosen.token_ids,
                                    rejected.token_ids, chosen.loss_mask, rejected.loss_mask))
    return examples, {"train/n_pairs": len(examples), "train/n_examples": len(examples),
                      "train/groups_dropped": 0, "train/entropy": _entropy(rollouts)}


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
    weighting = objective_of(config.training).weighting
    if uniform.any() and not (weighting.group or weighting.pairs):
        _warned.add("all_equal")
        print(f"raftlm: note: {int(uniform.sum())} prompt(s) had all rewards equal (e.g. every "
              "answer wrong) and one of them was kept for training; set selection.min_reward "
              "or selection.drop_uniform_prompts to train only on better-than-average answers",
              file=sys.stderr)


def _padded(rows: np.ndarray | list[list], shape: tuple[int, ...], fill: object) -> np.ndarray:
    """A ragged list of rows (or an array already of `shape`) as a [P, K] array."""
    if isinstance(rows, np.ndarray) and rows.shape == shape:
        return rows.astype(type(fill))
    out = np.full(shape, fill)  # bool or int, as the fill
    for p, row in enumerate(rows):
        out[p, : len(row)] = row
    return out


def _duplicates(responses: list[list[str]], shape: tuple[int, ...]) -> np.ndarray:
    """True for every repeat of a response already seen earlier for the same prompt."""
    repeats = np.zeros(shape, dtype=bool)
    for p, row in enumerate(responses):
        seen: set[str] = set()
        for k, text in enumerate(row):
            repeats[p, k] = text in seen
            seen.add(text)
    return repeats
