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

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raftlm.components import Run, exclusive_run_dir, open_journal, prepare_run, save_checkpoint
from raftlm.config import RaftConfig
from raftlm.core import token_pooled_nll
from raftlm.evaluation.evaluate import evaluate
from raftlm.evaluation.metrics import nanmean, reward_distribution
from raftlm.models.distributed import gather, shard
from raftlm.models.loading import merged_adapter
from raftlm.rewards.reward import score
from raftlm.rewards.selection import select
from raftlm.run.report import write_report
from raftlm.run.rundir import write_jsonl
from raftlm.sampling.completion import Completion
from raftlm.sampling.generate import generate, sample_seeds
from raftlm.training.batches import Example, response_log_probs
from raftlm.training.objectives import training_examples


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
        if run.start_stage == 1:
            record_evaluation(run, stage=0, extra={
                "data/train_prompts": len(run.train_prompts),
                "data/skipped_too_long": run.train_prompts.n_skipped_too_long,
            })
        for stage in range(run.start_stage, config.raft.stages + 1):
            raft_stage(run, stage)
        run.tracker.close()
        if config.tracking.report and run.accelerator.is_main_process:
            write_report(run.run_dir.root)
        return RunResult(run.run_dir.root, run.run_dir.read_metrics())


def raft_stage(run: Run, stage: int) -> dict[str, Any]:
    config, timer = run.config, Timer()
    b, k = config.raft.prompts_per_stage, config.raft.samples_per_prompt

    # 1. Collect: b prompts, K responses each, from the current policy (each process
    #    samples its own shard of the prompts). Each finished response goes to the stage's
    #    journal at once; those an interrupted attempt finished are reused, not re-sampled.
    prompts = [run.train_prompts.records[i] for i in run.sampler.draw(b)]
    mine = shard(prompts)
    journal = open_journal(run, stage, [p.id for p in prompts])
    finished = {(i, j): Completion(**journal.samples[(p.id, j)])
                for i, p in enumerate(mine) for j in range(k) if (p.id, j) in journal.samples}
    with timer("generate"), run.whole_policy() as whole, merged_adapter(whole) as policy:
        local = generate(
            policy, run.tokenizer, [p.token_ids for p in mine], k, config.generation,
            seeds=sample_seeds(config.run.seed, stage, [p.id for p in mine]),
            desc=f"collect stage {stage}", done=finished,
            on_finish=lambda i, j, c: journal.add_sample(mine[i].id, j, dataclasses.asdict(c)),
        )

    # 2. Rank: reward every response, keep the best (of all processes' candidates).
    with timer("reward"):
        if all(p.id in journal.rewards for p in mine):
            local_rewards = [np.nan if r is None else r
                             for p in mine for r in journal.rewards[p.id]]
        else:
            local_rewards = score(run.reward, mine, local).scores.tolist()
            for i, p in enumerate(mine):
                row = local_rewards[i * k : (i + 1) * k]
                journal.add_rewards(p.id, [None if np.isnan(r) else r for r in row])
            journal.sync()
    responses = gather(local)
    rewards = np.array(gather(local_rewards), dtype=float).reshape(len(prompts), k)
    texts = [[r.text for r in row] for row in responses]
    lengths = [[len(r.token_ids) for r in row] for row in responses]
    truncated = np.array([[r.finish_reason == "length" for r in row] for row in responses])
    selection = select(rewards, texts, lengths, config.selection, truncated)
    examples, rank_stats = training_examples(prompts, responses, rewards, selection,
                                             config.training, stage)

    # 3. Fine-tune on the kept responses (their SFT loss is recorded before the update).
    with timer("train"):
        sft_loss = selected_sft_loss(run, prompts, responses, selection.mask)
        train_stats = run.trainer.train(examples, stage)

    # 4. Record: candidates, metrics, evaluation, checkpoint.
    write_candidates(run, stage, prompts, responses, rewards, selection.mask)
    metrics = {
        "train/reward_mean": nanmean(rewards),
        "train/reward_selected_mean": nanmean(rewards[selection.mask]),
        **reward_distribution(rewards, selection.mask),
        "train/n_selected": selection.n_selected,
        "train/sft_loss": sft_loss,
        "train/n_invalid_reward": int(np.isnan(rewards).sum()),
        **{f"train/dropped_{name}": n for name, n in selection.dropped.items()},
        **train_stats,
        **rank_stats,
        "tokens/generated": int(sum(map(sum, lengths))),
        **timer.seconds,
    }
    record_evaluation(run, stage, metrics)
    save_checkpoint(run, stage)
    journal.remove()
    return metrics


def selected_sft_loss(run: Run, prompts: list, responses: list[list[Completion]],
                      mask: np.ndarray) -> float | None:
    """Token-pooled NLL of the selected responses under the current policy (raft_alignment's
    loss): from the log-probs recorded while sampling them, else from a forward pass."""
    kept = [(prompts[p], responses[p][j]) for p, j in zip(*np.nonzero(mask))]
    if not kept:
        return None
    if all(c.token_log_probs is not None for _, c in kept):
        return token_pooled_nll([np.asarray(c.token_log_probs) for _, c in kept])
    examples = [Example(p.token_ids, c.token_ids) for p, c in kept]
    with run.whole_policy() as policy:
        log_probs = response_log_probs(
            policy, shard(examples), run.tokenizer.pad_token_id,
            run.config.training.micro_batch_size, run.accelerator.device,
        )
    return token_pooled_nll(gather(log_probs))


def record_evaluation(run: Run, stage: int, extra: dict[str, Any]) -> None:
    """Evaluate (if enabled and a held-out set exists), log one metrics record, print a summary."""
    metrics = dict(extra)
    every, last = run.config.evaluation.every, run.config.raft.stages
    due = stage % every == 0 or stage == last
    if run.config.evaluation.enabled and run.eval_prompts is not None and due:
        start = time.perf_counter()
        with run.whole_policy() as policy:
            eval_metrics, _ = evaluate(
                policy, run.tokenizer, run.eval_prompts, run.reward, run.config
            )
        metrics.update(eval_metrics)
        metrics["time/eval_s"] = time.perf_counter() - start
    run.tracker.log(stage, metrics)
    if run.accelerator.is_main_process:
        print(summary_line(stage, run.config.raft.stages, metrics), flush=True)


def write_candidates(run: Run, stage: int, prompts: list, responses: list, rewards: np.ndarray,
                     mask: np.ndarray) -> None:
    if not run.accelerator.is_main_process:
        return
    rows = [
        {
            "prompt_id": prompt.id, "prompt": prompt.text, "sample": j, "response": response.text,
            "original_prompt": prompt.prompt,  # as in the data: text or chat messages
            "reward": None if np.isnan(rewards[p, j]) else float(rewards[p, j]),
            "selected": bool(mask[p, j]), "finish_reason": response.finish_reason,
            "n_tokens": len(response.token_ids),
        }
        for p, (prompt, row) in enumerate(zip(prompts, responses))
        for j, response in enumerate(row)
    ]
    write_jsonl(run.run_dir.candidates_path(stage), rows)


def summary_line(stage: int, stages: int, m: dict[str, Any]) -> str:
    parts = [f"stage {stage}/{stages}"]
    if "train/reward_mean" in m:
        parts.append(
            f"reward {_fmt(m['train/reward_mean'])} -> selected "
            f"{_fmt(m['train/reward_selected_mean'])} (n={m['train/n_selected']})"
        )
    if m.get("train/sft_loss") is not None:
        parts.append(f"sft_loss {m['train/sft_loss']:.4f}")
    if "eval/accuracy" in m:
        parts.append(f"eval acc {m['eval/accuracy']:.3f}")
    if "eval/reward_mean" in m:
        parts.append(f"eval reward {m['eval/reward_mean']:.3f}")
    times = [f"{k[5:-2]} {v:.0f}s" for k, v in m.items() if k.startswith("time/")]
    return " | ".join(parts + ([", ".join(times)] if times else []))


class Timer:
    """`with timer("generate"):` accumulates wall time into `seconds["time/generate_s"]`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            key = f"time/{name}_s"
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
