"""The run directory: everything a run produces, written so that a crash never loses it.

Layout::

    RUN/config.yaml                   resolved config
    RUN/metrics.jsonl                 one JSON object per line: {"stage": t, "train/...": ...}
    RUN/stages/NNN/candidates.jsonl   every prompt, response, reward and selected flag
    RUN/checkpoints/stage-NNN/        policy/ (adapter or full model + tokenizer),
                                      trainer_state.pt (optimizer, schedule), state.json
    RUN/report.html                   plots, table and examples (`raftlm report RUN`)

Every file is written to a temporary name and renamed into place, so a file that exists is
complete; a checkpoint folder appears only once all its files are written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunDir:
    """Paths and atomic writers for one run."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @classmethod
    def create(cls, root: str | Path, overwrite: bool) -> RunDir:
        run = cls(root)
        if run.root.exists() and any(run.root.iterdir()):
            if not overwrite:
                raise FileExistsError(
                    f"{run.root} already holds a run; pass --overwrite to replace it "
                    f"or --resume {run.root} to continue it"
                )
            shutil.rmtree(run.root)
        run.root.mkdir(parents=True, exist_ok=True)
        return run

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    def stage_dir(self, stage: int) -> Path:
        return self.root / "stages" / f"{stage:03d}"

    def candidates_path(self, stage: int) -> Path:
        return self.stage_dir(stage) / "candidates.jsonl"

    def write_config(self, yaml_text: str) -> None:
        atomic_write_text(self.config_path, yaml_text)

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics_path)

    def append_metrics(self, record: dict[str, Any]) -> None:
        # Rewriting the (small) file keeps every append atomic.
        write_jsonl(self.metrics_path, self.read_metrics() + [record])

    def truncate_metrics(self, last_stage: int) -> None:
        """Forget records of stages after `last_stage` (they belong to an interrupted stage)."""
        kept = [r for r in self.read_metrics() if r.get("stage", 0) <= last_stage]
        write_jsonl(self.metrics_path, kept)

    # Checkpoints ---------------------------------------------------------------------------

    def checkpoint_dir(self, stage: int) -> Path:
        return self.root / "checkpoints" / f"stage-{stage:03d}"

    def checkpoints(self) -> list[tuple[int, Path]]:
        folder = self.root / "checkpoints"
        if not folder.is_dir():
            return []
        found = []
        for path in folder.glob("stage-*"):
            if (path / "state.json").is_file():
                found.append((int(path.name.split("-")[1]), path))
        return sorted(found)

    def latest_checkpoint(self) -> tuple[int, Path] | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def save_checkpoint(
        self,
        stage: int,
        save_policy: Any,
        trainer_state: dict[str, Any],
        state: dict[str, Any],
        keep: int,
    ) -> Path:
        """Write policy, trainer state and loop state, then rename the folder into place."""
        target = self.checkpoint_dir(stage)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        try:
            save_policy(staging / "policy")
            torch.save(trainer_state, staging / "trainer_state.pt")
            (staging / "state.json").write_text(json.dumps(state, indent=2))
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if keep > 0:
            for _, old in self.checkpoints()[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        return target
