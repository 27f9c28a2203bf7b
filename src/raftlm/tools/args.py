"""Command-line arguments every command shares."""

from __future__ import annotations

import argparse
from pathlib import Path


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
