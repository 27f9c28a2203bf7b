"""One evaluation set's metrics and per-item rows, from its greedy and sampled responses.

Per answer rule (the set's first rule names the plain metrics, the others add `_<rule>`):
  accuracy   greedy pass@1
  avg@n      mean accuracy of the n samples        (held-out legacy name: sampled_accuracy)
  maj@n      majority vote over extracted answers  (not under `reward`, which extracts none)
  pass@k     unbiased, every k <= n                (held-out legacy name: pass_at_k = pass@n)
A trajectory's answer is read from its last model turn (`agents.trajectory.final_text`).
Once per set: reward (reward_mean greedy, sampled_reward_mean, best_of_k_reward), tokens
(response_tokens_mean, sampled_tokens_mean), diversity (distinct_1, distinct_2). The NumPy
references are in `raftlm.core.evaluation` and `raftlm.evaluation.metrics`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from raftlm.agents.trajectory import final_text
from raftlm.core.evaluation import avg_at_n, maj_at_n, pass_at_k_curve
from raftlm.evaluation.extraction import Extraction
from raftlm.evaluation.metrics import best_of_k, distinct_n, nanmean
from raftlm.evaluation.sets import ResolvedSet, references
from raftlm.rewards.reward import Reward, score
from raftlm.sampling.completion import Completion

# (records, rows) -> each response's environment instance for the reward, or None
Environments = Callable[[list[Any], list[list[Completion]]], list[list[Any]] | None]


def judge(rule: Extraction, texts: list[str], refs: list[Any], rewards: np.ndarray | None,
          correct_reward: float) -> tuple[list[str | None], np.ndarray]:
    """Each response's answer (None where the rule reads none) and whether it is right."""
    if rule.uses_reward:
        reached = np.nan_to_num(np.asarray(rewards, dtype=float), nan=-np.inf) >= correct_reward
        return [None] * len(texts), reached
    checked = [rule.check(text, ref) for text, ref in zip(texts, refs)]
    return [a for a, _ in checked], np.array([ok for _, ok in checked], dtype=bool)


def set_metrics(rset: ResolvedSet, greedy: list[Completion], sampled: list[list[Completion]]
                | None, reward: Reward, correct_reward: float,
                environments: Environments | None = None
                ) -> tuple[dict[str, float | None], list[dict[str, Any]]]:
    """The set's metrics (named under its prefix) and one row per prompt for eval.jsonl.
    `environments(records, rows)`: the trajectories' environments for the reward (replayed)."""
    records, p, wanted = rset.prompts.records, rset.prefix, rset.metrics
    refs = references(rset.prompts) or [None] * len(records)
    needs_reward = "reward" in wanted or any(rule.uses_reward for rule in rset.rules)
    metrics: dict[str, float | None] = {}
    greedy_rewards = (_score(reward, records, [[c] for c in greedy], environments).reshape(-1)
                      if needs_reward else None)
    if "reward" in wanted:
        metrics[p + "reward_mean"] = nanmean(greedy_rewards)
    if "tokens" in wanted:
        metrics[p + "response_tokens_mean"] = float(np.mean([len(c.token_ids) for c in greedy]))
    items = [{"set": rset.name or "heldout", "prompt_id": r.id, "prompt": r.prompt,
              "answer": ref, "response": c.text, "extracted": {}, "correct": {}, **_turns(c)}
             for r, ref, c in zip(records, refs, greedy)]
    if greedy_rewards is not None:
        for item, value in zip(items, greedy_rewards):
            item["reward"] = float(value)
    for j, rule in enumerate(rset.rules):
        answers, correct = judge(rule, [final_text(c) for c in greedy], refs, greedy_rewards,
                                 correct_reward)
        if "accuracy" in wanted:
            metrics[p + "accuracy" + _suffix(j, rule)] = float(np.mean(correct))
        for item, answer, ok in zip(items, answers, correct):
            item["extracted"][rule.name], item["correct"][rule.name] = answer, bool(ok)
    if sampled:
        metrics.update(_sampled(rset, sampled, refs, reward, correct_reward, items,
                                environments))
    return metrics, items


def _sampled(rset: ResolvedSet, sampled: list[list[Completion]], refs: list[Any],
             reward: Reward, correct_reward: float, items: list[dict[str, Any]],
             environments: Environments | None) -> dict[str, float | None]:
    records, p, wanted = rset.prompts.records, rset.prefix, rset.metrics
    n = len(sampled[0])
    texts = [c.text for row in sampled for c in row]
    flat_refs = [ref for ref in refs for _ in range(n)]
    rewards = None
    metrics: dict[str, float | None] = {}
    if "reward" in wanted or any(rule.uses_reward for rule in rset.rules):
        rewards = _score(reward, records, sampled, environments).reshape(len(records), n)
    if "reward" in wanted:
        metrics[p + "sampled_reward_mean"] = nanmean(rewards)
        metrics[p + "best_of_k_reward"] = best_of_k(rewards)
    if "tokens" in wanted:
        metrics[p + "sampled_tokens_mean"] = float(np.mean([len(c.token_ids) for row in sampled
                                                            for c in row]))
    if "diversity" in wanted:
        metrics[p + "distinct_1"] = distinct_n(texts, 1)
        metrics[p + "distinct_2"] = distinct_n(texts, 2)
    for item, row in zip(items, sampled):
        item["samples"] = [{"response": c.text, "extracted": {}, "correct": {}, **_turns(c)}
                           for c in row]
    finals = [final_text(c) for row in sampled for c in row]
    for j, rule in enumerate(rset.rules):
        answers, correct = judge(rule, finals, flat_refs,
                                 None if rewards is None else rewards.reshape(-1), correct_reward)
        table = correct.reshape(len(records), n)
        suffix = _suffix(j, rule)
        if "avg@n" in wanted:
            metrics[f"{p}avg@{n}{suffix}"] = avg_at_n(table)
        if "maj@n" in wanted and not rule.uses_reward:
            rows = [answers[i * n:(i + 1) * n] for i in range(len(records))]
            metrics[f"{p}maj@{n}{suffix}"] = maj_at_n(rows, table)
        if "pass@k" in wanted:
            curve = pass_at_k_curve(table)
            metrics.update({f"{p}pass@{k}{suffix}": value for k, value in curve.items()})
        if not rset.name and j == 0:  # the held-out set's names from before pass@k and avg@n
            metrics["eval/sampled_accuracy"] = avg_at_n(table)
            metrics["eval/pass_at_k"] = pass_at_k_curve(table)[n]
        for i, item in enumerate(items):
            for s, sample in enumerate(item["samples"]):
                sample["extracted"][rule.name] = answers[i * n + s]
                sample["correct"][rule.name] = bool(table[i, s])
    return metrics


def _turns(completion: Completion) -> dict[str, Any]:
    """A trajectory's turns for its eval.jsonl row (nothing for a single-turn response)."""
    turns = getattr(completion, "turns", None)
    return {"turns": turns} if turns else {}


def _suffix(j: int, rule: Extraction) -> str:
    return "" if j == 0 else f"_{rule.name}"


def _score(reward: Reward, records: list, rows: list[list[Completion]],
           environments: Environments | None) -> np.ndarray:
    envs = environments(records, rows) if environments is not None else None
    return score(reward, records, rows, environments=envs).scores
