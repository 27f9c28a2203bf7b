"""What `raftlm export | sample | chat` act on: a run directory (a stage's policy, built the way
`raftlm eval` builds it) or a model (HF folder, .gguf file, the embedded model)."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from raftlm.config import RaftConfig
from raftlm.errors import InvalidInput
from raftlm.models.loading import load_policy, resolve_dtype
from raftlm.models.names import check_model_path
from raftlm.run.rundir import RunDir
from raftlm.stage.build import load_for_eval


@dataclass
class Target:
    model: Any  # eval mode; a PeftModel when the stage holds a LoRA adapter
    tokenizer: Any
    config: RaftConfig  # the run's config, or defaults around the given model
    run_dir: Path | None
    stage: int | None  # the run's stage (0 = its base model); None for a plain model
    checkpoint: Path | None


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / "config.yaml").is_file()


def run_checkpoint(run_dir: Path, stage: int | None) -> tuple[int, Path | None]:
    """(stage, its checkpoint folder): the latest by default; stage 0 is the base model."""
    runs = RunDir(run_dir)
    if stage == 0:
        return 0, None
    if stage is None:
        # The newest checkpoint that passes its manifest (a damaged one is named and skipped).
        latest = runs.intact_checkpoint(warn=lambda line: print(line, file=sys.stderr))
        if latest is None:
            raise FileNotFoundError(f"{run_dir}: no checkpoints yet (use --stage 0 for the "
                                    "base model)")
        return latest
    folder = runs.checkpoint_dir(stage)
    if not folder.is_dir():
        kept = ", ".join(str(s) for s, _ in runs.checkpoints()) or "none"
        raise FileNotFoundError(f"--stage {stage}: no checkpoint {folder} (kept stages: {kept}; "
                                "0 = the base model)")
    return stage, folder


def load_target(path: str | Path, stage: int | None = None, dtype: str | None = None) -> Target:
    """The policy of RUN_DIR's stage (latest by default) or of a model path, in eval mode."""
    device = torch.device("cpu")
    if is_run_dir(path):
        run_dir = Path(path)
        config = RaftConfig.from_yaml(run_dir / "config.yaml")
        stage, checkpoint = run_checkpoint(run_dir, stage)
        config = config.at_stage(stage)  # per-stage schedules: the checkpoint stage's values
        torch_dtype = resolve_dtype(dtype or config.model.dtype, device)
        model, tokenizer = load_for_eval(config, checkpoint, device, torch_dtype)
        return Target(model.eval(), tokenizer, config, run_dir, stage, checkpoint)
    if stage is not None:
        raise InvalidInput(f"--stage needs a run directory; {path} has no config.yaml")
    check_model_path(str(path), field="RUN_DIR|MODEL")
    config = RaftConfig()
    config.model = dataclasses.replace(
        config.model, path=str(path), lora=dataclasses.replace(config.model.lora, enabled=False))
    model, tokenizer = load_policy(config.model, device, resolve_dtype(dtype or "fp32", device))
    return Target(model.eval(), tokenizer, config, None, None, None)
