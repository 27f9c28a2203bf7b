"""Sections 3-5 of `benchmarks/gpu_check.py`: RAFT runs through raftlm's own entry points."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import torch
from _gpu_models import (
    Context,
    Row,
    attempt,
    chat_prompts,
    fmt_mb,
    memory_label,
    peak_mb,
    release_memory,
    reset_peak,
    write_task,
)


def raft_config(ctx: Context, name: str, *, lora: bool, stages: int, **extra: Any):
    from raftlm.config import RaftConfig

    s, built = ctx.settings, ctx.models(ctx.sizes[0])
    task = write_task(ctx.workdir / "task")
    raw = {
        "run": {"output_dir": str(ctx.workdir / name), "seed": 0, "overwrite": True},
        "model": {"path": str(built.policy), "dtype": "bf16", "lora": {"enabled": lora}},
        "data": {"train_file": task["train_file"], "eval_file": task["eval_file"]},
        "raft": {"stages": stages, "prompts_per_stage": s.raft_prompts, "samples_per_prompt": 4},
        "generation": {"max_new_tokens": s.raft_tokens, "batch_size": 4 * s.raft_prompts},
        "reward": {"terms": [task["reward"] + ":fraction_of_a"]},
        "training": {"micro_batch_size": 4, "learning_rate": 1e-4 if lora else 1e-5},
        "evaluation": {"samples_per_prompt": 2, "kl_responses": 8},
        "tracking": {"report": False},  # plots are not what is checked here
    }
    for key, value in extra.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    return RaftConfig.from_dict(raw)


def check_raft_run(ctx: Context, lora: bool, rows: list[Row]) -> None:
    from raftlm import train

    mode = "LoRA" if lora else "full"
    first = train(raft_config(ctx, f"raft-{mode}", lora=lora, stages=2))
    resumed = train(raft_config(ctx, f"raft-{mode}", lora=lora, stages=3, run={"overwrite": False}),
                    resume=True)
    stages = [m["stage"] for m in resumed.metrics]
    steps = [m.get("train/optimizer_steps", 0) for m in resumed.metrics]
    losses = [m["train/loss"] for m in resumed.metrics if "train/loss" in m]
    ok = ([m["stage"] for m in first.metrics] == [0, 1, 2] and stages == [0, 1, 2, 3]
          and steps[3] > steps[2] > 0 and all(math.isfinite(v) for v in losses)
          and (resumed.run_dir / "checkpoints" / "stage-003").is_dir())
    rewards = ", ".join(f"{m['train/reward_mean']:.3f}" for m in resumed.metrics[1:])
    times = resumed.metrics[-1]
    rows.append(Row(3, f"{mode} bf16: 2 stages, resumed to 3",
                    f"stages {stages}, optimizer steps {steps[1:]}, reward {rewards}; stage 3 "
                    f"generate {times['time/generate_s']:.1f}s, train {times['time/train_s']:.1f}s",
                    "ok" if ok else "FAIL"))
    release_memory()


def section_raft(ctx: Context) -> list[Row]:
    rows: list[Row] = []
    for lora in (True, False):
        attempt(rows, 3, "LoRA" if lora else "full", check_raft_run, ctx, lora, rows)
    return rows


def measured(fn, name: str, device: torch.device, peaks: dict[str, float | None]):
    """`fn` wrapped to record the peak memory of its calls under `name`."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        reset_peak(device)
        try:
            return fn(*args, **kwargs)
        finally:
            peaks[name] = peak_mb(device)
    return wrapper


def offload_peaks(ctx: Context, offload: str) -> dict[str, float | None]:
    """Peak memory per phase of stage 2 (stage 1 creates the AdamW moments offload moves)."""
    import raftlm.stage.collect as steps  # where Collect calls the sampler and the reward
    import raftlm.stage.loop as loop
    from raftlm.stage.build import prepare_run

    built = ctx.models(ctx.sizes[0])
    config = raft_config(ctx, f"offload-{offload}", lora=False, stages=2, offload=offload,
                         reward={"terms": [{"model": str(built.reward_model)}]},
                         evaluation={"enabled": False})
    peaks: dict[str, float | None] = {}
    if ctx.device.type == "cuda":  # what an earlier check left allocated inflates every peak
        peaks["resident before"] = torch.cuda.memory_allocated() / 2**20
    run = prepare_run(config)
    loop.raft_stage(run, 1)
    originals = steps.generate, steps.score
    steps.generate = measured(steps.generate, "generate", ctx.device, peaks)
    steps.score = measured(steps.score, "reward", ctx.device, peaks)
    run.trainer.train = measured(run.trainer.train, "train", ctx.device, peaks)
    try:
        loop.raft_stage(run, 2)
    finally:
        steps.generate, steps.score = originals
        del run
        release_memory()
    return peaks


def section_offload(ctx: Context) -> list[Row]:
    peaks = {mode: offload_peaks(ctx, mode) for mode in ("none", "phases")}
    rows = [Row(4, f"offload {mode}: {memory_label(ctx.device)}",
                ", ".join(f"{phase} {fmt_mb(mb)}" for phase, mb in p.items()))
            for mode, p in peaks.items()]
    if ctx.device.type == "cuda":
        lower = peaks["phases"]["reward"] < peaks["none"]["reward"]
        rows.append(Row(4, "phases lowers the reward-phase peak",
                        f"{fmt_mb(peaks['none']['reward'])} -> {fmt_mb(peaks['phases']['reward'])}",
                        "ok" if lower else "FAIL"))
    return rows


def section_train_memory(ctx: Context) -> list[Row]:
    from raftlm.stage.build import prepare_run
    from raftlm.training.batches import Example

    s, rows = ctx.settings, []
    for lora in (True, False):
        mode = "LoRA" if lora else "full"
        run = prepare_run(raft_config(ctx, f"train-memory-{mode}", lora=lora, stages=1))
        vocab = len(run.tokenizer)
        prompt = chat_prompts(run.tokenizer, 1, s.prompt_tokens)[0]
        response = [(7 * i) % vocab for i in range(s.train_response_tokens)]
        run.trainer.train([Example(prompt, response)], 1)  # warm-up; creates AdamW moments
        for size in s.micro_batches:
            run.trainer.config = dataclasses.replace(run.trainer.config, micro_batch_size=size)
            reset_peak(ctx.device)
            start = time.perf_counter()
            try:
                run.trainer.train([Example(prompt, response)] * size, 1)
                value = (f"{fmt_mb(peak_mb(ctx.device))} ({memory_label(ctx.device)}), "
                         f"{time.perf_counter() - start:.2f} s/step")
            except torch.cuda.OutOfMemoryError:
                value = "out of memory"
                release_memory()
            rows.append(Row(5, f"{mode} bf16 micro-batch {size} x "
                               f"{len(prompt) + len(response)} tokens", value))
        del run
        release_memory()
    return rows


# --- section 6: this round's stage paths ----------------------------------------------------

def check_round_run(ctx: Context, collector: str, rows: list[Row]) -> None:
    """One grpo stage under `collector`, with pi_old recomputed by the training forward: the
    sampler-training gap on this device and dtype (what the rollout correction is for)."""
    from raftlm import train

    result = train(raft_config(
        ctx, f"round-{collector}", lora=True, stages=1,
        raft={"collector": collector, "gvm": {"accept_reward": 0.2, "first_samples": 2}},
        training={"objective": "grpo", "old_log_probs": "recompute",
                  "rollout_correction": "token_truncate"},
        evaluation={"enabled": False}))
    last = result.metrics[-1]
    gap = last.get("train/pi_old_gap")
    ok = last["stage"] == 1 and gap is not None and math.isfinite(gap)
    rows.append(Row(6, f"{collector} + grpo, pi_old recomputed (bf16)",
                    f"{last['sampling/samples']} samples in {last['sampling/rounds']} round(s); "
                    f"|log pi_sampler - log pi_train| {gap if gap is None else f'{gap:.2e}'}, "
                    f"KL {last.get('train/pi_old_kl', float('nan')):.2e}, correction mean "
                    f"{last.get('train/rollout_correction_mean', float('nan')):.4f}",
                    "ok" if ok else "FAIL"))
    release_memory()


def check_tool_rollout(ctx: Context, rows: list[Row]) -> None:
    """One stage of multi-turn rollouts with the calculator tool (token-in, token-out)."""
    from raftlm import train

    result = train(raft_config(ctx, "round-tools", lora=True, stages=1,
                               rollout={"tools": ["calculator"], "max_turns": 2},
                               evaluation={"enabled": False}))
    last = result.metrics[-1]
    ok = last["stage"] == 1 and math.isfinite(last.get("train/loss", float("nan")))
    rows.append(Row(6, "tool rollouts (calculator, 2 turns)",
                    f"turns {last.get('rollout/turns_mean', 1):.2f}, tool calls "
                    f"{last.get('rollout/tool_calls_mean', 0):.2f}, parse failures "
                    f"{last.get('rollout/parse_failures', 0)}; generate "
                    f"{last['time/generate_s']:.1f}s", "ok" if ok else "FAIL"))
    release_memory()


def section_round(ctx: Context) -> list[Row]:
    rows: list[Row] = []
    for collector in ("dynamic", "gvm"):
        attempt(rows, 6, collector, check_round_run, ctx, collector, rows)
    attempt(rows, 6, "tool rollouts", check_tool_rollout, ctx, rows)
    return rows
