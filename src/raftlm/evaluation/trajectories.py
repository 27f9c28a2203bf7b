"""Evaluation with tools: when a run has a `rollout` section, each evaluation set is rolled out
with the run's tools, environment and `tool_choice` (`raftlm.agents.roll_out`), so `eval/*` of a
tool run measures the model with its tool, as it was trained, not the model alone.

The greedy response is a trajectory whose every turn is the argmax (temperature 0); the sampled
ones are trajectories at the set's temperature, seeded by (run seed, evaluation's stage, prompt
id, sample, turn), the same every stage. Answers are read from the trajectory's last model turn
(`agents.trajectory.final_text`), never from a tool's output. The prompts are split over
processes and the trajectories gathered back, as `generate_sharded` does for one turn.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from raftlm.agents.rollout import roll_out
from raftlm.config import RaftConfig
from raftlm.evaluation.sets import ResolvedSet
from raftlm.models.distributed import gather, shard


def rolled_responses(model: Any, tokenizer: Any, rset: ResolvedSet, config: RaftConfig,
                     stage: int) -> tuple[ResolvedSet, list[Any], list[list[Any]] | None]:
    """The set with its prompts as the model saw them (tools, system prompt), one greedy
    trajectory per prompt and `rset.samples` sampled ones (or None)."""
    generation = dataclasses.replace(
        rset.generation, max_new_tokens=rset.max_new_tokens or rset.generation.max_new_tokens)
    config = dataclasses.replace(config, generation=generation)
    mine = shard(rset.prompts.records)
    ones = [1] * len(mine)
    greedy = roll_out(model, tokenizer, mine, ones, config, stage, greedy=True)
    sampled = (roll_out(model, tokenizer, mine, [rset.samples] * len(mine), config, stage).rows
               if rset.samples else None)
    seen = dataclasses.replace(rset.prompts, records=gather(greedy.prompts))
    return (dataclasses.replace(rset, prompts=seen),
            [row[0] for row in gather(greedy.rows)],
            None if sampled is None else gather(sampled))
