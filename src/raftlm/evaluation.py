"""Evaluate the policy on held-out prompts: greedy reward, accuracy, response length."""

from __future__ import annotations

from typing import Any

import numpy as np

from raftlm.config import RaftConfig
from raftlm.generation import Completion, generate
from raftlm.prompts import PromptRecord, PromptSet
from raftlm.rewards import Reward, RewardResult, math_answer, numeric_answer


def score(reward: Reward, records: list[PromptRecord], completions: list[list[Completion]]
          ) -> RewardResult:
    """Score every completion of every record; the result is flat, prompt-major."""
    flat_records = [r for r, row in zip(records, completions) for _ in row]
    texts = [c.text for row in completions for c in row]
    keys = sorted({key for r in records for key in r.columns})
    columns = {key: [r.columns.get(key) for r in flat_records] for key in keys}
    return reward([r.prompt for r in flat_records], texts, columns)


def accuracy_check(config: RaftConfig, prompts: PromptSet) -> Any:
    """The verifiable check behind `eval/accuracy`, or None when there are no references."""
    if not prompts.records or "answer" not in prompts.records[0].columns:
        return None
    names = {term.name for term in config.reward.terms}
    return math_answer if "math_answer" in names else numeric_answer


def evaluate(policy: Any, tokenizer: Any, prompts: PromptSet, reward: Reward,
             config: RaftConfig) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Greedy responses to every held-out prompt; returns metrics and the responses."""
    records = prompts.records
    completions = generate(
        policy, tokenizer, [r.token_ids for r in records], 1, config.generation,
        greedy=True, desc="eval", max_new_tokens=config.evaluation.max_new_tokens,
    )
    result = score(reward, records, completions)
    texts = [row[0].text for row in completions]
    metrics = {
        "eval/reward_mean": float(np.nanmean(result.scores)),
        "eval/response_tokens_mean": float(np.mean([len(row[0].token_ids) for row in completions])),
    }
    check = accuracy_check(config, prompts)
    if check is not None:
        answers = [r.columns["answer"] for r in records]
        correct = check([r.prompt for r in records], texts, answer=answers)
        metrics["eval/accuracy"] = float(np.mean(correct))
    samples = [
        {"prompt_id": r.id, "prompt": r.text, "response": text, "reward": float(s)}
        for r, text, s in zip(records, texts, result.scores)
    ]
    return metrics, samples
