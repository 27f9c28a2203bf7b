"""Record metrics: always `metrics.jsonl`; TensorBoard and W&B when switched on.

The optional trackers' libraries are imported only when enabled, so neither is a dependency.
"""

from __future__ import annotations

import math
from typing import Any

from raftlm.config import TrackingConfig
from raftlm.run.rundir import RunDir

COMPLETION_COLUMNS = ["prompt_id", "sample", "prompt", "response", "reward", "selected"]


class Tracker:
    def __init__(self, run_dir: RunDir, config: TrackingConfig, enabled: bool = True):
        self.run_dir = run_dir
        self.enabled = enabled  # only the main process writes
        self.completions_every = config.log_completions
        self._tensorboard = None
        self._wandb = None
        if not enabled:
            return
        if config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(run_dir.root / "tensorboard"))
        if config.wandb:
            import wandb

            self._wandb = wandb.init(
                project=config.wandb_project,
                dir=str(run_dir.root),
                name=run_dir.root.name,
                resume="allow",
            )

    def log(self, stage: int, metrics: dict[str, Any]) -> None:
        """Append one record `{"stage": stage, **metrics}` and forward numbers to trackers."""
        if not self.enabled:
            return
        record = {"stage": stage, **json_safe(metrics)}
        self.run_dir.append_metrics(record)
        numbers = {
            k: v for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "stage"
        }
        if self._tensorboard is not None:
            for key, value in numbers.items():
                self._tensorboard.add_scalar(key, value, global_step=stage)
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log(numbers, step=stage)

    def log_completions(self, stage: int, rows: list[dict[str, Any]]) -> bool:
        """Every `tracking.log_completions` stages, the stage's candidates as a table to W&B
        (`completions`, a wandb.Table) and TensorBoard (`completions`, a Markdown text).

        `rows` are the stage's `candidates.jsonl` rows: prompt, response, reward, `rewards`
        ({term: value}) and selected. Returns whether anything was logged.
        """
        due = self.completions_every > 0 and stage % self.completions_every == 0
        if not (self.enabled and due and rows) or (self._wandb is None and
                                                   self._tensorboard is None):
            return False
        columns, table = completion_table(rows)
        if self._wandb is not None:
            import wandb

            self._wandb.log({"completions": wandb.Table(columns=columns, data=table)},
                            step=stage)
        if self._tensorboard is not None:
            self._tensorboard.add_text("completions", markdown_table(columns, table),
                                       global_step=stage)
            self._tensorboard.flush()
        return True

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def completion_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """(columns, rows): the candidates' fields, then one column per reward term."""
    terms = list(dict.fromkeys(t for row in rows for t in (row.get("rewards") or {})))
    columns = COMPLETION_COLUMNS + [f"reward/{t}" for t in terms]
    table = [[_plain(_prompt(row) if c == "prompt" else row.get(c)) for c in COMPLETION_COLUMNS]
             + [_plain((row.get("rewards") or {}).get(t)) for t in terms] for row in rows]
    return columns, table


def _prompt(row: dict[str, Any]) -> str:
    """The prompt as in the data (text, or `role: content` lines), not the chat template."""
    original = row.get("original_prompt")
    if isinstance(original, str):
        return original
    if isinstance(original, list):
        return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in original
                         if isinstance(m, dict))
    return str(row.get("prompt", ""))


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table (TensorBoard's text plugin renders it), cells on one line each."""
    def cell(value: Any) -> str:
        text = f"{value:.4g}" if isinstance(value, float) else "" if value is None else str(value)
        return " ".join(text.split()).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def json_safe(record: dict[str, Any]) -> dict[str, Any]:
    """The record with numpy numbers as Python numbers and NaN/inf as None."""
    return {key: _plain(value) for key, value in record.items()}


def _plain(value: Any) -> Any:
    """JSON-safe scalars: numpy numbers become Python numbers, NaN becomes None."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
