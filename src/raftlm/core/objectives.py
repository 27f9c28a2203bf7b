"""NumPy references of the training objectives (`raftlm.training.objectives` is the torch twin).

Token arrays are [N, L] (N responses, L token positions) with a 0/1 `mask` of real response
tokens. By default every loss is token-pooled: the sum over all masked tokens divided by their
count, as `raftlm.core.token_pooled_nll` (`aggregate_loss` gives the other aggregations).
Per-response values (weights, advantages) are vectors [N]. Reward tables are [P, K] (K responses
per prompt), NaN = invalid or filtered.

- sft:             mean over tokens of -log pi
- reward_weighted: -sum_i w_i sum_t log pi(y_it) / sum_i |y_i|
- clipped ratio:   -mean over tokens of min(rho A, clip(rho, 1-eps, 1+eps_high) A),
                   rho = pi/pi_old, and with a dual clip c (for A < 0) max(that, c A)
                   (Ye et al. 2020); the log-ratio is clamped to [-20, 20] first (as verl)
- k3 KL:           exp(ref - logp) - (ref - logp) - 1 per token (Schulman's k3 estimator),
                   ref - logp clamped to [-20, 20] and the term to [-10, 10] (as verl)
- dpo / rpo:       mean over pairs of -log sigmoid(beta ((pi_c - ref_c) - (pi_r - ref_r))) on
                   summed response log-probs, plus rpo_alpha times the chosen responses'
                   token-pooled NLL (TRL's DPOTrainer: loss_type sigmoid, and sft for RPO)
"""

from __future__ import annotations

import numpy as np

GROUP_STD_EPS = 1e-6  # GRPO's (r - mean) / (std + eps): a constant group gets advantage 0
LOG_RATIO_CLAMP = 20.0  # |log pi - log pi_old| cap before exp: e^20 is finite in fp16/bf16/fp32
K3_CLAMP = 10.0  # cap of the per-token k3 value (verl's low_var_kl)
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
ADVANTAGE_SCALES = ("group", "batch", "none")


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
    clip_eps_high: float | None = None,
) -> dict[str, float]:
    """PPO's clipped surrogate, token-pooled; also the clip fraction and ratio mean/max.

    rho is clipped to [1 - clip_eps, 1 + clip_eps_high] (DAPO's clip-higher; clip_eps_high
    defaults to clip_eps).
    """
    mask = np.asarray(mask, dtype=bool)
    log_ratio = np.asarray(log_probs, np.float64) - np.asarray(old_log_probs, np.float64)
    ratio = np.exp(np.clip(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    high = clip_eps if clip_eps_high is None else clip_eps_high
    adv = np.broadcast_to(np.asarray(advantages, np.float64)[:, None], ratio.shape)
    unclipped = -ratio * adv
    clipped = -np.clip(ratio, 1 - clip_eps, 1 + high) * adv
    loss = np.maximum(unclipped, clipped)
    if dual_clip is not None:
        loss = np.where(adv < 0, np.minimum(loss, -dual_clip * adv), loss)
    return {
        "loss": float(loss[mask].mean()),
        "clip_fraction": float((clipped > unclipped)[mask].mean()),
        "ratio_mean": float(ratio[mask].mean()),
        "ratio_max": float(ratio[mask].max()),
    }


def k3_terms(log_probs: np.ndarray, ref_log_probs: np.ndarray) -> np.ndarray:
    """Per-token k3 values exp(d) - d - 1, d = ref - logp clamped as verl does."""
    delta = np.clip(np.asarray(ref_log_probs, np.float64) - np.asarray(log_probs, np.float64),
                    -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return np.clip(np.exp(delta) - delta - 1, -K3_CLAMP, K3_CLAMP)


def k3_kl(log_probs: np.ndarray, ref_log_probs: np.ndarray, mask: np.ndarray) -> float:
    """Token-pooled k3 value on responses sampled from pi. Its expectation under pi is
    KL(pi || pi_ref), but its gradient (what the penalty trains) is that of KL(pi_ref || pi),
    as in GRPO, TRL and verl."""
    return float(k3_terms(log_probs, ref_log_probs)[np.asarray(mask, dtype=bool)].mean())


def aggregate_loss(per_token: np.ndarray, mask: np.ndarray, mode: str = "token_mean",
                   norm_tokens: int = 1) -> float:
    """One optimizer step's loss from per-token losses [N, L] (`training.loss_aggregation`).

    token_mean: sum over all tokens / their count (every token weighs the same);
    seq_mean_token_mean: mean over responses of each one's token mean (every response weighs
    the same); seq_mean_token_sum_norm: sum over all tokens / (N * norm_tokens) (Dr. GRPO: a
    constant divisor, so no length bias).
    """
    mask = np.asarray(mask, dtype=np.float64)
    values = np.asarray(per_token, dtype=np.float64) * mask
    if mode == "token_mean":
        return float(values.sum() / mask.sum())
    if mode == "seq_mean_token_mean":
        return float(np.mean(values.sum(axis=1) / np.maximum(mask.sum(axis=1), 1)))
    if mode == "seq_mean_token_sum_norm":
        return float(values.sum() / (len(values) * norm_tokens))
    raise ValueError(f"unknown loss aggregation {mode!r}; expected {', '.join(LOSS_AGGREGATIONS)}")


def group_advantages(rewards: np.ndarray, scale: str = "none", ddof: int = 1
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Per-prompt advantages of a [P, K] reward table and which prompts to keep.

    A = r - mean(group) (Reinforce-Rej, `scale="none"`), divided by std + eps with
    `scale="group"` (GRPO: the prompt's std) or `scale="batch"` (the std of all valid rewards
    of the table, as TRL's scale_rewards="batch"). `ddof` 1 is the unbiased std (TRL, verl).
    Prompts whose valid rewards are all equal (or fewer than two) carry no signal and are
    dropped (keep = False); NaN rewards get a NaN advantage.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    valid = ~np.isnan(rewards)
    count = valid.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(valid, rewards, 0.0).sum(axis=1) / np.maximum(count, 1)
        spread = (np.max(rewards, axis=1, initial=-np.inf, where=valid)
                  - np.min(rewards, axis=1, initial=np.inf, where=valid))
        advantages = rewards - mean[:, None]
        if scale == "group":
            advantages = advantages / (_std(rewards, ddof, axis=1)[:, None] + GROUP_STD_EPS)
        elif scale == "batch":
            advantages = advantages / (_std(rewards[valid], ddof) + GROUP_STD_EPS)
        elif scale != "none":
            raise ValueError(f"unknown advantage scale {scale!r}; expected "
                             f"{', '.join(ADVANTAGE_SCALES)}")
    keep = (count >= 2) & (spread > 0)
    return advantages, keep


def _std(values: np.ndarray, ddof: int, axis: int | None = None) -> np.ndarray:
    """Std of the valid (non-NaN) values with `ddof`; 0 where there are ddof or fewer."""
    valid = ~np.isnan(values)
    count = valid.sum(axis=axis)
    total = np.where(valid, values, 0.0).sum(axis=axis, keepdims=True)
    mean = total / np.maximum(valid.sum(axis=axis, keepdims=True), 1)
    squares = np.where(valid, (values - mean) ** 2, 0.0).sum(axis=axis)
    return np.sqrt(np.where(count > ddof, squares / np.maximum(count - ddof, 1), 0.0))


def transform_weights(rewards: np.ndarray, transform: str) -> np.ndarray:
    """Per-prompt weights from a [P, K] reward table: `none` (the reward itself), `minmax`
    ((r - min) / (max - min)) or `rank` (the dense rank among the prompt's distinct rewards,
    scaled to [0, 1]: 0 for the worst, 1 for the best, ties share). Under minmax and rank a
    prompt whose valid rewards are all equal (or who has one) gets 0, and the lowest reward
    of a prompt always gets 0: a wrong answer of a 0/1 reward is never trained on."""
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
            distinct = np.unique(values)
            dense = np.searchsorted(distinct, values)
            weights[p, valid] = dense / (distinct.size - 1) if distinct.size > 1 else 0.0
        else:
            raise ValueError(f"unknown weight transform {transform!r}; expected none, minmax "
                             "or rank")
    return weights


def overlong_penalty(lengths: np.ndarray, max_new_tokens: int, buffer: int,
                     factor: float) -> np.ndarray:
    """DAPO's soft overlong punishment, added to the reward: 0 up to max_new_tokens - buffer
    tokens, then falling linearly to -factor at max_new_tokens (and below beyond it). All zeros
    when `buffer` or `factor` is 0."""
    lengths = np.asarray(lengths, dtype=np.float64)
    if buffer <= 0 or factor == 0:
        return np.zeros_like(lengths)
    exceed = lengths - (max_new_tokens - buffer)
    return np.minimum(-exceed / buffer * factor, 0.0)


ROLLOUT_CORRECTIONS = ("none", "token_truncate", "token_mask", "sequence_truncate",
                       "sequence_mask")


def rollout_correction(train_log_probs: np.ndarray, sampler_log_probs: np.ndarray,
                       mask: np.ndarray, mode: str, cap: float) -> np.ndarray:
    """Per-token importance weights [N, L] that correct for sampling with other kernels than
    training's (vLLM, a bf16 decode): rho = pi_old(train) / pi_sampler per token (`token_*`)
    or the product over the response's masked tokens (`sequence_*`, one weight per response),
    then `*_truncate` caps it at `cap` and `*_mask` sets it to 0 above `cap` (TRL's
    vllm_importance_sampling_mode, verl's TIS / MIS). 1 where the sampler recorded nothing
    (NaN) and where `mask` is 0; all ones for mode "none"."""
    train = np.asarray(train_log_probs, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if mode == "none":
        return np.ones(train.shape)
    diff = np.nan_to_num(train - np.asarray(sampler_log_probs, dtype=np.float64)) * mask
    if mode.startswith("sequence_"):
        diff = np.broadcast_to(diff.sum(axis=1, keepdims=True), diff.shape)
    rho = np.exp(np.clip(diff, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    rho = np.minimum(rho, cap) if mode.endswith("_truncate") else np.where(rho > cap, 0.0, rho)
    return np.where(mask, rho, 1.0)


PAIR_RULES = ("best_worst", "all_pairs")


def preference_pairs(rewards: np.ndarray, rule: str = "best_worst", max_pairs: int = 1
                     ) -> np.ndarray:
    """(prompt, chosen, rejected) index triples [N, 3] from a [P, K] reward table (NaN: not a
    candidate, e.g. filtered or a repeat of an earlier response).

    best_worst: each prompt's best response against its worst (RLHFlow's iterative DPO; the
    first of equal rewards); all_pairs: every two responses with different rewards (with a 0/1
    reward each correct one against each incorrect one), the largest reward gap first, then
    the earliest samples, at most `max_pairs` per prompt. A chosen response always has a
    strictly higher reward than its rejected one: ties and all-equal prompts give no pair.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    triples = []
    for p, row in enumerate(rewards):
        valid = np.flatnonzero(~np.isnan(row))
        if valid.size < 2:
            continue
        if rule == "best_worst":
            candidates = [(valid[np.argmax(row[valid])], valid[np.argmin(row[valid])])]
        elif rule == "all_pairs":
            candidates = sorted(((i, j) for i in valid for j in valid),
                                key=lambda ij: (row[ij[1]] - row[ij[0]], ij[0] + ij[1], ij[0]))
        else:
            raise ValueError(f"unknown pair rule {rule!r}; expected {', '.join(PAIR_RULES)}")
        kept = [(int(i), int(j)) for i, j in candidates if row[i] > row[j]]
        triples += [(p, i, j) for i, j in kept[:max_pairs]]
    return np.array(triples, dtype=np.int64).reshape(-1, 3)


def nominal_pairs(rule: str, k: int, max_pairs: int) -> int:
    """Pairs per prompt at most (K responses): sizes the learning-rate schedule."""
    return 1 if rule == "best_worst" else min(max_pairs, k * (k - 1) // 2)


def dpo_loss(chosen: np.ndarray, chosen_mask: np.ndarray, rejected: np.ndarray,
             rejected_mask: np.ndarray, ref_chosen: np.ndarray, ref_rejected: np.ndarray,
             beta: float, rpo_alpha: float = 0.0) -> dict[str, float]:
    """TRL's sigmoid DPO loss of N pairs from per-token log-probs [N, L] (masks: the response
    tokens that count) and the reference's summed log-probs [N]; with `rpo_alpha`, plus that
    times the chosen tokens' pooled NLL (RPO). Also TRL's metrics: the implicit rewards
    beta (pi - ref) of chosen and rejected, their margin and how often chosen > rejected."""
    def summed(log_probs: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return (np.asarray(log_probs, np.float64) * np.asarray(mask, np.float64)).sum(axis=1)

    chosen_rewards = beta * (summed(chosen, chosen_mask) - np.asarray(ref_chosen, np.float64))
    rejected_rewards = beta * (summed(rejected, rejected_mask)
                               - np.asarray(ref_rejected, np.float64))
    margins = chosen_rewards - rejected_rewards
    loss = float(np.mean(np.logaddexp(0.0, -margins)))  # -log sigmoid(m), without overflow
    if rpo_alpha:
        loss += rpo_alpha * float(-summed(chosen, chosen_mask).sum()
                                  / np.asarray(chosen_mask, np.float64).sum())
    return {"loss": loss, "rewards_chosen": float(chosen_rewards.mean()),
            "rewards_rejected": float(rejected_rewards.mean()),
            "rewards_margin": float(margins.mean()),
            "rewards_accuracy": float(np.mean(chosen_rewards > rejected_rewards))}
