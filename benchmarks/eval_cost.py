"""What a run's evaluation costs, option by option, without running the run.

Times `evaluation.evaluate` on a run's policy at stage 0 (a fresh LoRA adapter: the base model)
and at a checkpoint, under evaluation settings given as `--option NAME KEY=VALUE ...`, with the
time split into decoding (greedy and sampled responses, one pass), the KL estimate and the rest
(metrics, merging the adapter). Options run in turn, `--repeats` times each; the median is
printed. Numbers of a shared CPU: compare options within one call only.

    .venv/bin/python benchmarks/eval_cost.py runs/demo
    .venv/bin/python benchmarks/eval_cost.py runs/demo --option greedy evaluation.sampled=false
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

import yaml

from raftlm.config import RaftConfig
from raftlm.data.prompts import load_prompt_sets
from raftlm.evaluation import evaluate as evaluate_module
from raftlm.models.distributed import process_state
from raftlm.models.loading import resolve_dtype
from raftlm.rewards.reward import build_reward
from raftlm.stage.build import build_policy, set_threads
from raftlm.tools.target import run_checkpoint

DEFAULT_OPTIONS = {"as configured": [], "greedy only": ["evaluation.sampled=false"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--stage", type=int, help="The checkpoint [default: the newest].")
    parser.add_argument("--option", nargs="+", action="append", metavar="NAME KEY=VALUE",
                        help="A name and --set overrides; repeatable [default: as configured, "
                             "and greedy only].")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    options = ({name: overrides for name, *overrides in args.option} if args.option
               else DEFAULT_OPTIONS)
    stage, checkpoint = run_checkpoint(args.run_dir, args.stage)
    base = RaftConfig.from_yaml(args.run_dir / "config.yaml")
    set_threads(base)
    device = process_state().device
    dtype = resolve_dtype(base.model.dtype, device)
    fresh, tokenizer = build_policy(base, device, dtype)
    policies = {0: fresh, stage: build_policy(base, device, dtype, (stage, checkpoint))[0]}
    _, held_out = load_prompt_sets(base, tokenizer)
    reward = build_reward(base.reward)

    parts: dict[tuple[str, int], list[dict[str, float]]] = defaultdict(list)
    for _ in range(args.repeats):
        for name, overrides in options.items():
            config = RaftConfig.from_dict(yaml.safe_load(open(args.run_dir / "config.yaml")),
                                          overrides, source="--option")
            for at, policy in policies.items():
                timed = timed_evaluate(policy, tokenizer, held_out, reward, config)
                parts[(name, at)].append(timed)
                print(f"{name}, stage {at}: {fmt(timed)} (load {os.getloadavg()[0]:.1f})",
                      flush=True)
    print(f"\n{args.run_dir}, {len(held_out)} held-out prompts, median of {args.repeats}")
    print("| option | stage | total s | decode s | KL s | rest s | accuracy |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (name, at), runs in parts.items():
        median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        print(f"| {name} | {at} | {median['total']:.1f} | {median['decode']:.1f} | "
              f"{median['kl']:.1f} | {median['total'] - median['decode'] - median['kl']:.1f} | "
              f"{median['accuracy']:.2f} |")


def timed_evaluate(policy, tokenizer, held_out, reward, config: RaftConfig) -> dict[str, float]:
    """`evaluate`'s wall time, with its decoding and KL times measured inside it."""
    spent = {"decode": 0.0, "kl": 0.0}

    def timing(key, function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - start
        return timed

    originals = evaluate_module._responses, evaluate_module.kl_to_initial
    evaluate_module._responses = timing("decode", originals[0])
    evaluate_module.kl_to_initial = timing("kl", originals[1])
    try:
        start = time.perf_counter()
        metrics, _ = evaluate_module.evaluate(policy, tokenizer, held_out, reward, config)
        total = time.perf_counter() - start
    finally:
        evaluate_module._responses, evaluate_module.kl_to_initial = originals
    return {"total": total, **spent, "accuracy": metrics.get("eval/accuracy", float("nan"))}


def fmt(timed: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:.2f}" for key, value in timed.items())


if __name__ == "__main__":
    main()
