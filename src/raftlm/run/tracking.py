"""Record metrics: always `metrics.jsonl`; TensorBoard and W&B when switched on.

The optional trackers' libraries are imported only when enabled, so neither is a dependency.
"""

from __future__ import annotations

import math
from typing import Any

from raftlm.config import TrackingConfig
from raftlm.run.rundir import RunDir


class Tracker:
    def __init__(self, run_dir: RunDir, config: TrackingConfig, enabled: bool = True):
        self.run_dir = run_dir
        self.enabled = enabled  # only the main process writes
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

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


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
