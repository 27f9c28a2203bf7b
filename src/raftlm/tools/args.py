"""Command-line arguments every command shares."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any


def add_config_args(parser: argparse.ArgumentParser, required: bool,
                    config_help: str = "YAML config file.") -> None:
    """`--config FILE` and repeatable `--set key.sub=value`, the same for every command."""
    parser.add_argument("--config", type=Path, required=required, help=config_help)
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="Override a config field, e.g. --set raft.stages=4 (repeatable).",
    )


def add_quiet_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true",
                        help="No progress bars or progress lines (summaries stay).")


def add_threads_arg(parser: argparse.ArgumentParser) -> None:
    """`--threads N`: torch's CPU threads (`raftlm.run.threads.configure_threads`)."""
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads [default: one per core, or OMP_NUM_THREADS; idle "
                             "threads sleep rather than spin, so a busy machine stays usable].")


def add_tool_args(parser: argparse.ArgumentParser) -> None:
    """`--tool SPEC` (repeatable) and `--tool-choice`: roll out with tools, as a tool run does."""
    parser.add_argument("--tool", dest="tools", action="append", default=[], metavar="SPEC",
                        help="A tool the model may call: calculator, pkg.mod:fn or file.py:fn "
                             "(repeatable) [default: a tool run's own rollout.tools].")
    parser.add_argument("--tool-choice", metavar="CHOICE",
                        help="auto, required or a tool's name: forced function calling, the "
                             "first turn starts with the call [default: the run's, else auto].")


def with_tools(config: Any, args: argparse.Namespace) -> Any:
    """`config` with the command line's `--tool` / `--tool-choice` as its `rollout` section (a
    tool run's own section when neither is given); ConfigError naming `--tool` otherwise."""
    from raftlm.config.sections import RolloutConfig

    if not args.tools and args.tool_choice is None:
        return config
    rollout = config.rollout or RolloutConfig()
    if args.tools:
        rollout = dataclasses.replace(rollout, tools=list(args.tools))
    if args.tool_choice is not None:
        rollout = dataclasses.replace(rollout, tool_choice=args.tool_choice)
    rollout.check("--tool")
    return dataclasses.replace(config, rollout=rollout)
