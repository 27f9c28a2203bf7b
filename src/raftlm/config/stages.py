"""Settings that make stages build on each other (docs/recipes.md): replaying earlier stages'
kept responses (`raft.replay`), a fixed SFT set mixed into every stage (`data.anchor`), and
per-stage schedules of `generation.temperature` and `selection.min_reward`.

A schedule is a number (every stage), a list (one value per stage, the last repeating) or a
linear `Ramp` from stage 1 to the last stage. `RaftConfig.at_stage(t)` gives the config with
every schedule at stage t's value; everything that runs a stage reads that one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from raftlm.config.schema import check_values, option


@dataclass
class Ramp:
    """A value moving linearly from `start` (stage 1) to `end` (the last stage)."""

    kind: ClassVar[str] = "a ramp {start, end}"  # in a config error
    start: float = option(1.0, "The value at stage 1.")
    end: float = option(1.0, "The value at the last stage (raft.stages).")


Schedule = float | list[float] | Ramp


def stage_value(schedule: Schedule | None, stage: int, stages: int) -> float | None:
    """A schedule's value at `stage` (1-based; stage 0, the baseline, takes stage 1's) of a run
    of `stages`: a number as it is, a list's entry (its last one past its end), a ramp's
    start + (t - 1) (end - start) / (T - 1) (NumPy's linspace), held at `end` after
    stage T."""
    t = max(stage, 1)
    if schedule is None or isinstance(schedule, (int, float)):
        return schedule
    if isinstance(schedule, list):
        return schedule[min(t, len(schedule)) - 1]
    if t >= stages:
        return schedule.end if stages > 1 else schedule.start
    return (t - 1) * ((schedule.end - schedule.start) / (stages - 1)) + schedule.start


def schedule_values(schedule: Schedule | None) -> list[float]:
    """Every value a schedule takes (for validation: a ramp stays between its ends)."""
    if schedule is None:
        return []
    if isinstance(schedule, list):
        return schedule
    if isinstance(schedule, Ramp):
        return [schedule.start, schedule.end]
    return [schedule]


@dataclass
class ReplayConfig:
    """raft.replay: each stage also trains on kept responses of earlier stages (Llama 2's
    "top-performing samples from all prior iterations"), read from their `kept.jsonl`."""

    window: int = option(0, "Earlier stages replayed: the last N; 0 = all of them.")
    per_prompt_cap: int = option(0, "Most replayed responses per prompt, the newest first; "
                                 "0 = no cap.")
    share: float | None = option(
        None, "Replayed examples per stage: at most this many times the stage's own kept "
        "examples (drawn seeded per stage); null = every one the window holds.")
    dedupe: bool = option(True, "Replay one copy of a response to a prompt (the newest), none "
                          "that the stage kept again itself.")

    def check(self, where: str) -> None:
        check_values(self, where, [
            ("window", self.window >= 0, ">= 0"),
            ("per_prompt_cap", self.per_prompt_cap >= 0, ">= 0"),
            ("share", self.share is None or self.share > 0, "> 0 or null"),
        ])


@dataclass
class AnchorConfig:
    """data.anchor: a fixed SFT set (prompt and response columns) mixed into every stage, as
    DeepSeek-R1 mixed general SFT rows and RFT trains with the original SFT data."""

    path: str = option("", "A prompt file (.jsonl, .json, .csv, .parquet) or a `datasets` "
                       "folder (save_to_disk) with a prompt and a response column.")
    split: str = option("train", "A DatasetDict folder: the split to read.")
    prompt_field: str = option("prompt", "Column with the prompt: text or chat messages, "
                               "rendered as data.prompt_field is.")
    response_field: str = option("response", "Column with the response text (trained on, "
                                 "followed by the eos token).")
    share: float = option(0.25, "Anchor rows per stage: this many times the stage's own kept "
                          "examples, rounded (drawn seeded by run seed and stage).")

    def check(self, where: str) -> None:
        check_values(self, where, [
            ("path", bool(self.path), "a file or a datasets folder"),
            ("share", self.share > 0, "> 0"),
        ])
