"""Command line: `raftlm <command>`; each command module registers its own sub-commands."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable

from raftlm import __version__
from raftlm.errors import UserError
from raftlm.tools.commands import add_verbose_flags

# Each module has `register(subparsers)`: a new command is a module and one line here.
COMMAND_MODULES = (
    "raftlm.tools.run_commands",  # train, eval, report, compare
    "raftlm.tools.commands",  # init, cache, export, sample, chat, serve, serve-reward
    "raftlm.jobs.commands",  # generate, score, select, finetune
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raftlm", description="RAFT: sample, rank by reward, fine-tune on the best, repeat."
    )
    parser.add_argument("--version", action="version", version=f"raftlm {__version__}")
    commands = parser.add_subparsers(dest="command")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(commands)
    add_verbose_flags(commands)  # after every command is registered
    commands.metavar = "{" + ",".join(commands.choices) + "}"  # every command, from one place
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 0
    from raftlm.run.progress import configure_output

    configure_output(getattr(args, "quiet", False), getattr(args, "verbose", False))
    try:
        return handler(args)
    except (UserError, OSError) as err:
        # The user's to fix (a field, a file, a row; a disk or a permission): one line naming
        # it, no traceback. Anything else is a bug and keeps its traceback. What the run
        # already wrote (completed stages, checkpoints) stays; `--resume` continues from it.
        if os.environ.get("RAFTLM_TRACEBACK"):
            raise
        print(f"raftlm {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2


def one_line(err: BaseException) -> str:
    """The error as one line; OS errors as `file: reason` (e.g. permission denied)."""
    if isinstance(err, OSError) and err.filename and err.strerror:
        return f"{err.filename}: {err.strerror[0].lower()}{err.strerror[1:]}"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
