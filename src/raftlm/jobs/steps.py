"""RAFT as separate jobs: `raftlm generate | score | select | finetune`, one step each.

Each step is the very function `raftlm.stage.loop.raft_stage` calls, run on its own with only
what it needs built — generate: the policy and the prompts; score: the reward; select: nothing
heavy; finetune: the policy and its optimizer — and its input and output in a work folder
(`workdir.py`). So a stage run as four jobs equals the stage `raftlm train` runs: the same
candidates, rewards, selection, weights and trained adapter.

generate and score are resumable (their stage journal, as `raftlm train` keeps one inside a
stage); generate splits the stage's prompts into shards that run as independent jobs (each
sample's randomness depends on (seed, stage, prompt id, sample index) alone, so N shards give
the samples of one job). finetune writes a checkpoint as `raftlm train` does; with `--from` it
continues that run's policy, optimizer and schedule.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raftlm.config import RaftConfig
from raftlm.config.teaching import active_hints
from raftlm.data.prompts import PromptOrder, PromptRecord, load_prompt_sets
from raftlm.jobs.workdir import (
    CANDIDATES_FILE,
    WorkMismatch,
    candidate_table,
    candidates_from_rows,
    check_same,
    check_sampled_with,
    check_scored_with,
    find_stage,
    read_job,
    read_shard_header,
    read_shards,
    refuse_what_only_train_does,
    sampling_fingerprint,
    sft_rows,
    shard_bounds,
    shard_name,
    stage_folder,
    write_job,
    write_shard,
)
from raftlm.models.distributed import process_state, whole_model
from raftlm.models.loading import merged_adapter
from raftlm.rewards.kinds import reward_fingerprint
from raftlm.rewards.reward import Reward, build_reward
from raftlm.run.journal import StageJournal
from raftlm.run.lock import run_lock
from raftlm.run.rundir import RunDir, atomic_write_text, read_jsonl, write_jsonl
from raftlm.run.tracking import Tracker, json_safe
from raftlm.sampling.generate import GENERATION_BACKENDS
from raftlm.stage.build import (
    build_policy,
    build_trainer,
    checkpoint_prompt_order,
    make_accelerator,
    restore,
    set_threads,
    write_checkpoint,
)
from raftlm.stage.collect import Collect, Timer
from raftlm.stage.collectors import collector, collector_stats
from raftlm.stage.finetune import fine_tune
from raftlm.stage.rank import rank
from raftlm.stage.record import candidate_metrics, candidate_rows, fmt, reward_summary
from raftlm.stage.rollouts import Rollouts, reward_rows_to_rollouts
from raftlm.training.objectives import check_objective_config

Checkpoint = tuple[int, Path]


@dataclass
class JobParts:
    """What the Collect primitive uses of a run, for a job that builds only part of one."""

    config: RaftConfig
    tokenizer: Any = None
    reward: Reward | None = None
    teacher: None = None  # `raftlm generate` refuses generation.teacher


def policy_source(from_dir: Path | None) -> tuple[Checkpoint | None, dict[str, Any] | None]:
    """The last intact checkpoint of `from_dir` and how work folders record it (its stage and
    the hash of its manifest, so another checkpoint of the same stage is told apart)."""
    if from_dir is None:
        return None, None
    checkpoint = RunDir(from_dir).intact_checkpoint()
    if checkpoint is None:
        raise WorkMismatch(f"--from {from_dir}: no checkpoint in it")
    stage, path = checkpoint
    manifest = (path / "manifest.json").read_bytes()
    return checkpoint, {"stage": stage, "manifest": hashlib.sha256(manifest).hexdigest()[:16]}


def stage_after(checkpoint: Checkpoint | None, stage: int | None) -> int:
    """The stage to run: the one after `--from`'s checkpoint (1 without one) unless given."""
    if checkpoint is None:
        return 1 if stage is None else stage
    if stage is not None and stage != checkpoint[0] + 1:
        raise WorkMismatch(f"--stage {stage}: the --from run's last checkpoint is stage "
                           f"{checkpoint[0]}, whose policy samples stage {checkpoint[0] + 1}")
    return checkpoint[0] + 1


def _single_process(command: str) -> None:
    if process_state().num_processes > 1:
        raise WorkMismatch(f"raftlm {command} runs as one process per job; split the work with "
                           "raftlm generate --shard I/N instead of accelerate launch")


# --------------------------------------------------------------------------- generate


def generate_stage(config: RaftConfig, work: Path, shard: tuple[int, int] = (1, 1),
                   stage: int | None = None, from_dir: Path | None = None) -> Path:
    """Sample K responses to each of the stage's prompts in this shard; returns the shard's
    file. A killed job continues where it stopped; a finished shard is not sampled again."""
    _single_process("generate")
    if collector(config.raft.collector).rewards_between_rounds:
        raise WorkMismatch(
            f"raft.collector={config.raft.collector} decides how many more samples to draw from "
            "the rewards of its earlier rounds, so sampling and scoring cannot be separate jobs; "
            "raftlm generate samples a fixed stage (b prompts x K): use raftlm train for it, or "
            "raft.collector=fixed")
    if config.generation.teacher is not None or active_hints(config) is not None:
        raise WorkMismatch(
            "generation.teacher and raft.hints: raftlm generate samples the policy's own K "
            "(hints depend on the stage's rewards); use raftlm train for them")
    set_threads(config)
    GENERATION_BACKENDS[config.generation.backend].check_available()
    checkpoint, source = policy_source(from_dir)
    stage = stage_after(checkpoint, stage)
    given, config = config, config.at_stage(stage)  # schedules at the stage's values
    folder, (index, count) = stage_folder(work, stage), shard
    fingerprint = sampling_fingerprint(config, source)
    out = folder / "shards" / f"{shard_name(index, count)}.jsonl"
    _check_stage(folder, fingerprint, count)  # before loading anything
    header = read_shard_header(out)
    if header is not None:
        check_same(out, "sampled under another config", header["fingerprint"], fingerprint,
                   "give the config it was generated with, or another --out")
        print(f"stage {stage} shard {index}/{count}: already generated ({out})")
        return out

    accelerator, dtype = make_accelerator(config)
    model, tokenizer = build_policy(config, accelerator.device, dtype, checkpoint)
    prompts, order = stage_prompts(config, tokenizer, checkpoint, stage)
    if not (folder / "job.json").is_file():  # every shard writes the same one
        write_job(folder, {"stage": stage, "shards": count, "prompt_ids": [p.id for p in prompts],
                           "prompt_order": order.state_dict(), "policy": source,
                           "fingerprint": fingerprint})
    if not (Path(work) / "config.yaml").is_file():
        atomic_write_text(Path(work) / "config.yaml", given.to_yaml())

    start, end = shard_bounds(len(prompts), index, count)
    mine = prompts[start:end]
    journal_dir = folder / "shards" / shard_name(index, count)
    with run_lock(journal_dir):  # one job per shard
        journal = StageJournal(
            journal_dir, 0, {"stage": stage, "prompt_ids": [p.id for p in mine],
                             "samples_per_prompt": config.raft.samples_per_prompt,
                             "fingerprint": fingerprint},
            reuse=GENERATION_BACKENDS[config.generation.backend].keeps_done)
        model = accelerator.prepare(model)  # as in training: the same mixed-precision forward
        began = time.perf_counter()
        collect = Collect(JobParts(config, tokenizer), stage, journal)
        with whole_model(accelerator, model) as whole, merged_adapter(whole) as policy:
            responses = collect.sample(policy, mine, [config.raft.samples_per_prompt] * len(mine))
        width = max((len(r) for r in responses), default=0)
        rows = candidate_table(Rollouts(mine, responses, np.full((len(mine), width), np.nan)))
        write_shard(out, {"stage": stage, "index": index, "count": count,
                          "fingerprint": fingerprint, "seconds": time.perf_counter() - began},
                    rows)
        journal.close()
    shutil.rmtree(journal_dir, ignore_errors=True)
    print(f"stage {stage} shard {index}/{count}: {len(rows)} samples of {len(mine)} prompts "
          f"-> {out}")
    return out


def stage_prompts(config: RaftConfig, tokenizer: Any, checkpoint: Checkpoint | None,
                  stage: int) -> tuple[list[PromptRecord], PromptOrder]:
    """The stage's prompts, drawn as `raftlm train` draws them (from where `checkpoint`'s run
    left off), and the prompt order after the draw."""
    train_prompts, _ = load_prompt_sets(config, tokenizer)
    order = PromptOrder(len(train_prompts), config.run.seed)
    if checkpoint is not None:
        order.load_state_dict(checkpoint_prompt_order(checkpoint[1]))
    for _ in range(stage - 1 - (checkpoint[0] if checkpoint else 0)):  # --stage N, no --from
        order.draw(config.raft.prompts_per_stage)
    drawn = order.draw(config.raft.prompts_per_stage)
    return [train_prompts.records[i] for i in drawn], order


def _check_stage(folder: Path, fingerprint: dict[str, str], count: int) -> None:
    """Refuse to add a shard to a stage folder of another config or shard count."""
    if not (folder / "job.json").is_file():
        return
    old = read_job(folder)
    check_same(folder, "sampled under another config", old["fingerprint"], fingerprint,
               "give the --config (and --set, --from) it was generated with, or another --out")
    if old["shards"] != count:
        raise WorkMismatch(f"{folder}: split into {old['shards']} shards; this job is one of "
                           f"{count} (use --shard I/{old['shards']})")


# --------------------------------------------------------------------------- score


def score_stage(config: RaftConfig, work: Path, stage: int | None = None) -> Path:
    """Reward every sample of a generated stage (all its shards); returns candidates.jsonl.
    A killed job continues where it stopped; a stage scored under this reward config is not
    scored again."""
    _single_process("score")
    set_threads(config)
    stage = find_stage(work, stage)
    config = config.at_stage(stage)
    folder = stage_folder(work, stage)
    job = read_job(folder)
    check_sampled_with(folder, job, config, job["policy"])
    fingerprint, out = reward_fingerprint(config.reward), folder / CANDIDATES_FILE
    if job.get("scoring") == fingerprint and out.is_file():
        print(f"stage {stage}: already scored ({out})")
        return out
    candidates = candidates_from_rows(read_shards(folder, job))
    reward, timer, score_dir = build_reward(config.reward), Timer(), folder / "score"
    with run_lock(score_dir):
        journal = StageJournal(score_dir, 0, {"stage": stage, "prompt_ids": job["prompt_ids"],
                                              "fingerprint": job["fingerprint"],
                                              "scoring": fingerprint})
        with timer("reward"):
            collect = Collect(JobParts(config, reward=reward), stage, journal)
            rows = collect.score(candidates.prompts, candidates.responses)
            scored = reward_rows_to_rollouts(
                candidates.prompts, candidates.responses, rows,
                sorted({name for row in rows for name in row["terms"]}))
        write_jsonl(out, candidate_table(scored))
        job = {k: v for k, v in read_job(folder).items() if k != "selected"}
        write_job(folder, {**job, "scoring": fingerprint, **timer.seconds})
        journal.close()
    shutil.rmtree(score_dir, ignore_errors=True)
    print(f"stage {stage}: scored {sum(map(len, scored.responses))} samples -> {out}")
    return out


# --------------------------------------------------------------------------- select


def select_stage(config: RaftConfig, work: Path, stage: int | None = None,
                 out: Path | None = None, datasets_out: Path | None = None) -> Path:
    """Rank a scored stage: mark what the objective trains on (selected, weight) in
    candidates.jsonl, record the stage's numbers in WORK/metrics.jsonl, and write the kept set
    in chat-messages SFT format to `out` (and as a `datasets` folder); returns `out`."""
    check_objective_config(config)
    refuse_what_only_train_does(config, "select")
    stage = find_stage(work, stage)
    config = config.at_stage(stage)
    folder = stage_folder(work, stage)
    job = read_job(folder)
    check_sampled_with(folder, job, config, job["policy"])
    check_scored_with(folder, job, config)
    candidates = scored_candidates(folder, config)
    ranked = rank(candidates, config, stage)
    rows = candidate_table(candidates, ranked)
    write_jsonl(folder / CANDIDATES_FILE, rows)
    write_job(folder, {**job, "selected": ranked.selection.n_selected})
    run_dir = RunDir(work)
    record = {"stage": stage, **json_safe({**candidate_metrics(candidates, ranked),
                                           **_phase_seconds(folder, job)})}
    write_jsonl(run_dir.metrics_path,
                [r for r in run_dir.read_metrics() if r.get("stage") != stage] + [record])
    kept = sft_rows(rows, config.data.system_prompt)
    out = Path(out) if out is not None else folder / "selected.jsonl"
    write_jsonl(out, kept)
    if datasets_out is not None:
        from datasets import Dataset  # an optional dependency: only for --datasets-out

        Dataset.from_list(kept).save_to_disk(str(datasets_out))
    print(f"stage {stage}: {len(kept)} of {len(rows)} responses kept "
          f"({reward_summary(record)}) -> {out}")
    return out


def scored_candidates(folder: Path, config: RaftConfig) -> Rollouts:
    """A scored stage's rollouts, with the `sampling/*` numbers of one fixed round."""
    candidates = candidates_from_rows(read_jsonl(folder / CANDIDATES_FILE))
    candidates.collector_stats = collector_stats(candidates, config, rounds=1)
    return candidates


def _phase_seconds(folder: Path, job: dict[str, Any]) -> dict[str, float]:
    """Sampling seconds (summed over shards) and scoring seconds, as `raftlm train` records."""
    shards = [read_shard_header(folder / "shards" / f"{shard_name(i, job['shards'])}.jsonl")
              for i in range(1, job["shards"] + 1)]
    seconds = {"time/generate_s": sum(h.get("seconds", 0.0) for h in shards if h)}
    if "time/reward_s" in job:
        seconds["time/reward_s"] = job["time/reward_s"]
    return seconds


# --------------------------------------------------------------------------- finetune


def finetune_stage(config: RaftConfig, data: Path, out: Path, from_dir: Path | None = None,
                   stage: int | None = None) -> Path | None:
    """One stage of the configured objective on a scored work folder; writes `out` as
    `raftlm train` writes a run directory (candidates, metrics, a checkpoint of the stage).
    With `--from RUN_DIR` training continues that run's policy, optimizer and schedule.
    Returns the checkpoint folder (on the main process)."""
    set_threads(config)
    check_objective_config(config)
    refuse_what_only_train_does(config, "finetune")
    checkpoint, source = policy_source(from_dir)
    if checkpoint is not None and stage is None and not stage_folder(data, checkpoint[0] + 1
                                                                     ).is_dir():
        raise WorkMismatch(f"--from {from_dir}: its last checkpoint is stage {checkpoint[0]} "
                           f"and {data} holds no stage {checkpoint[0] + 1} (already fine-tuned?); "
                           f"raftlm generate --from {from_dir} samples the next one")
    stage = find_stage(data, stage if checkpoint is None else stage_after(checkpoint, stage))
    given, config = config, config.at_stage(stage)
    folder = stage_folder(data, stage)
    job = read_job(folder)
    check_sampled_with(folder, job, config, source)
    check_scored_with(folder, job, config)
    rows = read_jsonl(folder / CANDIDATES_FILE)
    candidates = scored_candidates(folder, config)
    ranked = rank(candidates, config, stage)
    if job.get("selected") is not None:  # select ran: it must have chosen what training uses
        check_same(folder, "selected under other selection.* / training.* settings",
                   _choice(rows), _choice(candidate_table(candidates, ranked)),
                   "run raftlm select on it again with this config")

    accelerator, dtype = make_accelerator(config)
    main = accelerator.is_main_process
    with run_lock(out) if main else nullcontext():
        run_dir = _open_out(given, Path(out), from_dir, stage, main)
        accelerator.wait_for_everyone()
        model, tokenizer = build_policy(config, accelerator.device, dtype, checkpoint)
        trainer = build_trainer(config, model, accelerator, tokenizer.pad_token_id)
        order = PromptOrder(job["prompt_order"]["n"], config.run.seed)
        if checkpoint is not None:
            restore(checkpoint, trainer, order)
        order.load_state_dict(job["prompt_order"])  # where the stage's draw left it
        timer = Timer()
        with timer("train"):
            stats = fine_tune(trainer, candidates, ranked, stage, tokenizer.pad_token_id,
                              config.generation.temperature)
        if main:
            write_jsonl(run_dir.candidates_path(stage),
                        candidate_rows(candidates, ranked.selection.mask))
        tracker = Tracker(run_dir, config.tracking, enabled=main)
        tracker.log(stage, {**candidate_metrics(candidates, ranked), **stats,
                            **_phase_seconds(folder, job), **timer.seconds})
        path = write_checkpoint(trainer, tokenizer, order, run_dir, stage,
                                config.run.keep_checkpoints)
        tracker.close()
    if main:
        print(f"stage {stage}: trained on {stats['tokens/trained']} tokens "
              f"(sft_loss {fmt(stats['train/sft_loss'])}) -> {path}")
    return path


def _choice(rows: list[dict[str, Any]]) -> str:
    """A digest of what a stage trains on: selected flags and weights."""
    text = json.dumps([(r["selected"], r["weight"]) for r in rows])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _open_out(config: RaftConfig, out: Path, from_dir: Path | None, stage: int,
              main: bool) -> RunDir:
    """The run directory finetune writes: `--from`'s own (continued), a new one, or one that an
    interrupted finetune of this stage left without a checkpoint."""
    run_dir = RunDir(out)
    if not main:
        return run_dir
    same = from_dir is not None and out.resolve() == Path(from_dir).resolve()
    if not same and run_dir.config_path.is_file():
        if run_dir.checkpoints():
            raise WorkMismatch(f"--out {out}: already holds a run with checkpoints; continue it "
                               f"with --from {out}, or choose another --out")
    elif not same:
        RunDir.create(out, overwrite=False)
    run_dir.remove_temporaries()
    run_dir.truncate_metrics(stage - 1)  # a record an interrupted finetune left
    run = dataclasses.replace(config.run, output_dir=str(out))
    run_dir.write_config(dataclasses.replace(config, run=run).to_yaml())
    return run_dir
