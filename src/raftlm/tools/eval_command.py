"""`raftlm eval`: any model on any evaluation sets, with a JSON summary and one JSONL row per
prompt (prompt, reference answer, responses, extracted answers, correct).

The model: a run directory (its newest checkpoint, or `--stage N`; 0 = the base model), one of
its `checkpoints/stage-NNN` folders, an HF model folder, a .gguf file or an embedded model; or,
as before, `--config FILE` (its `model`) with an optional `--checkpoint DIR`.
The sets: `--preset NAME` (a built-in task's held-out split, e.g. gsm8k's test set) or
`--file PATH` (a prompt file with an `answer` column), each repeatable, with the shared
`--limit`, `--shots`, `--extraction`, `--samples`, `--temperature`, `--max-new-tokens`; without
either, the config's held-out set and `evaluation.sets`, as a run evaluates them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from raftlm.config import RaftConfig
from raftlm.config.evaluation import EXTRACTIONS, TASKS, EvalSet
from raftlm.errors import InvalidInput
from raftlm.tools.args import add_config_args, add_quiet_arg, add_tool_args, with_tools

PRESET_EXTRACTION = ["strict", "lenient"]  # both, where published numbers are compared
SET_MAX_NEW_TOKENS = 256  # GSM8K's worked solutions run to ~150 tokens; eos stops earlier


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `raftlm eval`."""
    parser.add_argument("model", nargs="?", metavar="RUN_DIR|CHECKPOINT|MODEL",
                        help="A run directory, one of its checkpoints/stage-NNN folders, an HF "
                             "model folder, a .gguf file or embedded:smollm2-135m-instruct "
                             "[default: --config's model].")
    add_config_args(parser, required=False,
                    config_help="YAML config: its model (without RUN_DIR|MODEL), held-out set "
                                "and evaluation.sets (without --preset / --file).")
    parser.add_argument("--checkpoint", type=Path, metavar="DIR",
                        help="With --config: a run's checkpoints/stage-NNN folder (LoRA adapter "
                             "or full model); default: the config's base model.")
    parser.add_argument("--stage", type=int, metavar="N",
                        help="With RUN_DIR: that stage's checkpoint (0 = the base model) "
                             "[default: the newest].")
    parser.add_argument("--preset", action="append", default=[], choices=TASKS,
                        help="Evaluate on a built-in task's held-out split (gsm8k: the test "
                             "set, shipped with raftlm); repeatable.")
    parser.add_argument("--file", action="append", default=[], type=Path, metavar="PATH",
                        help="Evaluate on a prompt file with an `answer` column; repeatable.")
    parser.add_argument("--limit", type=int, default=0, metavar="N",
                        help="The first N prompts of each set [default: all].")
    parser.add_argument("--shots", type=int, default=0, metavar="K",
                        help="--preset: k-shot, the task's first K train problems as turns.")
    parser.add_argument("--extraction", nargs="+", choices=EXTRACTIONS, metavar="RULE",
                        help="Answer rules (auto, strict, lenient, math_verify, reward); the "
                             "first names the plain metrics [default: strict lenient for "
                             "--preset, auto for --file].")
    parser.add_argument("--samples", type=int, default=0, metavar="N",
                        help="N sampled responses per prompt for avg@N, maj@N and pass@k "
                             "(every k <= N) [default: 0, greedy only].")
    parser.add_argument("--temperature", type=float, metavar="T",
                        help="Sampling temperature of --samples [default: generation's, 1.0].")
    parser.add_argument("--max-new-tokens", type=int, default=SET_MAX_NEW_TOKENS, metavar="N",
                        help="Response cap of --preset / --file sets [default: %(default)s].")
    parser.add_argument("--output", type=Path, metavar="FILE",
                        help="The JSON summary; the per-prompt rows go beside it as "
                             "<name>.items.jsonl [default: <checkpoint, run directory or "
                             "run.output_dir>/eval.json; a plain model: runs/eval/<model>/].")
    add_tool_args(parser)  # a tool run's config rolls out with its tools without it
    add_quiet_arg(parser)


def run_eval(args: argparse.Namespace) -> int:
    """`raftlm eval`: evaluate, write the summary and the rows, print the metrics."""
    from raftlm.run.rundir import atomic_write_text
    from raftlm.run.tracking import json_safe
    from raftlm.stage.build import evaluate_checkpoint  # torch: only when the command runs

    sets = command_line_sets(args)
    if sets is None and args.config is None and args.model is not None and not _in_a_run(
            Path(args.model)):
        raise InvalidInput("no evaluation set: give --preset NAME or --file PATH (or --config "
                           "with a held-out set)")
    config, checkpoint, default_dir = eval_target(args)
    config = with_tools(config, args)  # evaluation then rolls out with them (per-item turns)
    summary, items = evaluate_checkpoint(config, checkpoint, sets)
    summary = json_safe({"model": str(args.model or config.model.path), **summary})
    output = args.output or default_dir / "eval.json"
    atomic_write_text(output, json.dumps(summary, indent=2) + "\n")
    rows = output.with_name(output.stem + ".items.jsonl")
    atomic_write_text(rows, "".join(json.dumps(json_safe(item)) + "\n" for item in items))
    shown = {k: v for k, v in summary.items() if not isinstance(v, dict)}
    width = max(map(len, shown))
    for key, value in shown.items():
        print(f"{key:<{width}}  {f'{value:.4f}' if isinstance(value, float) else value}")
    print(f"written to {output} (per prompt: {rows})")
    return 0


def eval_target(args: argparse.Namespace) -> tuple[RaftConfig, Path | None, Path]:
    """(config, checkpoint folder or None, default output folder) of the model to evaluate."""
    from raftlm.models.names import check_model_path
    from raftlm.tools.target import is_run_dir, run_checkpoint

    if args.model is None:
        if args.config is None:
            raise InvalidInput("raftlm eval: give RUN_DIR|MODEL or --config FILE")
        config = _last_stage(RaftConfig.from_yaml(args.config, args.overrides))
        if args.checkpoint is not None and not args.checkpoint.is_dir():
            raise FileNotFoundError(f"--checkpoint: no such folder: {args.checkpoint}")
        return config, args.checkpoint, args.checkpoint or Path(config.run.output_dir)
    path = Path(args.model)
    if args.checkpoint is not None:
        raise InvalidInput("--checkpoint goes with --config; with RUN_DIR use --stage N, or "
                           "give the checkpoint folder itself as the model")
    run_dir = _run_of_checkpoint(path)
    if run_dir is not None:  # checkpoints/stage-NNN (or its policy/)
        folder = path.parent if path.name == "policy" else path
        return _run_config(run_dir, args, int(folder.name.split("-")[-1])), path, path
    if is_run_dir(path):
        stage, checkpoint = run_checkpoint(path, args.stage)
        return _run_config(path, args, stage), checkpoint, checkpoint or path
    if args.stage is not None:
        raise InvalidInput(f"--stage needs a run directory; {path} has no config.yaml")
    check_model_path(str(args.model), field="RUN_DIR|MODEL")
    if args.config is not None:
        config = _last_stage(RaftConfig.from_yaml(args.config, args.overrides))
    else:  # defaults around the model, --set applied; its sets come from --preset / --file,
        # so the placeholder task only lets the config validate (no training data is read).
        config = RaftConfig.from_dict({"data": {"task": "arithmetic"}}, args.overrides,
                                      source="--set")
    model = dataclasses.replace(config.model, path=str(args.model), gguf_file=None,
                                lora=dataclasses.replace(config.model.lora, enabled=False))
    name = path.stem if path.suffix else path.name.split(":")[-1]
    return dataclasses.replace(config, model=model), None, Path("runs/eval") / name


def command_line_sets(args: argparse.Namespace) -> list[EvalSet] | None:
    """The sets of --preset / --file (None: the config's own sets)."""
    if not args.preset and not args.file:
        for flag, given in (("--limit", args.limit), ("--shots", args.shots),
                            ("--samples", args.samples), ("--extraction", args.extraction)):
            if given:
                raise InvalidInput(f"{flag} applies to --preset / --file sets; give one")
        return None
    common: dict[str, Any] = dict(size=args.limit, samples=args.samples,
                                  temperature=args.temperature,
                                  max_new_tokens=args.max_new_tokens)
    sets = [EvalSet(name=task, task=task, shots=args.shots,
                    extraction=args.extraction or PRESET_EXTRACTION, **common)
            for task in args.preset]
    if args.file and args.shots:
        raise InvalidInput("--shots applies to --preset sets (a task's train split)")
    sets += [EvalSet(name=file.stem, file=str(file), extraction=args.extraction or ["auto"],
                     **common) for file in args.file]
    for i, eval_set in enumerate(sets):
        eval_set.check(f"set {eval_set.name!r}")
        if eval_set.name in [s.name for s in sets[:i]]:
            raise InvalidInput(f"set {eval_set.name!r} is given twice")
    return sets


def _run_config(run_dir: Path, args: argparse.Namespace, stage: int) -> RaftConfig:
    """The run's config as its stage `stage` ran (per-stage schedules at that stage)."""
    config = RaftConfig.from_yaml(args.config or run_dir / "config.yaml", args.overrides)
    return config.at_stage(stage)


def _last_stage(config: RaftConfig) -> RaftConfig:
    """A config's per-stage schedules at their last stage's values (a checkpoint of unknown
    stage, a model of its own)."""
    return config.at_stage(config.raft.stages)


def _run_of_checkpoint(path: Path) -> Path | None:
    """The run directory of a `checkpoints/stage-NNN` folder (or of its `policy/`), or None."""
    from raftlm.tools.target import is_run_dir

    folder = path.parent if path.name == "policy" else path
    if folder.parent.name == "checkpoints" and is_run_dir(folder.parent.parent):
        return folder.parent.parent
    return None


def _in_a_run(path: Path) -> bool:
    from raftlm.tools.target import is_run_dir

    return is_run_dir(path) or _run_of_checkpoint(path) is not None
