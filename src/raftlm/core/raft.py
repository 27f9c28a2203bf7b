"""NumPy core of RAFT (Reward rAnked FineTuning): sample K responses per prompt, rank
them by reward, fine-tune on the best ones. Framework-free, so the torch loop and the
tests share one definition of "which responses are kept".

Selectors take rewards of shape [..., K] (K candidates per prompt on the last axis). A NaN
reward marks an invalid or filtered candidate: mask selectors never select it, so a prompt
whose rewards are all NaN selects nothing. Only NaN is special; -inf is a (bad) reward.
Error messages locate entries as "stage t, prompt p, response k, token l".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from raftlm.core.checks import (
    as_sequence,
    check_fraction,
    check_positive_int,
    counts_match,
    is_real,
    loc,
    log_prob_error,
    real_vector,
    reward_error,
)

__all__ = [
    "best_per_prompt",
    "best_per_prompt_mask",
    "raft_alignment",
    "raft_iteration",
    "token_pooled_nll",
    "top_fraction_mask",
    "top_k_per_prompt_mask",
]

# --------------------------------------------------------------------------- selectors


def _reward_array(rewards: object) -> np.ndarray:
    arr = np.asarray(rewards, dtype=np.float64)
    if arr.ndim < 1 or arr.shape[-1] == 0:
        raise ValueError(f"rewards must have shape [..., K] with K >= 1, got {arr.shape}")
    return arr


def _best_index(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first index of the largest non-NaN reward, whether there is one) per prompt."""
    valid = ~np.isnan(r)
    if valid.all():
        return np.argmax(r, axis=-1), np.ones(r.shape[:-1], dtype=bool)
    # np.argmax would return a NaN (NaN wins max) and np.nanargmax confuses NaN with a
    # -inf reward, so look for the first valid entry equal to the valid maximum.
    filled = np.where(valid, r, -np.inf)
    hits = valid & (filled == filled.max(axis=-1, keepdims=True))
    return np.argmax(hits, axis=-1), hits.any(axis=-1)


def best_per_prompt(rewards: np.ndarray) -> np.ndarray:
    """Index of the best candidate of each prompt: rewards [..., K] -> int array [...].

    Ties go to the first index. NaN rewards are skipped; a prompt whose rewards are all
    NaN has no best candidate and raises ValueError (`best_per_prompt_mask` selects
    nothing for it instead).
    """
    r = _reward_array(rewards)
    best, found = _best_index(r)
    if not found.all():
        where = tuple(int(i) for i in np.argwhere(~found)[0])
        raise ValueError(f"prompt at index {where} has only NaN rewards")
    return best


def best_per_prompt_mask(rewards: np.ndarray) -> np.ndarray:
    """Boolean mask [..., K] with the best candidate of each prompt set (first on ties).

    A prompt whose rewards are all NaN selects nothing.
    """
    r = _reward_array(rewards)
    best, found = _best_index(r)
    return (np.arange(r.shape[-1]) == best[..., None]) & found[..., None]


def top_k_per_prompt_mask(rewards: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask [..., K] selecting the k best candidates of each prompt.

    Among equal rewards the lower index is preferred. NaN rewards are never selected,
    so a prompt with fewer than k non-NaN rewards selects all of those.
    """
    k = check_positive_int(k, "k")
    r = _reward_array(rewards)
    # A stable ascending sort of -r lists the best first, lower index first among ties,
    # and NumPy sorts NaN last.
    order = np.argsort(-r, axis=-1, kind="stable")[..., :k]
    mask = np.zeros(r.shape, dtype=bool)
    np.put_along_axis(mask, order, True, axis=-1)
    return mask & ~np.isnan(r)


def top_fraction_mask(rewards: np.ndarray, fraction: float, n_candidates: int | None = None,
                      tie_break: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask selecting the global top `fraction` of all candidates: max(1,
    int(n_candidates * fraction)) of them, `n_candidates` defaulting to the size of `rewards`
    (NaN included; a padded table passes its real count). Ties go to the smaller `tie_break`
    key (random keys: fair across prompts), else to the earlier flat (C-order) index. NaN is
    never selected, so fewer may be selected when NaNs rank inside the count."""
    fraction = check_fraction(fraction, "fraction")
    r = _reward_array(rewards)
    count = max(1, int((r.size if n_candidates is None else n_candidates) * fraction))
    if tie_break is None:
        order = np.argsort(-r.ravel(), kind="stable")[:count]
    else:
        order = np.lexsort((np.asarray(tie_break).ravel(), -r.ravel()))[:count]
    mask = np.zeros(r.size, dtype=bool)
    mask[order] = True
    return mask.reshape(r.shape) & ~np.isnan(r)


# --------------------------------------------------------------------------- losses


def _pooled_nll(row_sums: np.ndarray, n_tokens: int) -> float:
    """-sum(row_sums) / n_tokens as a Python float."""
    if n_tokens == 0:
        raise ValueError("no tokens to average over")
    # Summing per-response sums (rather than one flat concatenation) makes the dense and
    # ragged paths add in the same order, hence agree bit for bit.
    return float(-np.sum(row_sums) / n_tokens)


def token_pooled_nll(log_probs: Any, mask: Any = None) -> float:
    """Mean negative log-likelihood over all tokens, pooled across responses.

    `log_probs` is a rectangular array [N, L], optionally with a boolean or 0/1 `mask`
    of the same shape (False/0 = padding, ignored even if it holds NaN), or a sequence
    of 1-D arrays of any lengths. Pooling is token-weighted: a 4-token response weighs
    4 times a 1-token one. Values are not validated (`raft_alignment` does that).
    """
    dense = isinstance(log_probs, np.ndarray) and log_probs.dtype != object
    if mask is None and not dense:
        rows = [np.asarray(row, dtype=np.float64) for row in log_probs]
        if any(row.ndim != 1 for row in rows):
            raise ValueError("each response must be a 1-D sequence of log-probabilities")
        sums = np.array([row.sum() for row in rows])
        return _pooled_nll(sums, sum(row.size for row in rows))
    lp = np.asarray(log_probs, dtype=np.float64)
    if lp.ndim != 2:
        raise ValueError(f"rectangular log_probs must be 2-D [N, L], got shape {lp.shape}")
    if mask is None:
        return _pooled_nll(lp.sum(axis=1), lp.size)
    keep = np.asarray(mask).astype(bool)
    if keep.shape != lp.shape:
        raise ValueError(f"mask shape {keep.shape} differs from log_probs shape {lp.shape}")
    return _pooled_nll(np.where(keep, lp, 0.0).sum(axis=1), int(keep.sum()))


def _as_dense(log_probs: Any, rewards: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """Float arrays [T,P,K,L] and [T,P,K] if the input is clean and rectangular, else None.

    Anything else goes to the ragged path, which also pinpoints structural errors.
    """
    if not isinstance(log_probs, np.ndarray) or log_probs.dtype.kind not in "iuf":
        return None
    try:
        r = np.asarray(rewards)
    except (TypeError, ValueError):
        return None
    if log_probs.ndim != 4 or 0 in log_probs.shape or r.dtype.kind not in "iuf":
        return None
    if r.shape != log_probs.shape[:3]:
        return None
    return log_probs.astype(np.float64, copy=False), r.astype(np.float64, copy=False)


def _first(bad: np.ndarray) -> tuple[int, ...]:
    # argmax stops at the first True; np.argwhere would list every bad entry first.
    return tuple(int(i) for i in np.unravel_index(np.argmax(bad), bad.shape))


def _alignment_dense(lp: np.ndarray, rewards: np.ndarray) -> list[float]:
    bad_reward = ~np.isfinite(rewards)
    if bad_reward.any():
        where = _first(bad_reward)
        raise reward_error(where, rewards[where])
    # The row sums are needed anyway; a NaN or inf token makes its row sum non-finite,
    # so two cheap reductions validate everything and the exact culprit is only looked
    # up on failure. An overflowing sum of finite values finds no culprit and passes.
    row_sums = lp.sum(axis=-1)
    if not (np.isfinite(row_sums).all() and lp.max() <= 0):
        bad = ~np.isfinite(lp) | (lp > 0)
        if bad.any():
            where = _first(bad)
            raise log_prob_error(where, lp[where])
    best = best_per_prompt(rewards)  # [T, P]
    chosen = np.take_along_axis(row_sums, best[..., None], axis=-1)[..., 0]  # [T, P]
    n_tokens = lp.shape[1] * lp.shape[3]
    return [round(_pooled_nll(stage, n_tokens), 4) for stage in chosen]


def _checked_log_probs(response: Any, index: tuple[int, int, int]) -> np.ndarray:
    row = real_vector(response, loc(*index), "token")
    if row.size == 0:
        raise ValueError(f"{loc(*index)}: response has no tokens")
    bad = np.flatnonzero(~np.isfinite(row) | (row > 0))
    if bad.size:
        raise log_prob_error((*index, bad[0]), row[bad[0]])
    return row


def _stage_loss_ragged(t: int, stage_lp: Any, stage_rw: Any) -> float:
    prompts_lp, prompts_rw = as_sequence(stage_lp, loc(t)), as_sequence(stage_rw, loc(t))
    counts_match(len(prompts_lp), len(prompts_rw), loc(t), "prompts")
    sums, n_tokens = [], 0
    for p, (responses, rewards) in enumerate(zip(prompts_lp, prompts_rw, strict=True)):
        responses = as_sequence(responses, loc(t, p))
        rewards = real_vector(rewards, loc(t, p), "response")
        counts_match(len(responses), len(rewards), loc(t, p), "responses")
        bad = np.flatnonzero(~np.isfinite(rewards))
        if bad.size:
            raise reward_error((t, p, bad[0]), rewards[bad[0]])
        # Every response is checked, not only the selected one, as on the dense path.
        rows = [_checked_log_probs(resp, (t, p, k)) for k, resp in enumerate(responses)]
        best = rows[int(np.argmax(rewards))]  # rewards are finite: first maximum wins
        sums.append(best.sum())
        n_tokens += best.size
    return round(_pooled_nll(np.array(sums), n_tokens), 4)


def raft_alignment(stages_log_probs: Any, stages_rewards: Any) -> list[float]:
    """Per-stage RAFT SFT loss on the best response of every prompt.

    `stages_log_probs[t][p][k][l]` is the log-probability of token l of response k to
    prompt p at stage t, and `stages_rewards[t][p][k]` that response's reward. For each
    stage and prompt the response with the largest reward is kept (the first on ties);
    the stage's loss is the mean negative log-likelihood over all tokens of the kept
    responses, pooled over the stage's prompts (token-weighted), rounded to 4 decimals.

    Responses may differ in length (nested sequences). A numeric 4-D array [T,P,K,L]
    with rewards [T,P,K] takes a vectorised path with the same results.

    Raises ValueError or TypeError naming the stage, prompt, response (and token) for:
    T, P or K differing between the arguments; an empty stage, prompt or response; a
    non-numeric entry (TypeError); a NaN or infinite reward or log-probability; a
    log-probability above 0. No stages give an empty list.
    """
    dense = _as_dense(stages_log_probs, stages_rewards)
    if dense is not None:
        return _alignment_dense(*dense)
    lp_stages = as_sequence(stages_log_probs, "stages_log_probs")
    rw_stages = as_sequence(stages_rewards, "stages_rewards")
    if len(lp_stages) != len(rw_stages):
        raise ValueError(
            f"{len(lp_stages)} stages of log-probabilities but {len(rw_stages)} of rewards"
        )
    pairs = enumerate(zip(lp_stages, rw_stages, strict=True))
    return [_stage_loss_ragged(t, lp, rw) for t, (lp, rw) in pairs]


# --------------------------------------------------------------------------- RAFT step


def _policy_logits(policy_logits: Any) -> np.ndarray:
    """A float64 copy of the [P, V] logits (the caller's array is never modified)."""
    try:
        logits = np.array(policy_logits, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"policy_logits must be a [P][V] array of real numbers: {err}") from err
    if logits.ndim != 2 or 0 in logits.shape:
        raise ValueError(f"policy_logits must have shape [P, V] with P, V >= 1, got {logits.shape}")
    bad = ~np.isfinite(logits)
    if bad.any():
        p, v = _first(bad)
        raise ValueError(f"policy_logits: prompt {p}, token {v}: logit is {logits[p, v]}")
    return logits


def _softmax(logits: np.ndarray) -> np.ndarray:
    # Subtracting the max keeps exp() from overflowing; the result is unchanged.
    e = np.exp(logits - logits.max())
    return e / e.sum()


def _checked_reward(reward: object, prompt: int, candidate: int) -> object:
    if not is_real(reward):
        raise TypeError(
            f"prompt {prompt}, candidate {candidate}: reward_fn returned {reward!r}; "
            "expected a real number"
        )
    if not math.isfinite(reward):  # type: ignore[arg-type]
        raise ValueError(
            f"prompt {prompt}, candidate {candidate}: reward_fn returned {reward}; "
            "rewards must be finite"
        )
    return reward


def raft_iteration(
    policy_logits: Any,
    prompts: Sequence[Any],
    reward_fn: Callable[[Any, int], float],
    n_candidates: int = 8,
    top_fraction: float = 0.25,
    lr: float = 1e-3,
    *,
    rng: np.random.Generator | np.random.RandomState | None = None,
) -> dict[str, Any]:
    """One RAFT step on per-prompt categorical policies over V tokens.

    For each prompt p, draw `n_candidates` tokens from softmax(policy_logits[p]), score
    each with `reward_fn(prompts[p], token)`, keep the top_k = max(1, int(n_candidates *
    top_fraction)) best (np.argsort order, best last) and add `lr * reward` to the logit
    of every kept token (a token kept twice gets both increments).

    Sampling uses `rng` (a Generator or RandomState) or, when None, NumPy's global
    RandomState: one draw per candidate, prompt by prompt, so `np.random.seed(s)`
    reproduces the straightforward loop with one `np.random.choice(V, p=p)` per draw.

    Returns {"updated_logits": new float array [P, V], "mean_reward": mean reward of all
    kept candidates, "n_selected": number kept}. The input logits are not modified.
    """
    logits = _policy_logits(policy_logits)
    n_prompts, vocab = logits.shape
    if len(prompts) != n_prompts:
        raise ValueError(f"{len(prompts)} prompts but policy_logits has {n_prompts} rows")
    n_candidates = check_positive_int(n_candidates, "n_candidates")
    top_k = max(1, int(n_candidates * check_fraction(top_fraction, "top_fraction")))
    if not is_real(lr):
        raise TypeError(f"lr must be a real number, got {lr!r}")
    if not math.isfinite(lr):
        raise ValueError(f"lr must be finite, got {lr}")
    sampler = np.random if rng is None else rng  # module functions use the global state
    updated = logits.copy()
    kept_rewards = []
    for i, prompt in enumerate(prompts):
        # One size-K draw reads the same K uniforms in the same order as K single draws.
        tokens = sampler.choice(vocab, size=n_candidates, p=_softmax(logits[i]))
        rewards = [
            _checked_reward(reward_fn(prompt, int(tok)), i, c) for c, tok in enumerate(tokens)
        ]
        # argsort of the raw list, as the reference loop does, so ties break identically.
        keep = np.argsort(rewards)[-top_k:]
        gains = np.asarray(rewards, dtype=np.float64)[keep]
        np.add.at(updated[i], tokens[keep], lr * gains)  # unbuffered: duplicates accumulate
        kept_rewards.append(gains)
    kept = np.concatenate(kept_rewards)
    return {
        "updated_logits": updated,
        "mean_reward": float(np.mean(kept)),
        "n_selected": int(kept.size),
    }
