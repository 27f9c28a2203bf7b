"""GSM8K, shipped inside the package (`raftlm/data/gsm8k/`, MIT; nothing downloads).

A row as raftlm hands it on: ``{"prompt": question + GSM8K_INSTRUCTION, "answer": "18",
"solution": the worked solution without its calculator annotations}``. `answer` is the number
after the solution's "####" (`evaluation.extraction.parse_reference`'s rule, which the
`numeric_answer` reward and every extraction compare with); the shipped files themselves stay
byte for byte the originals.
"""

from __future__ import annotations

import functools
import json
import re
from importlib import resources

from raftlm.errors import InvalidInput

GSM8K_TEST_SIZE = 1319  # rows of test.jsonl (a test reads the file)
SPLITS = {"train": "train.jsonl", "eval": "test.jsonl"}  # raftlm's split names -> files
GSM8K_INSTRUCTION = ("\nSolve it step by step, then give the final answer on its own line as "
                     "\"#### <number>\".")
_CALCULATOR = re.compile(r"<<[^>]*>>")


def gsm8k_file(split: str) -> resources.abc.Traversable:
    """The shipped file of `split` ('train' or 'eval', the test set)."""
    if split not in SPLITS:
        raise InvalidInput(f"unknown split {split!r}; expected 'train' or 'eval'")
    return resources.files("raftlm.data").joinpath("gsm8k", SPLITS[split])


@functools.cache  # the files never change; reading the train split takes ~0.1 s
def gsm8k_originals(split: str) -> tuple[dict, ...]:
    """The rows of the shipped file, as written there (`question`, `answer`)."""
    lines = gsm8k_file(split).read_text(encoding="utf-8").splitlines()
    return tuple(json.loads(line) for line in lines if line.strip())


def gsm8k_rows(split: str, n: int, seed: int = 0) -> list[dict]:
    """The first `n` problems of `split` in file order (the seed is unused: the splits are
    GSM8K's own, and PromptOrder shuffles training prompts anyway)."""
    originals = gsm8k_originals(split)
    if not 0 <= n <= len(originals):
        raise InvalidInput(f"gsm8k {split} split has {len(originals)} prompts; asked for {n}")
    return [gsm8k_row(row) for row in originals[:n]]


def gsm8k_row(row: dict) -> dict:
    """One shipped row as a prompt row (see the module docstring)."""
    solution = row["answer"]
    return {"prompt": row["question"] + GSM8K_INSTRUCTION,
            "answer": solution.rsplit("####", 1)[1].strip().replace(",", ""),
            "solution": _CALCULATOR.sub("", solution)}
