"""`raftlm train | eval | report | compare`: the run's own commands, their arguments and
handlers."""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path
from typing import Any

from raftlm.config import ConfigError, RaftConfig, field_help
from raftlm.run.signals import Interrupted, stop_on_signals
from raftlm.tools.args import add_config_args, add_quiet_arg
from raftlm.tools.eval_command import add_eval_arguments


def config_reference() -> str:
    """Every config field with its default and help, for `--help`."""
    rows = field_help()
    width = max(len(name) for name, _, _ in rows)
    lines = ["config fields (YAML sections; override any with --set key.sub=value):"]
    lines += [f"  {name:<{width}}  {text} [default: {default!r}]" for name, text, default in rows]
    return "\n".join(lines)


def load_config(args: argparse.Namespace) -> RaftConfig:
    return RaftConfig.from_yaml(args.config, args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.resume:
        config_path = args.config or Path(args.resume) / "config.yaml"
        if not config_path.is_file():
            raise FileNotFoundError(nothing_to_resume(Path(args.resume)))
        overrides.append(f"run.output_dir={args.resume}")
        config = RaftConfig.from_yaml(config_path, overrides)
    else:
        if args.config is None:
            raise ConfigError("raftlm train: give --config FILE (or --resume RUN_DIR)")
        if args.overwrite:
            overrides.append("run.overwrite=true")
        config = RaftConfig.from_yaml(args.config, overrides)
    from raftlm.stage.loop import train  # torch and transformers: after the config is checked

    try:
        with stop_on_signals():
            result = train(config, resume=bool(args.resume))
    except Interrupted as stop:
        print(f"raftlm train: stopped by {stop}; everything finished so far is kept. Continue "
              f"with: raftlm train --resume {config.run.output_dir}", file=sys.stderr)
        return stop.exit_code
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise OSError(err.errno, f"no space left on device writing {err.filename or 'the run'}; "
                      "the last complete checkpoint is intact: free some space, then continue "
                      f"with: raftlm train --resume {config.run.output_dir}") from None
    from raftlm.models.distributed import process_state

    if process_state().is_main_process:  # under `accelerate launch`, say it once
        print(final_message(result.run_dir, result.metrics))
    return 0


def nothing_to_resume(run_dir: Path) -> str:
    """Why `--resume RUN_DIR` has nothing to continue, and the command that starts the run."""
    start = f"raftlm train --config YOUR_CONFIG.yaml --set run.output_dir={run_dir}"
    if not run_dir.is_dir():
        return f"--resume {run_dir}: no such run directory; start a run there with: {start}"
    return (f"--resume {run_dir}: nothing was started there (no config.yaml: it was stopped "
            f"during start-up or never run); start it with: {start}")


def final_message(run_dir: Path, metrics: list[dict]) -> str:
    """Before/after numbers of the held-out evaluation, and where the run lives."""
    evals = [m for m in metrics if "eval/reward_mean" in m]
    lines = [f"run directory: {run_dir}"]
    if len(evals) >= 2:
        first, last = evals[0], evals[-1]
        for key in ("eval/accuracy", "eval/reward_mean"):
            if key in first and key in last:
                lines.append(
                    f"{key}: {first[key]:.3f} (stage {first['stage']}) -> "
                    f"{last[key]:.3f} (stage {last['stage']})"
                )
    report = run_dir / "report.html"
    if report.is_file():
        lines.append(f"report: {report}")
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> int:
    from raftlm.tools.eval_command import run_eval

    return run_eval(args)


def cmd_report(args: argparse.Namespace) -> int:
    from raftlm.run.report import write_report

    print(f"report: {write_report(args.run_dir)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from raftlm.run.compare import write_comparison

    out = args.out or args.run_dirs[0].parent / "compare"
    print(f"comparison: {write_comparison(args.run_dirs, out, args.label)}")
    return 0


def register(commands: Any) -> None:
    """Add `train`, `eval`, `report` and `compare` to the `raftlm` sub-commands."""
    train = commands.add_parser(
        "train", help="Run RAFT.", epilog=config_reference(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run RAFT from a YAML config, or continue an interrupted run.",
    )
    add_config_args(train, required=False)
    train.add_argument("--resume", type=Path, metavar="RUN_DIR",
                       help="Continue the run in RUN_DIR after its last completed stage.")
    train.add_argument("--overwrite", action="store_true",
                       help="Replace an existing run in run.output_dir.")
    add_quiet_arg(train)
    train.set_defaults(handler=cmd_train)

    evaluate = commands.add_parser(
        "eval", help="Evaluate a run, a checkpoint or any model on evaluation sets.",
        description="Accuracy (greedy), avg@n, maj@n, pass@k, reward and more of a run's "
                    "policy or any model, on the config's held-out set and evaluation.sets or "
                    "on --preset / --file sets; a JSON summary and one JSONL row per prompt "
                    "(docs/evaluation.md).",
    )
    add_eval_arguments(evaluate)
    evaluate.set_defaults(handler=cmd_eval)

    report = commands.add_parser(
        "report", help="Write plots and report.html for a run directory.",
        description="Plots (RUN_DIR/plots/*.png) and one self-contained RUN_DIR/report.html.",
    )
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    report.set_defaults(handler=cmd_report)

    compare = commands.add_parser(
        "compare", help="Overlay several runs on one page (compare.html + PNGs).",
        description="Held-out accuracy per stage and per wall-clock second, reward against KL, "
                    "entropy and a table of final numbers for several run directories.",
    )
    compare.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    compare.add_argument("--out", type=Path, metavar="DIR",
                         help="Output folder [default: <parent of the first RUN_DIR>/compare].")
    compare.add_argument("--label", action="append", metavar="NAME",
                         help="One per RUN_DIR, in order: runs sharing a label form a group "
                              "[default: runs whose configs differ only in run.* (the seed) "
                              "are a group].")
    compare.set_defaults(handler=cmd_compare)
