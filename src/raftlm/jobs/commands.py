"""`raftlm generate | score | select | finetune`: a RAFT stage as four jobs (docs/phases.md)."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raftlm.config import ConfigError, RaftConfig
from raftlm.tools.args import add_config_args, add_quiet_arg


def job_config(args: argparse.Namespace, folder: Path | None) -> RaftConfig:
    """`--config` with its `--set` overrides, as `raftlm train` reads them; a work folder's own
    config.yaml when no --config is given."""
    path = args.config
    if path is None and folder is not None and (folder / "config.yaml").is_file():
        path = folder / "config.yaml"
    if path is None:
        raise ConfigError(f"raftlm {args.command}: give --config FILE")
    return RaftConfig.from_yaml(path, args.overrides)


def resumable(args: argparse.Namespace, run: Callable[[], Any]) -> int:
    """Run a job; on SIGINT/SIGTERM say that the same command continues it."""
    from raftlm.run.signals import Interrupted, stop_on_signals

    try:
        with stop_on_signals():
            run()
    except Interrupted as stop:
        command = shlex.join(["raftlm", *sys.argv[1:]]) if sys.argv[1:] else "the same command"
        print(f"raftlm {args.command}: stopped by {stop}; what finished is kept. Continue with: "
              f"{command}", file=sys.stderr)
        return stop.exit_code
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    config = job_config(args, None)
    # torch and transformers only once the config is known to be good (seconds, not a minute)
    from raftlm.jobs.steps import generate_stage
    from raftlm.jobs.workdir import parse_shard

    shard = parse_shard(args.shard)
    return resumable(args, lambda: generate_stage(config, args.out, shard, args.stage,
                                                  args.from_dir))


def cmd_score(args: argparse.Namespace) -> int:
    config = job_config(args, args.work)
    from raftlm.jobs.steps import score_stage

    return resumable(args, lambda: score_stage(config, args.work, args.stage))


def cmd_select(args: argparse.Namespace) -> int:
    config = job_config(args, args.work)
    from raftlm.jobs.steps import select_stage

    select_stage(config, args.work, args.stage, args.out, args.datasets_out)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    config = job_config(args, args.data)
    from raftlm.jobs.steps import finetune_stage

    return resumable(args, lambda: finetune_stage(config, args.data, args.out, args.from_dir,
                                                  args.stage))


def _common(parser: argparse.ArgumentParser, config_help: str) -> None:
    add_config_args(parser, required=False, config_help=config_help)
    parser.add_argument("--stage", type=int, metavar="N",
                        help="The stage [default: 1, or the one after --from's checkpoint; "
                             "for score/select: the work folder's only stage].")
    add_quiet_arg(parser)


def register(commands: Any) -> None:
    """Add `generate`, `score`, `select` and `finetune` to the `raftlm` sub-commands."""
    generate = commands.add_parser(
        "generate", help="Sample a stage's prompts x K responses into a work folder.",
        description="The stage's b prompts (drawn as raftlm train draws them) x K samples, "
                    "written to WORK/stages/NNN/. --shard I/N samples one of N slices, as an "
                    "independent job; shards merge by prompt id. Run again to continue a "
                    "killed job.")
    _common(generate, "YAML config file (as for raftlm train).")
    generate.add_argument("--out", type=Path, required=True, metavar="WORK",
                          help="The work folder (created).")
    generate.add_argument("--shard", default="1/1", metavar="I/N",
                          help="This job's slice of the prompts, 1 <= I <= N [default: 1/1].")
    generate.add_argument("--from", dest="from_dir", type=Path, metavar="RUN_DIR",
                          help="Sample with the policy of RUN_DIR's last checkpoint (the next "
                               "stage, its prompts drawn where that run left off).")
    generate.set_defaults(handler=cmd_generate)

    score = commands.add_parser(
        "score", help="Reward every sample of a work folder's stage.",
        description="Scores all shards of the stage with reward.terms (remote terms too) into "
                    "WORK/stages/NNN/candidates.jsonl; refuses a missing shard. Run again to "
                    "continue a killed job.")
    score.add_argument("work", type=Path, metavar="WORK")
    _common(score, "YAML config file [default: WORK/config.yaml].")
    score.set_defaults(handler=cmd_score)

    select = commands.add_parser(
        "select", help="Keep the best responses of a scored stage (an SFT dataset).",
        description="Ranks the stage as raftlm train does (selection.*, training.objective), "
                    "marks selected/weight in candidates.jsonl, records the stage's numbers in "
                    "WORK/metrics.jsonl and writes the kept set as chat-messages rows "
                    "{messages, reward, weight}.")
    select.add_argument("work", type=Path, metavar="WORK")
    _common(select, "YAML config file [default: WORK/config.yaml].")
    select.add_argument("--out", type=Path, metavar="FILE",
                        help="The kept set as JSONL [default: WORK/stages/NNN/selected.jsonl].")
    select.add_argument("--datasets-out", type=Path, metavar="DIR",
                        help="Also as a `datasets` save_to_disk folder (TRL's SFTTrainer "
                             "loads it with datasets.load_from_disk).")
    select.set_defaults(handler=cmd_select)

    finetune = commands.add_parser(
        "finetune", help="Train one stage on a scored work folder; write a checkpoint.",
        description="One stage of training.objective on the stage in --data, into a run "
                    "directory as raftlm train writes it (checkpoints/stage-NNN). With --from, "
                    "continues that run's policy, optimizer and schedule. Data-parallel under "
                    "accelerate launch.")
    _common(finetune, "YAML config file [default: DATA/config.yaml].")
    finetune.add_argument("--data", type=Path, required=True, metavar="WORK",
                          help="A scored (and selected) work folder.")
    finetune.add_argument("--out", type=Path, required=True, metavar="RUN_DIR",
                          help="The run directory to write (may be the --from one).")
    finetune.add_argument("--from", dest="from_dir", type=Path, metavar="RUN_DIR",
                          help="Continue from RUN_DIR's last checkpoint (the one that sampled "
                               "--data).")
    finetune.set_defaults(handler=cmd_finetune)
