"""How a stage spends its samples (`raft.collector`, docs/sampling.md): short policies over the
one Collect primitive (`collect.py`).

- `fixed` (the default, the paper's Algorithm 1): b prompts x K samples, one round.
- `dynamic` (DAPO's dynamic sampling): K for each of the b drawn prompts; while fewer than b
  carry a learning signal (`rank.useful_prompts`), draw as many more prompts as are missing, in
  the run's seeded order, and sample those, for at most `raft.dynamic.max_rounds` rounds. The
  prompts set aside count as used (the order moved past them) and stay in the stage's rollouts,
  where they select nothing: every sample drawn is recorded and counted.
- `gvm` (GVM-RAFT, Yao et al. NeurIPS 2025): `raft.gvm.first_samples` per prompt, then the
  stage's budget shared out by GVM's rule (`raftlm.core.collectors`) from each prompt's
  acceptance rate and gradient norm; the second round extends the first (indices go on).

Every decision (which prompts are useful, how many samples each gets) is taken from the rollouts
of all processes, so all processes take the same one whatever their number; the journal and the
restored prompt order make a resumed stage replay the same rounds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from raftlm.config import ConfigError, RaftConfig
from raftlm.config.registry import lookup
from raftlm.config.teaching import active_hints
from raftlm.core.collectors import gvm_allocation, logit_gradient_norm
from raftlm.data.prompts import PromptRecord
from raftlm.sampling.generate import GENERATION_BACKENDS
from raftlm.stage.collect import Collect, StageRun
from raftlm.stage.hints import with_hints
from raftlm.stage.rank import ranked_view, useful_prompts
from raftlm.stage.rollouts import Rollouts, concatenate


def fixed(run: StageRun, prompts: list[PromptRecord], collect: Collect) -> Rollouts:
    """K samples for each of the b prompts."""
    return collect(prompts, [run.config.raft.samples_per_prompt] * len(prompts))


def dynamic(run: StageRun, prompts: list[PromptRecord], collect: Collect) -> Rollouts:
    """Rounds of K samples per prompt until b drawn prompts are useful or the rounds run out."""
    config = run.config
    b, k = config.raft.prompts_per_stage, config.raft.samples_per_prompt
    parts, useful, seen = [], 0, {p.id for p in prompts}
    while prompts:
        part = collect(prompts, [k] * len(prompts))
        parts.append(part)
        useful += int(useful_prompts(part, config).sum())
        if useful >= b or len(parts) == config.raft.dynamic.max_rounds:
            break
        prompts = _draw_unseen(run, b - useful, seen)
    rollouts = concatenate(parts)
    rollouts.set_aside = ~useful_prompts(rollouts, config)
    return rollouts


def gvm(run: StageRun, prompts: list[PromptRecord], collect: Collect) -> Rollouts:
    """A first round of n0 samples per prompt, then GVM's allocation of the stage's budget."""
    first = run.config.raft.gvm.first_samples
    rollouts = collect(prompts, [first] * len(prompts))
    counts = gvm_counts(rollouts, run.config)
    return collect(prompts, counts) if any(n > first for n in counts) else rollouts


def _check_gvm(config: RaftConfig) -> None:
    if (config.raft.gvm.grad_norm == "logits"
            and not GENERATION_BACKENDS[config.generation.backend].records_log_probs):
        raise ConfigError(
            f"raft.gvm.grad_norm: expected none with generation.backend="
            f"{config.generation.backend}, which records no log-probs to estimate gradient "
            "norms from (it would silently allocate by acceptance rates alone), got logits")


@dataclass(frozen=True)
class Collector:
    """One way to spend a stage's samples: `collect(run, the stage's first b prompts, the
    stage's Collect) -> every prompt it sampled, in draw order`."""

    collect: Callable[[StageRun, list[PromptRecord], Collect], Rollouts]
    # Its later rounds depend on the rewards of earlier ones, so sampling and scoring cannot
    # run as separate jobs (`raftlm generate` then `raftlm score`).
    rewards_between_rounds: bool
    # Settings it needs from other sections; raises ConfigError naming the field.
    check: Callable[[RaftConfig], None] = lambda config: None


COLLECTORS: dict[str, Collector] = {
    "fixed": Collector(fixed, rewards_between_rounds=False),
    "dynamic": Collector(dynamic, rewards_between_rounds=True),
    "gvm": Collector(gvm, rewards_between_rounds=True, check=_check_gvm),
}


def collector(name: str) -> Collector:
    """`raft.collector`: a name of `COLLECTORS`, or `pkg.mod:obj` / `file.py:obj` naming a
    `Collector` of your own."""
    return lookup(COLLECTORS, name, "raft.collector", Collector)


def collect_stage(run: StageRun, prompts: list[PromptRecord], collect: Collect) -> Rollouts:
    """The configured collector's rollouts of the stage (and `raft.hints`' hinted samples),
    with their `sampling/*` numbers."""
    try:
        rollouts = collector(run.config.raft.collector).collect(run, prompts, collect)
        stats = collector_stats(rollouts, run.config, collect.rounds)
        if active_hints(run.config) is not None:  # STaR: unsolved prompts, with the answer
            rollouts, hinted = with_hints(run, rollouts, collect)
            stats.update(hinted)
    finally:
        collect.close()
    rollouts.collector_stats = stats
    return rollouts


def gvm_counts(rollouts: Rollouts, config: RaftConfig) -> list[int]:
    """Each prompt's sample count from its first-round rollouts (all processes'), by GVM's
    rule: a response is accepted when eligible with a reward of at least `raft.gvm.accept_reward`
    (default `selection.min_reward`)."""
    raft, gvm_config = config.raft, config.raft.gvm
    rewards, selection = ranked_view(rollouts, config)
    threshold = gvm_config.accept_reward if gvm_config.accept_reward is not None else (
        config.selection.min_reward)
    accepted = selection.eligible & (np.nan_to_num(rewards, nan=-np.inf) >= threshold)
    if gvm_config.grad_norm == "logits":
        norms = rollouts.table(lambda r: 1.0 if r.token_log_probs is None
                               else logit_gradient_norm(r.token_log_probs), 0.0)
    else:
        norms = np.ones(rewards.shape)
    budget = gvm_config.budget or raft.prompts_per_stage * raft.samples_per_prompt
    counts = gvm_allocation(accepted, norms, [len(r) for r in rollouts.responses], budget,
                            gvm_config.first_samples, gvm_config.max_samples, gvm_config.alpha,
                            gvm_config.beta)
    return [int(n) for n in counts]


def collector_stats(rollouts: Rollouts, config: RaftConfig, rounds: int) -> dict[str, Any]:
    """The stage's `sampling/*` numbers: prompts drawn and useful, samples, rounds, and the
    spread of samples per prompt."""
    counts = np.array([len(r) for r in rollouts.responses], dtype=np.float64)
    return {
        "sampling/prompts_drawn": len(rollouts.prompts),
        "sampling/useful_prompts": int(useful_prompts(rollouts, config).sum()),
        "sampling/samples": int(counts.sum()),
        "sampling/rounds": rounds,
        "sampling/samples_per_prompt_min": int(counts.min()) if len(counts) else 0,
        "sampling/samples_per_prompt_max": int(counts.max()) if len(counts) else 0,
        "sampling/samples_per_prompt_std": float(counts.std()) if len(counts) else 0.0,
    }


def _draw_unseen(run: StageRun, n: int, seen: set[int]) -> list[PromptRecord]:
    """The next `n` prompts of the run's order that this stage has not sampled yet (fewer when
    the prompt set runs out); prompts passed over count as drawn."""
    records, drawn = run.train_prompts.records, []
    while len(drawn) < n and len(seen) < len(records):
        for position in run.prompt_order.draw(n - len(drawn)):
            if records[position].id not in seen:
                seen.add(records[position].id)
                drawn.append(records[position])
    return drawn
