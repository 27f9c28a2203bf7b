"""Metric functions on plain arrays and strings (no torch): what RAFT gained and what it cost.

- Reward: mean, best-of-K (the mean over prompts of the best of K samples; what RAFT's
  selection sees) and the min/median/max spread of all vs selected training candidates.
- Diversity: distinct-n (Li et al. 2016) = unique n-grams / total n-grams, pooled over all
  responses. n-grams are over whitespace-separated words, not token ids, so numbers are
  comparable across tokenizers and read like the text. Collapsing diversity is how reward
  hacking showed up in the RAFT paper.
- KL(pi_t || pi_0) (`eval/kl_to_initial`), estimated from responses y ~ pi_t as the mean over
  responses of sum_t [exp(r_t) - r_t - 1], r_t = log pi_0(y_t | x, y_<t) - log pi_t(y_t | x, y_<t)
  (Schulman's "k3" estimator, per token). Each term is >= 0 and its expectation under pi_t is
  the token's KL, so the sum estimates the sequence KL without bias and is never negative (the
  plain log-ratio mean, "k1", has the same expectation but single estimates go below zero).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def distinct_n(texts: Sequence[str], n: int) -> float | None:
    """Unique word n-grams / all word n-grams over `texts`; None when there are no n-grams."""
    total, unique = 0, set()
    for text in texts:
        words = text.split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else None


def best_of_k(rewards: np.ndarray) -> float | None:
    """Mean over prompts (rows) of the best of their K rewards (columns); NaN = invalid."""
    rewards = np.asarray(rewards, dtype=float)
    valid = ~np.all(np.isnan(rewards), axis=1)
    return float(np.mean(np.nanmax(rewards[valid], axis=1))) if valid.any() else None


def nanmean(values: np.ndarray | Sequence[float]) -> float | None:
    """Mean of the valid (non-NaN) values, or None when there are none."""
    values = np.asarray(values, dtype=float)
    return float(np.nanmean(values)) if np.any(~np.isnan(values)) else None


def spread(values: np.ndarray | Sequence[float], prefix: str) -> dict[str, float | None]:
    """`{prefix}_min`, `_median`, `_max` of the valid values (None when there are none)."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    stats = {"min": np.min, "median": np.median, "max": np.max}
    return {f"{prefix}_{name}": float(f(values)) if values.size else None
            for name, f in stats.items()}


def reward_distribution(rewards: np.ndarray, selected: np.ndarray) -> dict[str, float | None]:
    """Spread of all candidates' rewards and of the selected ones (`train/reward_all_*`,
    `train/reward_selected_*`): a stage's selection pressure at a glance."""
    rewards = np.asarray(rewards, dtype=float)
    return {**spread(rewards, "train/reward_all"),
            **spread(rewards[np.asarray(selected, dtype=bool)], "train/reward_selected")}


def sequence_kl(policy_log_probs: Sequence[np.ndarray],
                reference_log_probs: Sequence[np.ndarray]) -> float | None:
    """Monte-Carlo KL(pi || pi_0) >= 0: mean over sampled responses of the summed per-token k3
    estimate exp(r) - r - 1, r = log pi_0 - log pi (see the module docstring).

    Each response's per-token log-probs under the policy that sampled it and under pi_0, both
    at the sampling temperature. Unbiased when the responses were sampled from pi itself (no
    top-p/top-k truncation).
    """
    if len(policy_log_probs) != len(reference_log_probs):
        raise ValueError(f"{len(policy_log_probs)} policy vs {len(reference_log_probs)} "
                         "reference log-prob rows")
    if not policy_log_probs:
        return None
    per_response = []
    for policy, reference in zip(policy_log_probs, reference_log_probs):
        log_ratio = np.asarray(reference, dtype=np.float64) - np.asarray(policy, dtype=np.float64)
        # expm1(r) - r rather than exp(r) - r - 1: no cancellation when r is near 0.
        per_response.append(float(np.sum(np.expm1(log_ratio) - log_ratio)))
    return float(np.mean(per_response))
