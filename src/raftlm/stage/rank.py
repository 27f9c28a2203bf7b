"""Rank: choose which sampled responses to fine-tune on.

Filters first mark unusable candidates as invalid (NaN reward), then a strategy from the NumPy
core picks among the rest. The core selectors never pick NaN, so filters compose with every
strategy without special cases.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from raftlm.config import SelectionConfig
from raftlm.core import best_per_prompt_mask, top_fraction_mask, top_k_per_prompt_mask


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

    if config.drop_uniform_prompts:
        valid = ~np.isnan(rewards)
        spread = np.nanmax(rewards, axis=1, initial=-np.inf, where=valid) - np.nanmin(
            rewards, axis=1, initial=np.inf, where=valid
        )
        drop("uniform_prompt", (spread == 0)[:, None] & valid)
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
    if config.deduplicate:
        drop("duplicate", _duplicates(responses, rewards.shape))

    mask = SELECTION_STRATEGIES[config.strategy](rewards, config, int(present.sum()), tie_break)
    if config.min_reward is not None:
        below = mask & (rewards < config.min_reward)
        dropped["below_min_reward"] = int(below.sum())
        mask &= ~below
    return Selection(mask=mask, eligible=eligible, dropped=dropped)


SELECTION_STRATEGIES: dict[str, Callable[..., np.ndarray]] = {
    # (filtered rewards [P, K], config, number of real candidates, tie-break keys) -> mask
    "best_per_prompt": lambda rewards, config, n, ties: best_per_prompt_mask(rewards),
    "top_k_per_prompt": lambda rewards, config, n, ties: top_k_per_prompt_mask(
        rewards, config.top_k),
    "top_fraction": lambda rewards, config, n, ties: top_fraction_mask(
        rewards, config.top_fraction, n, ties),
}


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
