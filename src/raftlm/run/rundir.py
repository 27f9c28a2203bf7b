"""The run directory: everything a run produces, written so that a crash never loses it.

Layout::

    RUN/config.yaml                   resolved config
    RUN/metrics.jsonl                 one JSON object per line: {"stage": t, "train/...": ...}
    RUN/stages/NNN/candidates.jsonl   every prompt, response, reward and selected flag
    RUN/stages/NNN/kept.jsonl         with raft.replay: the stage's training examples as token
                                      ids, which later stages replay (`stage/replay.py`)
    RUN/stages/NNN/journal.rank*.jsonl  while stage NNN runs: its finished samples and rewards
    RUN/checkpoints/stage-NNN/        policy/ (adapter or full model + tokenizer),
                                      trainer_state.{safetensors,json} (optimizer, schedule, RNG),
                                      state.json (stage, prompt cursor), manifest.json (sha256)
    RUN/report.html                   plots, table and examples (`raftlm report RUN`)
    RUN/.lock                         held by the process that writes the run (`lock.py`)

Every file is written to a temporary name and renamed into place, so a file that exists is
complete; a checkpoint folder appears only once all its files are written. Journals are
append-only (`journal.py`). Temporary names start with a dot; `remove_temporaries` clears
what a killed process left of them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raftlm.errors import InvalidInput
from raftlm.run.checkpoint import (
    LEGACY_FILE,
    MANIFEST_FILE,
    verify_manifest,
    write_manifest,
    write_trainer_state,
)
from raftlm.run.lock import LOCK_NAME
from raftlm.run.signals import critical


def current_umask() -> int:
    """This process's umask, read without changing it where Linux shows it (os.umask can only
    read by setting, which would race with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_like_umask(path: str | Path) -> None:
    """Give a file or folder made by mkstemp/mkdtemp (private: 0600/0700, whatever the umask)
    the mode an ordinary open or mkdir would have, so that what raftlm writes can be read by
    whom the user's umask allows (a web server, another user, a container)."""
    full = 0o777 if Path(path).is_dir() else 0o666
    os.chmod(path, full & ~current_umask())


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with critical():
        _write_and_rename(path, data)


def _write_and_rename(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        share_like_umask(tmp)
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
    def create(cls, root: str | Path, overwrite: bool,
               say: Callable[[str], None] = print) -> RunDir:
        """A new run in `root`: refused where a run kept something (a checkpoint, a stage's
        journal) unless `overwrite`; a run that stopped before keeping anything (it failed in
        its baseline evaluation or first stage) is started over, which `say` tells in a line."""
        run = cls(root)
        if run.root.exists() and any(not p.name.startswith(".") for p in run.root.iterdir()):
            if not overwrite and not run.config_path.is_file():
                raise FileExistsError(f"{run.root} is not empty and holds no run (no "
                                      "config.yaml); choose another run.output_dir, or pass "
                                      "--overwrite to delete what is there")
            kept = run.kept_work()
            if not overwrite and kept:
                raise FileExistsError(
                    f"{run.root} already holds a run ({kept}); continue it with `raftlm train "
                    f"--resume {run.root}`, or pass --overwrite to replace it")
            if not overwrite:
                say(f"{run.root}: the run there stopped before its first stage finished (no "
                    "checkpoint); starting it over")
            for path in run.root.iterdir():  # all but the lock this process holds
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.name != LOCK_NAME:
                    path.unlink()
        run.root.mkdir(parents=True, exist_ok=True)
        return run

    def kept_work(self) -> str | None:
        """What a resume of this run would reuse, in words (None: nothing): its checkpoints or
        the finished samples in a stage's journal."""
        stages = [stage for stage, _ in self.checkpoints()]
        if stages:
            return f"checkpoints of stages {stages[0]}-{stages[-1]}" if len(stages) > 1 else \
                f"the checkpoint of stage {stages[0]}"
        for journal in sorted(self.root.glob("stages/*/journal.rank*.jsonl")):
            with journal.open("rb") as lines:
                if sum(1 for _ in lines) > 1:  # more than its header
                    return f"finished samples of stage {int(journal.parent.name)} in its journal"
        return None

    def remove_temporaries(self) -> list[Path]:
        """Delete what killed writers left: dot-named temporary files and checkpoint staging
        folders (never the lock); returns them."""
        stray = [p for p in self.root.rglob(".*") if p.name != LOCK_NAME]
        for path in sorted(stray, reverse=True):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return stray

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

    def intact_checkpoint(self, warn: Callable[[str], None] = print) -> tuple[int, Path] | None:
        """The newest checkpoint whose files match its manifest; each damaged newer one is
        reported through `warn` (one line) and skipped. Raises when all are damaged."""
        found = self.checkpoints()
        problems = []
        for stage, path in reversed(found):
            legacy = (path / LEGACY_FILE).is_file() and not (path / MANIFEST_FILE).is_file()
            problem = None if legacy else verify_manifest(path)  # legacy: refused when read
            if problem is None:
                return stage, path
            problems.append(f"{path.name}: {problem}")
            warn(f"checkpoint {path} is damaged ({problem}); trying the one before it")
        if problems:
            raise InvalidInput(f"{self.root}: no intact checkpoint ({'; '.join(problems)}); start "
                             f"the run again with --overwrite")
        return None

    def save_checkpoint(
        self,
        stage: int,
        save_policy: Any,
        trainer_state: dict[str, Any],
        state: dict[str, Any],
        keep: int,
    ) -> Path:
        """Write policy, trainer state, loop state and the manifest, then rename the folder
        into place; older checkpoints beyond `keep` are deleted afterwards."""
        target = self.checkpoint_dir(stage)
        target.parent.mkdir(parents=True, exist_ok=True)
        with critical():
            staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
            share_like_umask(staging)
            try:
                save_policy(staging / "policy")
                write_trainer_state(staging, trainer_state)
                (staging / "state.json").write_text(json.dumps(state, indent=2))
                write_manifest(staging)
                if target.exists():
                    shutil.rmtree(target)
                os.replace(staging, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            self.remove_old_checkpoints(keep)
        return target

    def remove_old_checkpoints(self, keep: int) -> None:
        """Delete all but the newest `keep` checkpoints (0 keeps all). Each is renamed to a
        temporary name first: a kill mid-delete leaves a temporary, never half a checkpoint,
        and a resume calls this again for the deletes a kill prevented."""
        if keep <= 0:
            return
        for _, old in self.checkpoints()[:-keep]:
            doomed = old.with_name(f".{old.name}.deleted")
            shutil.rmtree(doomed, ignore_errors=True)  # what an earlier failed delete left
            os.replace(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
