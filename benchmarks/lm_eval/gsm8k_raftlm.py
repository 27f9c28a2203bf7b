"""lm-evaluation-harness hooks of `gsm8k_raftlm.yaml`: raftlm's GSM8K rows and answer rules, so
the harness and `raftlm eval --preset gsm8k` read the same items the same way."""

from __future__ import annotations

from typing import Any

from raftlm.data.gsm8k import GSM8K_TEST_SIZE, gsm8k_rows
from raftlm.evaluation.extraction import EXTRACTIONS

RULES = ("strict", "lenient")


def test_split(**_: Any) -> dict[str, Any]:
    """The GSM8K test set as raftlm builds it ({"prompt", "answer", "solution"} rows)."""
    import datasets

    return {"test": datasets.Dataset.from_list(gsm8k_rows("eval", GSM8K_TEST_SIZE))}


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """1.0 or 0.0 per rule for the one greedy response."""
    return {rule: float(EXTRACTIONS[rule].check(results[0], doc["answer"])[1]) for rule in RULES}
