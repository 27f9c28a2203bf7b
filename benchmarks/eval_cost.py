"""What a run's evaluation costs, option by option, without running the run.

Times `evaluation.evaluate` on a run's policy at stage 0 (a fresh LoRA adapter: the base model)
and at a checkpoint, under evaluation settings given as `--option NAME KEY=VALUE ...`, with the
time split into decoding (greedy and sampled responses, one pass; the prompts' prefill part of
it), the KL estimate and the rest (metrics, merging the adapter). Each evaluation runs twice,
side by side: with the chat template's shared prefix prefilled once per call (the sampler's
way, `raftlm.sampling.shared_prefix`) and with every prompt prefilled whole (as before it);
how many greedy and sampled responses the two give alike is printed with them. `--collect`
also times one stage's sampling (the first `raft.prompts_per_stage` training prompts, K
each, the run's generation settings) both ways. Options run in turn, `--repeats` times each;
the median is printed. Numbers of a shared CPU: compare rows within one call only.

    .venv/bin/python benchmarks/eval_cost.py runs/demo
    .venv/bin/python benchmarks/eval_cost.py runs/demo --option greedy evaluation.sampled=false
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from raftlm.config import RaftConfig
from raftlm.data.prompts import load_prompt_sets
from raftlm.evaluation import evaluate as evaluate_module
from raftlm.models.distributed import process_state
from raftlm.models.loading import merged_adapter, resolve_dtype
from raftlm.rewards.reward import build_reward
from raftlm.sampling import decoding, fast
from raftlm.sampling.generate import generate, sample_seeds
from raftlm.stage.build import build_policy, set_threads
from raftlm.tools.target import run_checkpoint

DEFAULT_OPTIONS = {"as configured": [], "greedy only": ["evaluation.sampled=false"]}
# How the sampler prefills: the template's shared prefix once per call, or every prompt whole.
PREFILLS = {"shared prefix": fast.template_prefix, "whole prompts": lambda tokenizer: []}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--stage", type=int, help="The checkpoint [default: the newest].")
    parser.add_argument("--option", nargs="+", action="append", metavar="NAME KEY=VALUE",
                        help="A name and --set overrides; repeatable [default: as configured, "
                             "and greedy only].")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--collect", action="store_true",
                        help="Also time one stage's sampling of training prompts.")
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
    train, held_out = load_prompt_sets(base, tokenizer)
    reward = build_reward(base.reward)
    if args.collect:
        options = {**options, "collect": None}

    parts: dict[tuple[str, int, str], list[dict[str, float]]] = defaultdict(list)
    responses: dict[tuple[str, int, str], list] = {}
    for _ in range(args.repeats):
        for name, overrides in options.items():
            config = RaftConfig.from_dict(yaml.safe_load(open(args.run_dir / "config.yaml")),
                                          overrides or [], source="--option")
            for at, policy in policies.items():
                for prefill, prefix in PREFILLS.items():
                    with prefilled(prefix) as spent:
                        if overrides is None:
                            timed, got = timed_collect(policy, tokenizer, train, config)
                        else:
                            timed, got = timed_evaluate(policy, tokenizer, held_out, reward,
                                                        config)
                    timed["prefill"] = spent["prefill"]
                    parts[(name, at, prefill)].append(timed)
                    responses[(name, at, prefill)] = got
                    print(f"{name}, stage {at}, {prefill}: {fmt(timed)} "
                          f"(load {os.getloadavg()[0]:.1f})", flush=True)
    print(f"\n{args.run_dir}, {len(held_out)} held-out prompts, median of {args.repeats}")
    print("| option | stage | prefill | total s | decode s | of it prefill s | KL s | rest s "
          "| accuracy |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (name, at, prefill), runs in parts.items():
        median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        print(f"| {name} | {at} | {prefill} | {median['total']:.1f} | {median['decode']:.1f} | "
              f"{median['prefill']:.1f} | {median['kl']:.1f} | "
              f"{median['total'] - median['decode'] - median['kl']:.1f} | "
              f"{median['accuracy']:.2f} |")
    print("\nresponses alike, shared prefix vs whole prompts (token ids):")
    for name in options:
        for at in policies:
            shared, whole = (responses[(name, at, p)] for p in PREFILLS)
            for kind, a, b in zip(("greedy", "sampled"), shared, whole):
                if a:
                    alike = sum(x == y for x, y in zip(a, b, strict=True))
                    print(f"  {name}, stage {at}, {kind}: {alike}/{len(a)}")


@contextmanager
def prefilled(prefix) -> Iterator[dict[str, float]]:
    """The sampler prefilling with `prefix(tokenizer)` as its shared prefix; yields the seconds
    its prompt prefills (`PromptKV._prefill`) take, filled in as they run."""
    spent = {"prefill": 0.0}
    originals = fast.template_prefix, decoding.PromptKV._prefill
    fast.template_prefix = prefix
    decoding.PromptKV._prefill = timing(spent, "prefill", originals[1])
    try:
        yield spent
    finally:
        fast.template_prefix, decoding.PromptKV._prefill = originals


def timing(spent: dict[str, float], key: str, function):
    """`function`, adding its wall time to `spent[key]` at each call."""
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            spent[key] += time.perf_counter() - start
    return timed


def timed_evaluate(policy, tokenizer, held_out, reward, config: RaftConfig
                   ) -> tuple[dict[str, float], tuple[list, list]]:
    """`evaluate`'s wall time, with its decoding and KL times measured inside it; and its
    greedy and sampled responses' token ids."""
    spent = {"decode": 0.0, "kl": 0.0}
    got: tuple[list, list] = ([], [])

    def responses(*args, **kwargs):
        greedy, sampled = originals[0](*args, **kwargs)
        got[0].extend(c.token_ids for c in greedy)
        got[1].extend(c.token_ids for row in sampled or [] for c in row)
        return greedy, sampled

    originals = evaluate_module._responses, evaluate_module.kl_to_initial
    evaluate_module._responses = timing(spent, "decode", responses)
    evaluate_module.kl_to_initial = timing(spent, "kl", originals[1])
    try:
        start = time.perf_counter()
        metrics, _ = evaluate_module.evaluate(policy, tokenizer, held_out, reward, config)
        total = time.perf_counter() - start
    finally:
        evaluate_module._responses, evaluate_module.kl_to_initial = originals
    return ({"total": total, **spent, "accuracy": metrics.get("eval/accuracy", float("nan"))},
            got)


def timed_collect(policy, tokenizer, train, config: RaftConfig
                  ) -> tuple[dict[str, float], tuple[list, list]]:
    """One stage's sampling of the first b training prompts, K each (stage 1's seeds), with
    the adapter merged as Collect samples; the samples' token ids."""
    records = train.records[: config.raft.prompts_per_stage]
    seeds = sample_seeds(config.run.seed, 1, [r.id for r in records])
    start = time.perf_counter()
    with merged_adapter(policy) as merged:
        rows = generate(merged, tokenizer, [r.token_ids for r in records],
                        config.raft.samples_per_prompt, config.generation, seeds=seeds)
    total = time.perf_counter() - start
    samples = [c.token_ids for row in rows for c in row]
    return {"total": total, "decode": total, "kl": 0.0, "accuracy": float("nan")}, ([], samples)


def fmt(timed: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:.2f}" for key, value in timed.items())


if __name__ == "__main__":
    main()
