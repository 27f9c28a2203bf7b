"""Record: a stage's `candidates.jsonl` rows and its numbers about what was sampled and kept."""

from __future__ import annotations

from typing import Any

import numpy as np

from raftlm.agents import rollout_metrics
from raftlm.evaluation.metrics import nanmean, reward_distribution
from raftlm.stage.rank import Ranked
from raftlm.stage.rollouts import Rollouts


def candidate_rows(rollouts: Rollouts, mask: np.ndarray | None = None) -> list[dict]:
    """`candidates.jsonl` rows: every prompt, response, reward (and each term's) and whether
    it was selected."""
    return [
        {
            "prompt_id": prompt.id, "prompt": prompt.text, "sample": j, "response": response.text,
            "original_prompt": prompt.prompt,  # as in the data: text or chat messages
            "reward": _float(rollouts.rewards[p, j]),
            "rewards": {name: _float(t[p, j]) for name, t in rollouts.per_term.items()},
            "selected": None if mask is None else bool(mask[p, j]),
            "finish_reason": response.finish_reason, "n_tokens": len(response.token_ids),
            **({"turns": response.turns} if response.turns else {}),  # a multi-turn rollout
            # a teacher's sample, a STaR-hinted one (docs/teaching.md)
            **{k: getattr(response, k) for k in ("source", "hint") if getattr(response, k, None)},
        }
        for p, (prompt, row) in enumerate(zip(rollouts.prompts, rollouts.responses))
        for j, response in enumerate(row)
    ]


def example_positions(rollouts: Rollouts, examples: list[Any]) -> list[tuple[int, int]]:
    """(prompt, sample) of each training example in `rollouts`: an example holds its response's
    own token-id list, which identifies the candidate."""
    where = {id(r.token_ids): (p, j) for p, row in enumerate(rollouts.responses)
             for j, r in enumerate(row)}
    return [where[id(e.response_ids)] for e in examples]


def candidate_metrics(rollouts: Rollouts, ranked: Ranked) -> dict[str, Any]:
    """The stage's numbers about what was sampled and kept."""
    rewards, mask = rollouts.rewards, ranked.selection.mask
    # STaR's hinted samples (raft.hints) are not the policy's draws: a kept one's reward would
    # lift the policy's mean, and the others have none on purpose (sampling/hinted_* count them).
    own = rollouts.table(lambda r: r.hint is None, False)
    return {
        "train/reward_mean": nanmean(np.where(own, rewards, np.nan)),
        "train/reward_selected_mean": nanmean(rewards[mask]),
        **reward_distribution(rewards, mask),
        "train/n_selected": ranked.selection.n_selected,
        "train/n_invalid_reward": int((np.isnan(rewards) & own).sum()),
        **{f"train/dropped_{name}": n for name, n in ranked.selection.dropped.items()},
        **ranked.stats,
        "tokens/generated": int(rollouts.table(lambda r: len(r.token_ids)).sum()),
        **{f"reward/{name}/mean": nanmean(t) for name, t in rollouts.per_term.items()},
        **rollout_metrics(r for row in rollouts.responses for r in row),  # {}: single turn
        **rollouts.collector_stats,
    }


def reward_summary(metrics: dict[str, Any]) -> str:
    """`reward 0.250 -> selected 0.875`: the stage's sampled and kept mean reward."""
    return (f"reward {fmt(metrics['train/reward_mean'])} -> selected "
            f"{fmt(metrics['train/reward_selected_mean'])}")


def fmt(value: float | None) -> str:
    """A metric in a summary line: three decimals, or n/a where there is none."""
    return "n/a" if value is None else f"{value:.3f}"


def _float(value: float) -> float | None:
    return None if np.isnan(value) else float(value)
