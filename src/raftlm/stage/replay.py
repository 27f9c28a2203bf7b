"""Replay and anchor: what a stage trains on besides its own kept responses (docs/recipes.md).

With `raft.replay` every stage records the Rank step's examples as token ids in
`stages/NNN/kept.jsonl` (the ids that were sampled, with their loss mask and weight, never a
re-tokenization of the text) before its checkpoint, and also trains on kept responses of
earlier stages read back from those files, so a resumed run replays exactly what the
uninterrupted one did: the last `window` stages, newest first, one copy of a response to a
prompt and none the stage kept again itself (`dedupe`), at most `per_prompt_cap` per prompt,
and at most `share` times the stage's own count, drawn seeded by (run seed, stage). With
`data.anchor`, `share` times the stage's own count of rows of a fixed SFT set join them
(`raftlm.data.anchor`).

Replayed and anchor examples carry no sampler log-probs: a ratio objective's pi_old for them is
the current policy before the stage's first update (the trainer computes it where none was
recorded), so their ratios start at 1 and the stale log-probs of an earlier policy are never
used. Group weightings (grpo, reinforce_rej) and pairings (dpo, rpo), which compare one
stage's responses to a prompt with each other, are refused with either.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import Any

import numpy as np

from raftlm.config import ConfigError, RaftConfig
from raftlm.config.stages import ReplayConfig
from raftlm.data.anchor import anchor_draw
from raftlm.run.rundir import RunDir, read_jsonl, write_jsonl
from raftlm.stage.rank import Ranked, expected_selected
from raftlm.stage.record import example_positions
from raftlm.stage.rollouts import Rollouts
from raftlm.training.batches import TrainingExample
from raftlm.training.objectives import objective_of

KEPT_FILE = "kept.jsonl"
REPLAY_STREAM = 1  # the replay draw's seed stream: (run seed, stage, REPLAY_STREAM)


def check_stage_settings(config: RaftConfig) -> None:
    """Refuse (one line, naming the field) replay or anchor data with an objective they make no
    sense with: group weightings and pairings train on a stage's own groups of responses."""
    weighting = objective_of(config.training).weighting
    for name, value in (("raft.replay", config.raft.replay), ("data.anchor", config.data.anchor)):
        if value is not None and (weighting.group or weighting.pairs):
            raise ConfigError(
                f"{name}: expected null with training.objective={config.training.objective} "
                "(it compares the responses one stage sampled for a prompt with each other; a "
                "replayed or anchor response has nothing to be compared with), got a section")


def planned_examples(config: RaftConfig, stage: int) -> int:
    """Nominal training examples of stage `stage`, which size the LR schedule: the Rank step's
    (`expected_selected`), plus the most replay adds (every earlier stage in the window, or
    `share` times the stage's own) and the anchor rows."""
    own = n = expected_selected(config)
    replay, anchor = config.raft.replay, config.data.anchor
    if replay is not None:
        pool = own * (min(replay.window, stage - 1) if replay.window else stage - 1)
        n += pool if replay.share is None else min(pool, _share_of(replay.share, own))
    if anchor is not None:
        n += _share_of(anchor.share, own)
    return n


def extend_examples(run: Any, rollouts: Rollouts, ranked: Ranked, stage: int) -> Ranked:
    """The Rank step's decision with replayed, then anchor examples after the stage's own (which
    are recorded in `kept.jsonl` first), and `train/n_replayed` / `train/n_anchor` in its
    statistics where configured. `run` is a `raftlm.stage.build.Run`."""
    config, extra, stats = run.config, [], {}
    if config.raft.replay is not None:
        own = kept_rows(rollouts, ranked)
        if run.accelerator.is_main_process:
            write_jsonl(run.run_dir.stage_dir(stage) / KEPT_FILE, own)
        replayed = replay_rows(earlier_kept(run.run_dir, stage), own, config.raft.replay,
                               config.run.seed, stage)
        extra += [TrainingExample(row["prompt_ids"], row["response_ids"], row["weight"],
                                  loss_mask=row.get("loss_mask")) for row in replayed]
        stats["train/n_replayed"] = len(replayed)
    if run.anchor is not None:
        n = _share_of(config.data.anchor.share, len(ranked.examples))
        rows = [run.anchor[i] for i in anchor_draw(len(run.anchor), n, config.run.seed, stage)]
        extra += [TrainingExample(row.prompt.token_ids, row.response_ids) for row in rows]
        stats["train/n_anchor"] = len(rows)
    if not stats:
        return ranked
    return dataclasses.replace(ranked, examples=ranked.examples + extra,
                               stats={**ranked.stats, **stats})


def kept_rows(rollouts: Rollouts, ranked: Ranked) -> list[dict[str, Any]]:
    """The stage's own training examples as `kept.jsonl` rows: prompt id, sample index, weight
    and the exact token ids (prompt as the model saw it, response as sampled, loss mask)."""
    rows = []
    for example, (p, j) in zip(ranked.examples, example_positions(rollouts, ranked.examples)):
        row = {"prompt_id": rollouts.prompts[p].id, "sample": j, "weight": example.weight,
               "prompt_ids": example.prompt_ids, "response_ids": example.response_ids}
        if example.loss_mask is not None:
            row["loss_mask"] = example.loss_mask
        rows.append(row)
    return rows


def earlier_kept(run_dir: RunDir, stage: int) -> dict[int, list[dict[str, Any]]]:
    """stage -> its `kept.jsonl` rows, for every stage before `stage` (a stage that kept
    nothing, or ran before raftlm recorded them, has none)."""
    return {s: read_jsonl(run_dir.stage_dir(s) / KEPT_FILE) for s in range(1, stage)}


def replay_rows(earlier: dict[int, list[dict[str, Any]]], own: list[dict[str, Any]],
                config: ReplayConfig, seed: int, stage: int) -> list[dict[str, Any]]:
    """The rows of earlier stages that stage `stage` replays: the last `config.window` stages
    (0: all), newest first; with `dedupe` one copy of a (prompt, response) and none of the
    stage's `own`; at most `per_prompt_cap` per prompt (0: no cap); then at most `share` x
    len(own), drawn without replacement (seeded by (seed, stage)), in pool order."""
    first = max(1, stage - config.window) if config.window else 1
    seen = {_key(row) for row in own} if config.dedupe else set()
    per_prompt: Counter[int] = Counter()
    cap = config.per_prompt_cap or float("inf")
    pool = []
    for s in sorted((s for s in earlier if first <= s < stage), reverse=True):
        for row in earlier[s]:
            key = _key(row)
            if (config.dedupe and key in seen) or per_prompt[row["prompt_id"]] >= cap:
                continue
            seen.add(key)
            per_prompt[row["prompt_id"]] += 1
            pool.append(row)
    if config.share is None:
        return pool
    n = min(len(pool), _share_of(config.share, len(own)))
    chosen = np.random.default_rng([seed, stage, REPLAY_STREAM]).choice(len(pool), n,
                                                                         replace=False)
    return [pool[i] for i in sorted(chosen.tolist())]


def _key(row: dict[str, Any]) -> tuple[int, tuple[int, ...]]:
    return row["prompt_id"], tuple(row["response_ids"])


def _share_of(share: float, n: int) -> int:
    """round(share x n), halves up."""
    return math.floor(share * n + 0.5)
