"""NumPy references of the evaluation metrics over n samples per prompt (no torch).

- pass@k, unbiased (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"): with
  c of a prompt's n samples correct, pass@k = 1 - C(n-c, k) / C(n, k), the chance that k samples
  drawn without replacement from the n contain a correct one; averaged over prompts. Not "any of
  k" of the first k samples, whose variance is larger; at k = n the two agree.
- avg@n: mean accuracy of the n samples (pooled over prompts, each prompt weighing n).
- maj@n: the answer most of a prompt's n samples give (majority vote over *extracted* answers,
  samples without an answer do not vote) is the prompt's answer; mean over prompts of it being
  right (as judged on the samples that gave it). A tie goes to the tied answer that appears
  first among the samples (the lowest sample index), so the vote never depends on hashing or
  set order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k) for one prompt: n samples, c correct, k drawn (1 <= k <= n).

    Computed as 1 - prod_{i=n-c+1..n} (1 - k/i) (Chen et al.'s form): no factorials, so no
    overflow at large n and no cancellation between huge binomials."""
    if not 1 <= k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k_curve(correct: np.ndarray) -> dict[int, float]:
    """{k: pass@k averaged over prompts} for every k = 1..n of a [prompts, n] 0/1 table."""
    correct = np.asarray(correct, dtype=bool)
    if correct.ndim != 2 or correct.shape[0] == 0 or correct.shape[1] == 0:
        raise ValueError(f"expected a non-empty [prompts, n] table, got shape {correct.shape}")
    n = correct.shape[1]
    counts = correct.sum(axis=1)
    return {k: float(np.mean([pass_at_k(n, int(c), k) for c in counts])) for k in range(1, n + 1)}


def avg_at_n(correct: np.ndarray) -> float:
    """Mean accuracy of all samples of a [prompts, n] 0/1 table."""
    return float(np.mean(np.asarray(correct, dtype=float)))


def majority_answer(answers: Sequence[str | None]) -> str | None:
    """The answer most samples give; None votes for nothing; a tie goes to the tied answer
    seen first. None when no sample has an answer."""
    counts: dict[str, int] = {}
    for answer in answers:  # dicts keep insertion order: the first-seen order breaks ties
        if answer is not None:
            counts[answer] = counts.get(answer, 0) + 1
    if not counts:
        return None
    top = max(counts.values())
    return next(answer for answer, count in counts.items() if count == top)


def maj_at_n(answers: Sequence[Sequence[str | None]], correct: np.ndarray) -> float:
    """Mean over prompts of the majority answer being right: `answers` and the 0/1 `correct`
    are [prompts, n]; the vote is right when the samples giving the winning answer were judged
    right (a prompt whose samples give no answer counts as wrong). Judged by the samples, not
    by comparing strings again, so any answer rule (math-verify's equivalence too) votes."""
    correct = np.asarray(correct, dtype=bool)
    if len(answers) != correct.shape[0] or not len(answers):
        raise ValueError(f"{len(answers)} answer rows vs {correct.shape[0]} correctness rows")
    right = []
    for row, judged in zip(answers, correct):
        winner = majority_answer(row)
        right.append(winner is not None and bool(judged[list(row).index(winner)]))
    return float(np.mean(right))
