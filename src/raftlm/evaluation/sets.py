"""Evaluation sets: the run's held-out prompts (always first, metrics `eval/<metric>`) and the
sets of `evaluation.sets` (metrics `eval/<name>/<metric>`), each resolved once into what
evaluating it needs: its prompts, its answer rules, its sample count and generation settings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raftlm.config import GenerationConfig, RaftConfig
from raftlm.config.evaluation import EvalSet
from raftlm.data.prompts import PromptSet, build_prompt_set, read_rows
from raftlm.data.tasks import builtin_task_rows, eval_split_size, with_shots
from raftlm.evaluation.extraction import Extraction, resolve

# The held-out set measures everything it always did (the reward, diversity, KL included).
HELD_OUT_METRICS = ("accuracy", "avg@n", "maj@n", "pass@k", "reward", "tokens", "diversity",
                    "kl")


@dataclass
class ResolvedSet:
    """One evaluation set, ready to run."""

    name: str  # "" for the held-out set
    prompts: PromptSet
    rules: list[Extraction]  # the first names the plain metrics; empty: no accuracy
    samples: int  # sampled responses per prompt; 0 = greedy only
    generation: GenerationConfig  # the run's, with the set's temperature
    max_new_tokens: int | None
    metrics: tuple[str, ...]

    @property
    def prefix(self) -> str:
        """Where its metrics go: `eval/` (held-out) or `eval/<name>/`."""
        return f"eval/{self.name}/" if self.name else "eval/"


def references(prompts: PromptSet) -> list[Any] | None:
    """The set's `answer` column, or None when its rows have none."""
    if not prompts.records or "answer" not in prompts.records[0].columns:
        return None
    return [r.columns.get("answer") for r in prompts.records]


def reward_names(config: RaftConfig) -> list[str]:
    """The run's reward terms' names (what `auto` extraction asks)."""
    return [term.name for term in config.reward.terms]


def held_out_set(prompts: PromptSet, config: RaftConfig) -> ResolvedSet:
    """The run's held-out prompts with today's settings (`evaluation.sampled`, K samples)."""
    ev = config.evaluation
    rules = resolve(ev.extraction, reward_names(config), references(prompts),
                    "evaluation.extraction")
    return ResolvedSet("", prompts, rules, ev.samples_per_prompt if ev.sampled else 0,
                       config.generation, ev.max_new_tokens, HELD_OUT_METRICS)


def configured_sets(config: RaftConfig, tokenizer: Any) -> list[ResolvedSet]:
    """Every set of `evaluation.sets`, its prompts tokenized with the run's chat template."""
    config.evaluation.check()
    return [resolve_set(spec, config, tokenizer, f"evaluation.sets[{i}]")
            for i, spec in enumerate(config.evaluation.sets)]


def resolve_set(spec: EvalSet, config: RaftConfig, tokenizer: Any, where: str) -> ResolvedSet:
    """One `EvalSet` as a `ResolvedSet` (`where` names it in one-line errors)."""
    data, seed = config.data, config.run.seed
    if spec.task:
        size = spec.size or eval_split_size(spec.task)
        rows = with_shots(spec.task, builtin_task_rows(spec.task, "eval", size, seed),
                          spec.shots, seed)
        source, field = f"builtin:{spec.task}/eval", "prompt"
    else:
        rows = read_rows(Path(spec.file))
        rows = rows[: spec.size] if spec.size else rows
        source, field = spec.file, data.prompt_field
    # No prompt of a benchmark is dropped for data.max_prompt_tokens (a training cap): a
    # smaller denominator would change the number that is compared with published ones.
    prompts = build_prompt_set(rows, tokenizer, prompt_field=field, max_prompt_tokens=1 << 30,
                               system_prompt=data.system_prompt, source=source)
    rules = resolve(spec.extraction, reward_names(config), references(prompts),
                    f"{where}.extraction")
    generation = config.generation
    if spec.temperature is not None:
        generation = dataclasses.replace(generation, temperature=spec.temperature)
    return ResolvedSet(spec.name, prompts, rules, spec.samples, generation,
                       spec.max_new_tokens or config.evaluation.max_new_tokens,
                       tuple(spec.metrics))
