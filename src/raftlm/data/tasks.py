"""Built-in tasks: prompt rows generated in code or shipped with the package (GSM8K), so a run
needs no data files and downloads nothing."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from raftlm.data.gsm8k import GSM8K_TEST_SIZE, gsm8k_rows
from raftlm.errors import InvalidInput

TWO_DIGIT_PAIRS = [(a, b) for a in range(10, 100) for b in range(10, 100)]  # ordered
ARITHMETIC_EVAL_SIZE = 1000  # fixed, so a pair's split never depends on the sizes asked for


def _split_pairs(task: str, pairs: list[tuple[int, int]], split: str, n: int, seed: int
                 ) -> list[tuple[int, int]]:
    """The first ``n`` pairs of ``split``: one seeded shuffle of all pairs, whose first
    ARITHMETIC_EVAL_SIZE are ``eval`` and the rest ``train``, so the splits are disjoint
    whatever ``n`` is."""
    order = np.random.default_rng(seed).permutation(len(pairs))
    splits = {"eval": order[:ARITHMETIC_EVAL_SIZE], "train": order[ARITHMETIC_EVAL_SIZE:]}
    if split not in splits:
        raise InvalidInput(f"unknown split {split!r}; expected 'train' or 'eval'")
    chosen = splits[split]
    if not 0 <= n <= len(chosen):
        raise InvalidInput(f"{task} {split} split has {len(chosen)} prompts; asked for {n}")
    return [pairs[i] for i in chosen[:n]]


def arithmetic_rows(split: str, n: int, seed: int = 0) -> list[dict]:
    """Two-digit addition rows ``{"prompt": "What is a + b?", "answer": "a+b"}`` over all
    90 * 90 ordered pairs."""
    return [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)}
            for a, b in _split_pairs("arithmetic", TWO_DIGIT_PAIRS, split, n, seed)]


def larger_rows(split: str, n: int, seed: int = 0) -> list[dict]:
    """Comparison rows ``{"prompt": "Which number is larger, a or b?", "answer": "max"}`` over
    ordered pairs of distinct two-digit numbers. A verifiable task of another kind than
    addition: the answer is one of the numbers in the prompt, so imitating the format alone is
    not enough."""
    pairs = [(a, b) for a, b in TWO_DIGIT_PAIRS if a != b]
    return [{"prompt": f"Which number is larger, {a} or {b}?", "answer": str(max(a, b))}
            for a, b in _split_pairs("larger", pairs, split, n, seed)]


def multiplication_rows(split: str, n: int, seed: int = 0) -> list[dict]:
    """Two-digit multiplication rows ``{"prompt": "What is a * b?", "answer": "a*b"}`` over all
    90 * 90 ordered pairs. The low-signal task: the embedded SmolLM2-135M gets few right even in
    K samples, so most prompts of a stage give RAFT nothing to keep (docs/sampling.md)."""
    return [{"prompt": f"What is {a} * {b}?", "answer": str(a * b)}
            for a, b in _split_pairs("multiplication", TWO_DIGIT_PAIRS, split, n, seed)]


TASKS: dict[str, Callable[[str, int, int], list[dict]]] = {
    "arithmetic": arithmetic_rows,
    "larger": larger_rows,
    "multiplication": multiplication_rows,
    "gsm8k": gsm8k_rows,
}


def builtin_task_rows(task: str, split: str, n: int, seed: int) -> list[dict]:
    """Rows of a built-in task by name."""
    if task not in TASKS:
        raise InvalidInput(f"unknown task {task!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[task](split, n, seed)

_EVAL_SIZES = {"gsm8k": GSM8K_TEST_SIZE}  # the generated tasks hold out ARITHMETIC_EVAL_SIZE


def eval_split_size(task: str) -> int:
    """How many prompts the task's held-out split has."""
    if task not in TASKS:
        raise InvalidInput(f"unknown task {task!r}; known tasks: {', '.join(sorted(TASKS))}")
    return _EVAL_SIZES.get(task, ARITHMETIC_EVAL_SIZE)


def with_shots(task: str, rows: list[dict], shots: int, seed: int) -> list[dict]:
    """`rows` as k-shot chat prompts: the first `shots` problems of the task's train split as
    earlier user/assistant turns (the assistant says the row's `solution`, else its `answer`),
    then the row's own prompt. The train split never overlaps the held-out one."""
    if shots == 0:
        return rows
    examples = builtin_task_rows(task, "train", shots, seed)
    turns = []
    for example in examples:
        turns += [{"role": "user", "content": example["prompt"]},
                  {"role": "assistant", "content": example.get("solution", example["answer"])}]
    return [{**row, "prompt": [*turns, {"role": "user", "content": row["prompt"]}]}
            for row in rows]
