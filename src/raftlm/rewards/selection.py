"""Rank: choose which sampled responses to fine-tune on.

Filters first mark unusable candidates as invalid (NaN reward), then a strategy from the NumPy
core picks among the rest. The core selectors never pick NaN, so filters compose with every
strategy without special cases.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from raftlm.config import SelectionConfig
from raftlm.core import best_per_prompt_mask, top_fraction_mask, top_k_per_prompt_mask


@dataclass
class Selection:
    mask: np.ndarray  # bool [P, K]: the responses to fine-tune on
    dropped: dict[str, int] = field(default_factory=dict)  # candidates removed, by filter

    @property
    def n_selected(self) -> int:
        return int(self.mask.sum())


def select(
    rewards: np.ndarray,
    responses: list[list[str]],
    response_lengths: list[list[int]],
    config: SelectionConfig,
    truncated: np.ndarray | None = None,
) -> Selection:
    """Apply the configured filters, then the strategy, to a [P, K] reward table (NaN = invalid).

    `truncated` marks responses cut at max_new_tokens (dropped when `drop_truncated` is set).
    """
    rewards = np.array(rewards, dtype=np.float64)
    dropped: dict[str, int] = {}

    def drop(name: str, where: np.ndarray) -> None:
        where = where & ~np.isnan(rewards)
        dropped[name] = int(where.sum())
        rewards[where] = np.nan

    if config.drop_uniform_prompts:
        valid = ~np.isnan(rewards)
        spread = np.nanmax(rewards, axis=1, initial=-np.inf, where=valid) - np.nanmin(
            rewards, axis=1, initial=np.inf, where=valid
        )
        drop("uniform_prompt", (spread == 0)[:, None] & valid)
    lengths = np.array(response_lengths)
    drop("too_short", lengths < config.min_response_tokens)
    if config.drop_truncated and truncated is not None:
        drop("truncated", np.asarray(truncated, dtype=bool))
    if config.reject_pattern:
        pattern = re.compile(config.reject_pattern)
        matches = [[bool(pattern.search(text)) for text in row] for row in responses]
        drop("rejected_pattern", np.array(matches, dtype=bool))
    if config.deduplicate:
        drop("duplicate", _duplicates(responses))

    if config.strategy == "best_per_prompt":
        mask = best_per_prompt_mask(rewards)
    elif config.strategy == "top_k_per_prompt":
        mask = top_k_per_prompt_mask(rewards, config.top_k)
    else:
        mask = top_fraction_mask(rewards, config.top_fraction)
    if config.min_reward is not None:
        below = mask & (rewards < config.min_reward)
        dropped["below_min_reward"] = int(below.sum())
        mask &= ~below
    return Selection(mask=mask, dropped=dropped)


def _duplicates(responses: list[list[str]]) -> np.ndarray:
    """True for every repeat of a response already seen earlier for the same prompt."""
    repeats = np.zeros((len(responses), len(responses[0]) if responses else 0), dtype=bool)
    for p, row in enumerate(responses):
        seen: set[str] = set()
        for k, text in enumerate(row):
            repeats[p, k] = text in seen
            seen.add(text)
    return repeats
