"""Reference math of the collectors (`raft.collector`, docs/sampling.md), NumPy only.

- `has_reward_spread`: the useful-prompt test of group objectives (GRPO, Reinforce-Rej): a
  prompt teaches them something only when its rewards are not all equal.
- GVM-RAFT's allocation (Yao et al., "Optimizing Chain-of-Thought Reasoners via Gradient
  Variance Minimization in Rejection Sampling and RL", NeurIPS 2025; code RLHFlow/GVM): after a
  first round, prompt i gets a share of the stage's sample budget proportional to

      w_i = G_i / sqrt(p_i + alpha / p_i^(beta - 1))        (0 where p_i = 0 or G_i = 0)

  with p_i its acceptance rate and G_i the mean gradient norm of its accepted responses
  (`gvm_weights`); `allocate_samples` turns the shares into whole counts between a per-prompt
  minimum and maximum that add up to the budget. `logit_gradient_norm` is the documented
  stand-in for G_i that costs nothing: it reads the log-probs the sampler recorded.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def has_reward_spread(rewards: np.ndarray) -> np.ndarray:
    """bool [P]: the prompts of a [P, K] reward table (NaN = not eligible) with at least two
    eligible rewards that are not all equal — those whose group advantages are not all 0."""
    r = np.asarray(rewards, dtype=np.float64)
    valid = ~np.isnan(r)
    high = np.max(r, axis=1, initial=-np.inf, where=valid)
    low = np.min(r, axis=1, initial=np.inf, where=valid)
    return (valid.sum(axis=1) >= 2) & (high > low)


def acceptance_rates(accepted: np.ndarray, counts: Sequence[int]) -> np.ndarray:
    """float [P]: the share of each prompt's `counts[i]` samples that were accepted (a [P, K]
    bool table, False where padded); 0 for a prompt without samples."""
    counts = np.asarray(counts, dtype=np.float64)
    hits = np.asarray(accepted, dtype=bool).sum(axis=1)
    return np.divide(hits, counts, out=np.zeros(len(counts)), where=counts > 0)


def logit_gradient_norm(token_log_probs: Sequence[float]) -> float:
    """||d log pi(y) / d logits||, the logits of every response position stacked, from the
    log-prob of each sampled token alone: at a position where the token had probability q, the
    gradient softmax - onehot has norm between (1 - q) and sqrt(2) (1 - q), so this returns
    sqrt(sum_t (1 - q_t)^2), the norm up to a factor of at most sqrt(2). A proxy for GVM's G_i
    (RLHFlow/GVM differentiates log pi(y) with respect to the embedding matrix instead)."""
    q = np.exp(np.asarray(token_log_probs, dtype=np.float64))
    return float(np.sqrt(np.sum((1.0 - q) ** 2)))


def mean_accepted(values: np.ndarray, accepted: np.ndarray) -> np.ndarray:
    """float [P]: the mean of each prompt's `values` [P, K] over its accepted samples; 0 where
    it has none (GVM's G_i from per-response gradient norms)."""
    accepted = np.asarray(accepted, dtype=bool)
    sums = np.where(accepted, np.asarray(values, dtype=np.float64), 0.0).sum(axis=1)
    hits = accepted.sum(axis=1)
    return np.divide(sums, hits, out=np.zeros(len(hits)), where=hits > 0)


def gvm_weights(accept_rate: np.ndarray, grad_norm: np.ndarray, alpha: float = 1e-3,
                beta: float = 2.0) -> np.ndarray:
    """GVM's per-prompt share of the budget, G / sqrt(p + alpha / p^(beta - 1)) (unnormalised).

    Minimising the variance of the stochastic gradient sum_i G_i^2 / (n_i p_i) under a budget
    sum_i n_i gives n_i ~ G_i / sqrt(p_i); the alpha term (RLHFlow/GVM's defaults: alpha =
    1e-3, beta = 2) damps prompts that are almost never accepted, which would otherwise draw
    the whole budget. A prompt never accepted (p = 0) or without gradient (G = 0) gets 0."""
    p = np.asarray(accept_rate, dtype=np.float64)
    g = np.asarray(grad_norm, dtype=np.float64)
    live = (p > 0) & (g > 0)
    safe = np.where(live, p, 1.0)
    return np.where(live, g / np.sqrt(safe + alpha / safe ** (beta - 1.0)), 0.0)


def allocate_samples(weights: np.ndarray, budget: int, minimum: int, maximum: int) -> np.ndarray:
    """int [P] sample counts: as close to proportional to `weights` as the bounds allow,
    between `minimum` and `maximum` each, adding up to `budget`.

    A prompt of weight 0 keeps `minimum`. The budget is clamped to what the bounds allow
    (at least P * minimum; at most `maximum` for every prompt of positive weight), and when no
    weight is positive the rest is spread evenly (every prompt as alike as under fixed
    sampling). Continuous counts clip(c * w_i, minimum, maximum) with c found by bisection,
    then whole numbers: each rounded down, and the units left go to the largest remainders
    (ties: the earlier prompt). Deterministic: the same inputs give the same counts everywhere.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or np.any(~np.isfinite(w)) or np.any(w < 0):
        raise ValueError("weights: expected a 1-D array of finite values >= 0")
    if not 0 <= minimum <= maximum:
        raise ValueError(f"expected 0 <= minimum <= maximum, got {minimum}, {maximum}")
    if not w.any():
        w = np.ones_like(w)
    low = np.full(len(w), float(minimum))
    high = np.where(w > 0, float(maximum), float(minimum))
    total = int(min(max(budget, low.sum()), high.sum()))

    def counts(c: float) -> np.ndarray:
        return np.clip(c * w, low, high)

    lo_c, hi_c = 0.0, float(maximum) / w[w > 0].min() if w.any() else 0.0
    for _ in range(200):  # counts(c).sum() rises with c; keep lo_c on the side <= total
        mid = (lo_c + hi_c) / 2
        lo_c, hi_c = (mid, hi_c) if counts(mid).sum() <= total else (lo_c, mid)
    exact = counts(hi_c) if counts(hi_c).sum() <= total else counts(lo_c)
    whole = np.floor(exact + 1e-9).astype(np.int64)
    order = np.lexsort((np.arange(len(w)), -(exact - whole)))  # largest remainder first
    left = total - int(whole.sum())
    while left > 0:  # sum(high) >= total: some prompt always has room
        for i in order:
            if left and whole[i] < high[i]:
                whole[i] += 1
                left -= 1
    return whole


def gvm_allocation(accepted: np.ndarray, grad_norms: np.ndarray, counts: Sequence[int],
                   budget: int, minimum: int, maximum: int, alpha: float = 1e-3,
                   beta: float = 2.0) -> np.ndarray:
    """GVM-RAFT's sample counts from a first round: `accepted` [P, K] bool, `grad_norms`
    [P, K] each response's gradient norm (or 1), `counts` [P] first-round samples; the rest as
    `allocate_samples`."""
    p = acceptance_rates(accepted, counts)
    g = mean_accepted(grad_norms, accepted)
    return allocate_samples(gvm_weights(p, g, alpha, beta), budget, minimum, maximum)
