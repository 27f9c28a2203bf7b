"""What the Collect step hands on: `Rollout`, one sampled response as training sees it, and
`Rollouts`, a stage's prompts with their rollouts and rewards.

A stage's rollouts may be ragged (a different number per prompt): their reward tables are
[prompts, max count] with NaN where a prompt has fewer, which the selectors and the group
objectives already treat as "no candidate".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raftlm.data.prompts import PromptRecord
from raftlm.models.distributed import gather
from raftlm.sampling.completion import Completion


@dataclass
class Rollout(Completion):
    """A sampled response (the sampler's `Completion`) as training uses it.

    `loss_mask` marks which tokens of `token_ids` are the model's own (1: trained on) and which
    came from elsewhere (0: a tool's or an environment's output, never trained on); None means
    every token is the model's, as in a single-turn response. `policy_stage` is the stage whose
    policy sampled it (stage s samples with the policy stage s - 1 left; 0 = the initial one).
    """

    loss_mask: list[int] | None = None
    policy_stage: int | None = None
    # a multi-turn rollout's conversation after the prompt, turn by turn (chat messages: the
    # model's turns, tool results, errors); None for a single turn (`raftlm.agents`)
    turns: list[dict[str, Any]] | None = None
    # who sampled it when not the policy on the prompt as given (docs/teaching.md): `source`
    # names a teacher; `hint` is STaR's outcome for a response sampled with the answer as a
    # hint (kept, quoted, wrong). Either way it carries no log-probs: they were not the
    # policy's on this prompt, so objectives recompute pi_old.
    source: str | None = None
    hint: str | None = None

    @classmethod
    def of(cls, sampled: Completion, policy_stage: int | None = None) -> Rollout:
        """A sampler's `Completion` (or an agent's trajectory, which also has a loss mask and
        turns) as a Rollout: every field of ours that it has, by name."""
        fields = {f.name: getattr(sampled, f.name) for f in dataclasses.fields(cls)
                  if hasattr(sampled, f.name)}
        return cls(**{**fields, "policy_stage": policy_stage})


@dataclass
class Rollouts:
    """A stage's prompts, their rollouts (a count per prompt) and rewards."""

    prompts: list[PromptRecord]
    responses: list[list[Rollout]]
    rewards: np.ndarray  # float [P, max count]: the weighted sum; NaN = invalid or no rollout
    per_term: dict[str, np.ndarray] = field(default_factory=dict)  # each term's [P, max count]
    collector_stats: dict[str, Any] = field(default_factory=dict)  # sampling/* of the collector
    # bool [P]: prompts the collector drew but set aside (dynamic: no learning signal). They
    # stay recorded and counted, but no statistic of Rank (a batch std) includes them, as
    # DAPO computes advantages after its filter. None: none set aside.
    set_aside: np.ndarray | None = None

    def table(self, value: Callable[[Rollout], Any], fill: Any = 0) -> np.ndarray:
        """`value(rollout)` of every rollout as a [P, max count] array (`fill` where none)."""
        out = np.full(self.rewards.shape, fill)
        for p, row in enumerate(self.responses):
            out[p, : len(row)] = [value(r) for r in row]
        return out


def reward_rows_to_rollouts(prompts: list[PromptRecord], responses: list[list[Rollout]],
                            rows: list[dict[str, Any]], terms: list[str]) -> Rollouts:
    """Rollouts from per-prompt reward rows ({"rewards": [...], "terms": {name: [...]}}, None
    for a missing value); every name of `terms` gets a table, NaN where a row lacks it."""
    width = max((len(r) for r in responses), default=0)
    return Rollouts(
        prompts, responses, reward_table([r["rewards"] for r in rows], width),
        {name: reward_table([r["terms"].get(name, [None] * len(r["rewards"])) for r in rows],
                            width) for name in terms})


def gather_rollouts(local: Rollouts) -> Rollouts:
    """Every process's rollouts, in prompt order (a no-op in a single process)."""
    prompts = gather(local.prompts)
    responses = gather(local.responses)
    width = max((len(r) for r in responses), default=0)
    rows = gather([_row(local.rewards[i], len(r)) for i, r in enumerate(local.responses)])
    terms = {name: reward_table(gather([_row(t[i], len(r))
                                        for i, r in enumerate(local.responses)]), width)
             for name, t in local.per_term.items()}
    return Rollouts(prompts, responses, reward_table(rows, width), terms)


def concatenate(parts: list[Rollouts]) -> Rollouts:
    """Several rounds' rollouts one after the other (prompts in draw order)."""
    width = max((p.rewards.shape[1] for p in parts), default=0)
    names = sorted({name for p in parts for name in p.per_term})

    def stack(tables: list[np.ndarray]) -> np.ndarray:
        out = [np.pad(t, ((0, 0), (0, width - t.shape[1])), constant_values=np.nan)
               for t in tables]
        return np.concatenate(out) if out else np.zeros((0, width))

    return Rollouts(
        [p for part in parts for p in part.prompts],
        [row for part in parts for row in part.responses],
        stack([p.rewards for p in parts]),
        {name: stack([p.per_term.get(name, np.full(p.rewards.shape, np.nan)) for p in parts])
         for name in names})


def reward_table(rows: list[list[float | None]], width: int) -> np.ndarray:
    """Ragged rows of rewards (None: missing) as a [P, width] array, NaN-padded."""
    out = np.full((len(rows), width), np.nan)
    for p, row in enumerate(rows):
        out[p, : len(row)] = [np.nan if v is None else v for v in row]
    return out


def nan_to_none(values: np.ndarray) -> list[float | None]:
    """Rewards as JSON-ready floats: NaN becomes None (null)."""
    return [None if np.isnan(v) else float(v) for v in values]


def _row(values: np.ndarray, n: int) -> list[float]:
    return [float(v) for v in values[:n]]
