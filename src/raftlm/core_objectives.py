"""NumPy references of the training objectives (`raftlm.training.objectives` is the torch twin).

Token arrays are [N, L] (N responses, L token positions) with a 0/1 `mask` of real response
tokens; every loss is token-pooled: the sum over all masked tokens divided by their count, as
`raftlm.core.token_pooled_nll`. Per-response values (weights, advantages) are vectors [N].
Reward tables are [P, K] (K responses per prompt), NaN = invalid or filtered.

- sft:             mean over tokens of -log pi
- reward_weighted: -sum_i w_i sum_t log pi(y_it) / sum_i |y_i|
- clipped ratio:   -mean over tokens of min(rho A, clip(rho, 1-eps, 1+eps) A), rho = pi/pi_old,
                   and with a dual clip c (for A < 0) max(that, c A) (Ye et al. 2020)
- k3 KL:           exp(ref - logp) - (ref - logp) - 1 per token (Schulman's k3 estimator)
"""

from __future__ import annotations

import numpy as np

GROUP_STD_EPS = 1e-6  # GRPO's (r - mean) / (std + eps): a constant group gets advantage 0


def weighted_nll(log_probs: np.ndarray, weights: np.ndarray, mask: np.ndarray) -> float:
    """-sum_i w_i sum_t log pi(y_it) / sum_i |y_i| (w = 1: the SFT loss)."""
    mask = np.asarray(mask, dtype=np.float64)
    per_response = (np.asarray(log_probs, dtype=np.float64) * mask).sum(axis=1)
    return float(-(np.asarray(weights, dtype=np.float64) * per_response).sum() / mask.sum())


def clipped_ratio_loss(
    log_probs: np.ndarray,
    old_log_probs: np.ndarray,
    advantages: np.ndarray,
    mask: np.ndarray,
    clip_eps: float,
    dual_clip: float | None = None,
) -> dict[str, float]:
    """PPO's clipped surrogate, token-pooled; also the clip fraction and ratio mean/max."""
    mask = np.asarray(mask, dtype=bool)
    ratio = np.exp(np.asarray(log_probs, np.float64) - np.asarray(old_log_probs, np.float64))
    adv = np.broadcast_to(np.asarray(advantages, np.float64)[:, None], ratio.shape)
    unclipped = -ratio * adv
    clipped = -np.clip(ratio, 1 - clip_eps, 1 + clip_eps) * adv
    loss = np.maximum(unclipped, clipped)
    if dual_clip is not None:
        loss = np.where(adv < 0, np.minimum(loss, -dual_clip * adv), loss)
    return {
        "loss": float(loss[mask].mean()),
        "clip_fraction": float((clipped > unclipped)[mask].mean()),
        "ratio_mean": float(ratio[mask].mean()),
        "ratio_max": float(ratio[mask].max()),
    }


def k3_kl(log_probs: np.ndarray, ref_log_probs: np.ndarray, mask: np.ndarray) -> float:
    """Token-pooled k3 estimate of KL(pi || pi_ref) on responses sampled from pi."""
    delta = np.asarray(ref_log_probs, np.float64) - np.asarray(log_probs, np.float64)
    return float((np.exp(delta) - delta - 1)[np.asarray(mask, dtype=bool)].mean())


def group_advantages(rewards: np.ndarray, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-prompt advantages of a [P, K] reward table and which prompts to keep.

    A = r - mean(group) (Reinforce-Rej), or with `normalize` (r - mean) / (std + eps) (GRPO).
    Prompts whose valid rewards are all equal (or fewer than two) carry no signal and are
    dropped (keep = False); NaN rewards get a NaN advantage.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    valid = ~np.isnan(rewards)
    count = valid.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nanmean(np.where(valid, rewards, np.nan), axis=1)
        spread = np.nanmax(rewards, axis=1) - np.nanmin(rewards, axis=1)
        advantages = rewards - mean[:, None]
        if normalize:
            std = np.nanstd(np.where(valid, rewards, np.nan), axis=1)
            advantages = advantages / (std[:, None] + GROUP_STD_EPS)
    keep = (count >= 2) & (spread > 0)
    return advantages, keep


def transform_weights(rewards: np.ndarray, transform: str) -> np.ndarray:
    """Per-prompt weights from a [P, K] reward table: `none` (the reward itself), `minmax`
    ((r - min) / (max - min), 0 for a constant prompt) or `rank` (0 for the worst, 1 for the
    best, ties share their mean rank; 1 for a prompt with one valid response)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    if transform == "none":
        return rewards.copy()
    weights = np.full(rewards.shape, np.nan)
    for p, row in enumerate(rewards):
        valid = ~np.isnan(row)
        values = row[valid]
        if values.size == 0:
            continue
        if transform == "minmax":
            span = values.max() - values.min()
            weights[p, valid] = (values - values.min()) / span if span > 0 else 0.0
        elif transform == "rank":
            below = (values[None, :] < values[:, None]).sum(axis=1)
            ties = (values[None, :] == values[:, None]).sum(axis=1)
            mean_rank = below + (ties - 1) / 2
            weights[p, valid] = mean_rank / (values.size - 1) if values.size > 1 else 1.0
        else:
            raise ValueError(f"unknown weight transform {transform!r}; expected none, minmax "
                             "or rank")
    return weights
