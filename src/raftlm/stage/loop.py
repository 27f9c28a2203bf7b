"""The RAFT loop (Dong et al. 2023, "RAFT: Reward rAnked FineTuning", Algorithm 1).

For t = 1..T:
  1. Collect   draw b prompts; sample K responses each from the current policy
  2. Rank      score every response with the reward; keep the best (per prompt, top-k per
               prompt, or the global top fraction), after filters
  3. Fine-tune SFT on the kept (prompt, response) pairs, response tokens only (or another
               objective of the RAFT family, `training.objective`: docs/objectives.md)
  4. Record    log the kept set's SFT loss before the update, evaluate after it, write the
               stage's candidates, metrics and a checkpoint
After the last stage: report.html (plots, per-stage table, example responses).

Supports: any HF causal LM folder or GGUF file, LoRA or full fine-tuning, fp32/bf16, reward
functions (TRL signature), reward models and verifiable rewards, resume from the last
completed stage; several processes (`accelerate launch`: each samples and scores a shard of the
prompts, all rank the gathered candidates, training is data-parallel), vLLM sampling, and
`offload: phases` (policy and reward models take turns on the accelerator, `offload.py`).
Components live in their own modules; this file only sequences them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raftlm.config import RaftConfig
from raftlm.evaluation.evaluate import evaluate
from raftlm.run.report import write_report
from raftlm.run.rundir import write_jsonl
from raftlm.stage.build import Run, exclusive_run_dir, prepare_run, save_checkpoint
from raftlm.stage.collect import Collect, Timer, open_journal
from raftlm.stage.collectors import collect_stage
from raftlm.stage.finetune import fine_tune
from raftlm.stage.rank import rank
from raftlm.stage.record import candidate_metrics, candidate_rows, reward_summary
from raftlm.stage.replay import extend_examples


@dataclass
class RunResult:
    run_dir: Path
    metrics: list[dict[str, Any]]  # every record of metrics.jsonl, stage 0 = baseline


def train(config: RaftConfig, resume: bool = False) -> RunResult:
    """Run (or, with `resume`, continue) RAFT as configured; returns the run directory.

    Resuming continues inside the stage that was interrupted: its finished samples and rewards
    are reused, the rest is redone from the last checkpoint, and the run ends as it would have
    without the interruption (bit for bit on the same machine)."""
    with exclusive_run_dir(config):
        run = prepare_run(config, resume)
        if run.start_stage == 1 and not run.baseline_done:
            record_evaluation(run.at_stage(0), stage=0, extra={
                "data/train_prompts": len(run.train_prompts),
                "data/skipped_too_long": run.train_prompts.n_skipped_too_long,
            })
        for stage in range(run.start_stage, config.raft.stages + 1):
            raft_stage(run.at_stage(stage), stage)  # schedules at the stage's values
        run.tracker.close()
        if config.tracking.report and run.accelerator.is_main_process:
            write_report(run.run_dir.root)
        return RunResult(run.run_dir.root, run.run_dir.read_metrics())


def raft_stage(run: Run, stage: int) -> dict[str, Any]:
    config, timer = run.config, Timer()

    # 1. Collect: b prompts, K responses each from the current policy, every response scored
    #    (each process samples and scores its own shard); or, per `raft.collector`, more
    #    prompts until b are useful (dynamic) or a per-prompt budget (gvm). Finished samples
    #    and rewards go to the stage's journal at once; an interrupted attempt's are reused.
    prompts = [run.train_prompts.records[i]
               for i in run.prompt_order.draw(config.raft.prompts_per_stage)]
    journal = open_journal(run.run_dir.stage_dir(stage), run.accelerator.process_index, config,
                           prompts)
    rollouts = collect_stage(run, prompts, Collect(run, stage, journal, timer, run.trainer.step))

    # 2. Rank: keep the best (of all processes' rollouts), with weights or advantages; add
    #    earlier stages' kept responses and anchor rows (`raft.replay`, `data.anchor`).
    ranked = extend_examples(run, rollouts, rank(rollouts, config, stage), stage)

    # 3. Fine-tune on the kept responses (their SFT loss is recorded before the update).
    with timer("train"):
        train_stats = fine_tune(run.trainer, rollouts, ranked, stage, run.tokenizer.pad_token_id,
                                config.generation.temperature)

    # 4. Record: rollouts, metrics, evaluation, checkpoint.
    rows = candidate_rows(rollouts, ranked.selection.mask)
    if run.accelerator.is_main_process:
        write_jsonl(run.run_dir.candidates_path(stage), rows)
    run.tracker.log_completions(stage, rows)
    metrics = {**candidate_metrics(rollouts, ranked), **train_stats, **timer.seconds}
    record_evaluation(run, stage, metrics)
    save_checkpoint(run, stage)
    journal.remove()
    return metrics


def record_evaluation(run: Run, stage: int, extra: dict[str, Any]) -> None:
    """Evaluate (if enabled and there is a held-out set or `evaluation.sets`), log one metrics
    record, keep the held-out answers (`stages/NNN/eval.jsonl`), print a summary."""
    metrics, config = dict(extra), run.config
    every, last = config.evaluation.every, config.raft.stages
    due = stage % every == 0 or stage == last
    has_sets = run.eval_prompts is not None or bool(config.evaluation.sets)
    if config.evaluation.enabled and has_sets and due:
        start = time.perf_counter()
        with run.whole_policy() as policy:
            eval_metrics, items = evaluate(policy, run.tokenizer, run.eval_prompts, run.reward,
                                           config, config.evaluation.samples_at(stage, last))
        metrics.update(eval_metrics)
        metrics["time/eval_s"] = time.perf_counter() - start
        if run.accelerator.is_main_process:
            write_jsonl(run.run_dir.stage_dir(stage) / "eval.jsonl", items)
    run.tracker.log(stage, metrics)
    if run.accelerator.is_main_process:
        print(summary_line(stage, run.config.raft.stages, metrics), flush=True)


def summary_line(stage: int, stages: int, m: dict[str, Any]) -> str:
    parts = [f"stage {stage}/{stages}"]
    if "train/reward_mean" in m:
        extra = "".join(f", +{m[f'train/n_{key}']} {key}" for key in ("replayed", "anchor")
                        if f"train/n_{key}" in m)
        parts.append(f"{reward_summary(m)} (n={m['train/n_selected']}{extra})")
    if m.get("sampling/rounds", 1) > 1:  # the collector sampled more than one round
        parts.append(f"{m['sampling/samples']} samples in {m['sampling/rounds']} rounds, "
                     f"{m['sampling/useful_prompts']}/{m['sampling/prompts_drawn']} prompts useful")
    if m.get("train/sft_loss") is not None:
        parts.append(f"sft_loss {m['train/sft_loss']:.4f}")
    if "eval/accuracy" in m:
        parts.append(f"eval acc {m['eval/accuracy']:.3f}")
    if "eval/reward_mean" in m:
        parts.append(f"eval reward {m['eval/reward_mean']:.3f}")
    times = [f"{k[5:-2]} {v:.0f}s" for k, v in m.items() if k.startswith("time/")]
    return " | ".join(parts + ([", ".join(times)] if times else []))

