"""Built-in tasks: prompt rows generated in code, so a run needs no data files."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

ARITHMETIC_EVAL_SIZE = 1000  # fixed, so a pair's split never depends on the sizes asked for


def arithmetic_rows(split: str, n: int, seed: int = 0) -> list[dict]:
    """Two-digit addition rows ``{"prompt": "What is a + b?", "answer": "a+b"}``.

    All 90 * 90 ordered pairs are shuffled once with ``seed``; the first 1000 are ``eval``,
    the rest ``train``, so the splits are disjoint whatever ``n`` is. Returns the first ``n``.
    """
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    order = np.random.default_rng(seed).permutation(len(pairs))
    splits = {"eval": order[:ARITHMETIC_EVAL_SIZE], "train": order[ARITHMETIC_EVAL_SIZE:]}
    if split not in splits:
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'eval'")
    chosen = splits[split]
    if not 0 <= n <= len(chosen):
        raise ValueError(f"arithmetic {split} split has {len(chosen)} prompts; asked for {n}")
    rows = []
    for index in chosen[:n]:
        a, b = pairs[index]
        rows.append({"prompt": f"What is {a} + {b}?", "answer": str(a + b)})
    return rows


def larger_rows(split: str, n: int, seed: int = 0) -> list[dict]:
    """Comparison rows ``{"prompt": "Which number is larger, a or b?", "answer": "max"}``.

    Ordered pairs of distinct two-digit numbers, split like `arithmetic_rows` (the first 1000
    of one seeded shuffle are ``eval``). A verifiable task of another kind than addition: the
    answer is one of the numbers in the prompt, so imitating the format alone is not enough.
    """
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100) if a != b]
    order = np.random.default_rng(seed).permutation(len(pairs))
    splits = {"eval": order[:ARITHMETIC_EVAL_SIZE], "train": order[ARITHMETIC_EVAL_SIZE:]}
    if split not in splits:
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'eval'")
    chosen = splits[split]
    if not 0 <= n <= len(chosen):
        raise ValueError(f"larger {split} split has {len(chosen)} prompts; asked for {n}")
    return [
        {"prompt": f"Which number is larger, {a} or {b}?", "answer": str(max(a, b))}
        for a, b in (pairs[i] for i in chosen[:n])
    ]


TASKS: dict[str, Callable[[str, int, int], list[dict]]] = {
    "arithmetic": arithmetic_rows,
    "larger": larger_rows,
}


def builtin_task_rows(task: str, split: str, n: int, seed: int) -> list[dict]:
    """Rows of a built-in task by name."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[task](split, n, seed)
