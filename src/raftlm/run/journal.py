"""The journal of a stage in progress: what a killed stage already finished, so resume reuses it.

`stages/NNN/journal.rank<r>.jsonl` (one file per process), append-only, one JSON object a line,
flushed after each line:

    {"journal": 1, "stage": 3, "prompt_ids": [...], "samples_per_prompt": 8, "generation": {...}}
    {"prompt_id": 17, "sample": 0, "completion": {...}}       one line per finished response
    {"prompt_id": 17, "rewards": [0.0, 1.0, ...], "terms": {"numeric_answer": [...]}}
                                                              one line per prompt once scored

A kill can cut the last line short: reading drops (and truncates away) a last line that has no
newline or is not JSON. A journal whose header does not match the stage being run (other prompts,
K, generation settings) is discarded; one written under another reward config (its
`scoring` fingerprint differs) is refused, since its rewards would be reused. The stage deletes
its journals once its checkpoint is written; the final `candidates.jsonl` is still written
whole, atomically, at the end of the stage.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from raftlm.errors import UserError
from raftlm.run.signals import critical

FORMAT = 2  # 2: per-term rewards, scoring fingerprint


def read_lines(path: Path) -> list[dict[str, Any]]:
    """Every complete line of `path`; a torn last line is dropped and cut off the file."""
    data = path.read_bytes()
    records, good = [], 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break  # the line being written when the process died
        try:
            records.append(json.loads(line))
        except ValueError:
            break  # bytes never fully written (e.g. a block of zeros after a crash)
        good += len(line)
    if good != len(data):
        with path.open("r+b") as handle:
            handle.truncate(good)
    return records


class StageJournal:
    """Finished samples and rewards of one stage: `samples[(prompt_id, j)]`, `rewards[prompt_id]`
    read from every process's journal; `add_*` append to this process's own."""

    def __init__(self, folder: Path, rank: int, header: dict[str, Any], reuse: bool = True):
        self.folder, self.header = folder, {"journal": FORMAT, **header}
        self.path = folder / f"journal.rank{rank}.jsonl"
        self.samples: dict[tuple[int, int], dict[str, Any]] = {}
        self.rewards: dict[int, dict[str, Any]] = {}  # prompt id -> {"rewards", "terms"}
        self.discarded: str | None = None  # why an existing journal was not reused
        existing = sorted(folder.glob("journal.rank*.jsonl"))
        per_file = [read_lines(path) for path in existing]
        _refuse_other_scoring(folder, self.header, per_file)
        if any(not lines or lines[0] != self.header for lines in per_file) or not reuse:
            if existing:
                self.discarded = "settings changed" if reuse else "backend re-samples the stage"
            for path in existing:
                path.unlink()
            per_file = []
        for lines in per_file:
            for record in lines[1:]:
                if "completion" in record:
                    self.samples[(record["prompt_id"], record["sample"])] = record["completion"]
                elif "rewards" in record:
                    self.rewards[record["prompt_id"]] = {"rewards": record["rewards"],
                                                         "terms": record.get("terms", {})}
        folder.mkdir(parents=True, exist_ok=True)
        self._handle = self.path.open("a", encoding="utf-8")
        if self._handle.tell() == 0:
            self._append(self.header)

    def _append(self, record: dict[str, Any]) -> None:
        with critical():
            self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._handle.flush()  # in the kernel's hands: survives a killed process

    def add_sample(self, prompt_id: int, sample: int, completion: dict[str, Any]) -> None:
        self._append({"prompt_id": prompt_id, "sample": sample, "completion": completion})

    def add_rewards(self, prompt_id: int, rewards: list[float | None],
                    terms: dict[str, list[float | None]] | None = None) -> None:
        self._append({"prompt_id": prompt_id, "rewards": rewards, "terms": terms or {}})

    def sync(self) -> None:
        """Flush to disk (not only to the kernel): after a stage's scoring, say."""
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()

    def remove(self) -> None:
        """The stage is checkpointed: its journals are no longer needed."""
        self.close()
        for path in self.folder.glob("journal.rank*.jsonl"):
            path.unlink(missing_ok=True)


class JournalMismatch(UserError, ValueError):
    """A stage's journal was written under another reward config."""


def _refuse_other_scoring(folder: Path, header: dict[str, Any],
                          per_file: list[list[dict[str, Any]]]) -> None:
    """Refuse to resume a stage whose journal scored its samples under another reward config:
    silently mixing old and new rewards (or re-scoring) is never what a changed config means."""
    for lines in per_file:
        old = lines[0].get("scoring") if lines else None
        if old is not None and "scoring" in header and old != header["scoring"]:
            raise JournalMismatch(
                f"{folder}: this stage was started under another reward config (reward.* "
                "changed since); resume with the run's own config.yaml, or delete "
                f"{folder}/journal.rank*.jsonl to sample and score the stage again")
