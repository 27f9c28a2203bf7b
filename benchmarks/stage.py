"""One RAFT stage of the default config: raftlm against the loop users write today.

raftlm: `raftlm.stage.loop.raft_stage` on a fresh run of `configs/arithmetic.yaml` (evaluation off):
32 prompts x K=8, 64 new tokens, T=0.7, LoRA r=16, best per prompt with reward 1, 2 epochs of
micro-batches of 8 (bf16 autocast when the config asks for it).

The usual loop, on the same prompts, a fresh copy of the same LoRA policy, the same threads:
  generate  `model.generate(num_return_sequences=K, do_sample=True, temperature=0.7)` on
            left-padded batches of `generation.batch_size` sequences, the PEFT model as is;
  reward    the same reward function (`numeric_answer`);
  keep      the best response per prompt when its reward is 1;
  train     TRL's `SFTTrainer` (`completion_only_loss`, same LR, schedule, epochs, micro-batch,
            clipping, bf16 when raftlm trains in bf16), built per stage as a loop would, on the
            examples raftlm kept, so that both train on identical work (its own kept count is
            printed too).
The two alternate in one process (raftlm first in even rounds, the loop first in odd ones);
each round starts both from the initial weights and draws the same prompts.

    .venv/bin/python benchmarks/stage.py [--rounds 2] [--threads 2]
Needs `trl` (`pip install -e '.[bench]'`; `make bench` installs it).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from raftlm.config import RaftConfig
from raftlm.models.loading import load_policy, resolve_dtype
from raftlm.rewards.verifiable import numeric_answer
from raftlm.stage.build import prepare_run
from raftlm.stage.loop import raft_stage
from raftlm.training.batches import Example

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "arithmetic.yaml"
PHASES = ("generate", "reward", "train")


def raftlm_stage(config: RaftConfig) -> tuple[dict, list, list[Example]]:
    """raft_stage on a fresh run; returns phase records, the prompts drawn and the kept set."""
    run = prepare_run(config)
    drawn, kept = [], []
    draw, train = run.prompt_order.draw, run.trainer.train
    run.prompt_order.draw = lambda b: drawn.append(draw(b)) or drawn[-1]
    run.trainer.train = lambda examples, stage: kept.extend(examples) or train(examples, stage)
    start = time.perf_counter()
    m = raft_stage(run, 1)
    whole = time.perf_counter() - start
    epochs = config.training.epochs
    phases = {
        "generate": (m["time/generate_s"], m["tokens/generated"]),
        "reward": (m["time/reward_s"], config.raft.prompts_per_stage
                   * config.raft.samples_per_prompt),
        "train": (m["time/train_s"], epochs * sum(len(e.response_ids) for e in kept)),
        "kept": m["train/n_selected"], "whole": whole,
    }
    prompts = [run.train_prompts.records[i] for i in drawn[0]]
    return phases, prompts, kept


def usual_stage(config: RaftConfig, prompts: list, train_on: list[Example]) -> dict:
    """generate -> reward -> keep best -> SFTTrainer, written as a user would."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(config.run.seed)
    dtype = resolve_dtype(config.model.dtype, torch.device("cpu"))
    model, tokenizer = load_policy(config.model, torch.device("cpu"), dtype)
    start = time.perf_counter()
    gen, k = config.generation, config.raft.samples_per_prompt
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id

    t0 = time.perf_counter()
    model.eval()
    responses = []
    per_batch = max(1, gen.batch_size // k)
    for first in range(0, len(prompts), per_batch):
        ids = [p.token_ids for p in prompts[first : first + per_batch]]
        batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**batch, do_sample=True, temperature=gen.temperature, top_k=0,
                                 top_p=1.0, max_new_tokens=gen.max_new_tokens,
                                 num_return_sequences=k, pad_token_id=pad)
        for row in out[:, batch["input_ids"].shape[1]:].tolist():
            end = row.index(pad) + 1 if pad in row else len(row)  # keep the eos
            responses.append(row[:end])
    generate_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    rewards = numeric_answer([p.prompt for p in prompts for _ in range(k)], texts,
                             answer=[p.columns["answer"] for p in prompts for _ in range(k)])
    kept = 0
    for i in range(len(prompts)):
        best = max(range(i * k, (i + 1) * k), key=lambda j: rewards[j])
        kept += rewards[best] >= 1.0
    reward_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    train = config.training
    dataset = Dataset.from_dict({
        "input_ids": [e.prompt_ids + e.response_ids for e in train_on],
        "completion_mask": [[0] * len(e.prompt_ids) + [1] * len(e.response_ids)
                            for e in train_on],
    })
    with tempfile.TemporaryDirectory() as out_dir:
        args = SFTConfig(
            output_dir=out_dir, per_device_train_batch_size=train.micro_batch_size,
            gradient_accumulation_steps=train.gradient_accumulation_steps,
            num_train_epochs=train.epochs, learning_rate=train.learning_rate,
            lr_scheduler_type=train.lr_scheduler, weight_decay=train.weight_decay,
            max_grad_norm=train.max_grad_norm, bf16=train.bf16_autocast,
            completion_only_loss=True, logging_strategy="no", save_strategy="no",
            report_to=[], use_cpu=True, seed=config.run.seed, disable_tqdm=True,
        )
        model.train()
        if train_on:  # SFTTrainer refuses an empty dataset; raftlm skips such a stage too
            SFTTrainer(model=model, args=args, train_dataset=dataset,
                       processing_class=tokenizer).train()
    train_s = time.perf_counter() - t0
    return {
        "generate": (generate_s, sum(map(len, responses))),
        "reward": (reward_s, len(responses)),
        "train": (train_s, train.epochs * sum(len(e.response_ids) for e in train_on)),
        "kept": kept, "whole": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="alternating raftlm/usual rounds")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (both sides)")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, key=value")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="raftlm-stage-"))
    config = RaftConfig.from_yaml(CONFIG, [
        f"run.output_dir={work / 'run'}", "run.overwrite=true", "evaluation.enabled=false",
        "tracking.report=false", *args.set,
    ])
    totals = {side: {p: [0.0, 0] for p in PHASES} | {"kept": 0, "whole": 0.0}
              for side in ("raftlm", "usual")}
    load = [os.getloadavg()[0]]
    for r in range(args.rounds):
        order = ("raftlm", "usual") if r % 2 == 0 else ("usual", "raftlm")
        # The prompts and kept set come from raftlm's side; the usual loop in odd rounds runs
        # first on the same prompts (same seed: the same draw) and raftlm's kept set of round 0.
        if r == 0:
            result, prompts, kept = raftlm_stage(config)
            results = {"raftlm": result, "usual": usual_stage(config, prompts, kept)}
        else:
            results = {"usual": usual_stage(config, prompts, kept)}
            results["raftlm"], _, _ = raftlm_stage(config)
        load.append(os.getloadavg()[0])
        for side in order:
            for p in PHASES:
                totals[side][p][0] += results[side][p][0]
                totals[side][p][1] += results[side][p][1]
            totals[side]["kept"] += results[side]["kept"]
            totals[side]["whole"] += results[side]["whole"]
        print(f"round {r}: " + ", ".join(
            f"{side} " + " ".join(f"{p} {results[side][p][0]:.1f}s" for p in PHASES)
            for side in order), file=sys.stderr, flush=True)

    print(f"One stage of configs/arithmetic.yaml, {args.rounds} rounds alternating, "
          f"{torch.get_num_threads()} threads, load average {min(load):.1f}-{max(load):.1f} "
          f"(other processes share this CPU: compare the ratios)\n")
    print("| phase | raftlm s | tokens | tok/s | usual loop s | tokens | tok/s | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    ours, theirs = totals["raftlm"], totals["usual"]
    for p in PHASES:
        (s1, n1), (s2, n2) = ours[p], theirs[p]
        print(f"| {p} | {s1:.1f} | {n1} | {n1 / max(s1, 1e-9):.0f} | {s2:.1f} | {n2} | "
              f"{n2 / max(s2, 1e-9):.0f} | {s2 / max(s1, 1e-9):.2f}x |")
    stage1 = sum(ours[p][0] for p in PHASES)
    stage2 = sum(theirs[p][0] for p in PHASES)
    print(f"| stage (generate+reward+train) | {stage1:.1f} | | | {stage2:.1f} | | | "
          f"{stage2 / stage1:.2f}x |")
    print(f"| wall incl. set-up/checkpoint | {ours['whole']:.1f} | | | {theirs['whole']:.1f} "
          f"| | | {theirs['whole'] / ours['whole']:.2f}x |")
    print(f"\nexamples kept (sum over rounds): raftlm {ours['kept']}, usual loop {theirs['kept']} "
          f"(the usual loop trains on raftlm's kept examples: identical training work)")


if __name__ == "__main__":
    main()
