"""Benchmark: peak memory of one RAFT stage with `offload: none` vs `offload: phases`.

Each (model, mode) pair runs in a fresh Python process (peaks never go down within one): it
builds the run, runs one stage (collect, reward-model scoring, LoRA fine-tuning, checkpoint)
and reports
  - peak RSS (VmHWM from /proc/self/status: torch's allocations are invisible to tracemalloc),
  - on CUDA, torch.cuda.max_memory_allocated (the number offload is meant to lower),
  - the sizes of what could be resident on an accelerator: policy weights, optimizer state,
    reward-model weights.
On a CPU-only machine there is one memory: offload has nothing to move and cannot lower the
peak; the sizes show what it would keep off an accelerator during scoring.

Models: `tiny` (random 2-layer Llama policy and reward model, built on the fly) and `smollm2`
(the embedded SmolLM2-135M-Instruct as policy, and the same weights loaded as a
sequence-classification reward model with a fresh score head: offline, no download).

Run: .venv/bin/python benchmarks/memory.py [--models tiny smollm2]

`--token-nll`: peak memory and step time of one training step's loss (forward + backward of
`token_nll`) on a randomly initialised Llama with a 128k vocabulary (Llama 3's), batch 8 x
(192 prompt + 64 response tokens), fp32, CPU: the full-vocabulary logits at every position
(the previous `token_nll`) against logits at response positions only, in chunks (today's).
Each in a fresh process, 3 steps, the best time.

Run: .venv/bin/python benchmarks/memory.py --token-nll
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

MODES = ("none", "phases")


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource  # not Linux: ru_maxrss (kB on Linux, bytes on macOS)

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_folders(name: str, workdir: Path) -> tuple[str, str]:
    """(policy folder, reward-model folder) for `tiny` or `smollm2`."""
    if name == "smollm2":
        from raftlm.config import ModelConfig
        from raftlm.models.loading import materialize_model

        folder = str(materialize_model(ModelConfig()))  # converted once into ~/.cache/raftlm
        return folder, folder
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import save_tiny_model, tiny_reward_model, tiny_tokenizer

    policy = save_tiny_model(workdir / "policy")
    tokenizer = tiny_tokenizer()
    tiny_reward_model(vocab_size=len(tokenizer)).save_pretrained(workdir / "reward")
    tokenizer.save_pretrained(workdir / "reward")
    return str(policy), str(workdir / "reward")


def stage_config(policy: str, reward: str, offload: str, workdir: Path) -> Any:
    from raftlm.config import RaftConfig

    rows = [{"prompt": f"Write one sentence about the number {i}."} for i in range(16)]
    (workdir / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return RaftConfig.from_dict({
        "run": {"output_dir": str(workdir / "run"), "seed": 0},
        "model": {"path": policy, "dtype": "fp32", "lora": {"r": 16, "alpha": 32}},
        "data": {"train_file": str(workdir / "prompts.jsonl")},
        "raft": {"stages": 1, "prompts_per_stage": 4, "samples_per_prompt": 4},
        "generation": {"max_new_tokens": 24, "batch_size": 16},
        "reward": {"terms": [{"model": reward, "batch_size": 16}]},
        "training": {"micro_batch_size": 4},
        "evaluation": {"enabled": False},
        "tracking": {"report": False},
        "offload": offload,
    })


def child(name: str, offload: str) -> dict[str, Any]:
    """One stage in this (fresh) process; returns the measurements."""
    import torch

    from raftlm.stage.build import prepare_run
    from raftlm.stage.loop import raft_stage

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        policy, reward = model_folders(name, workdir)
        run = prepare_run(stage_config(policy, reward, offload, workdir))
        rss_before_stage = peak_rss_mb()
        raft_stage(run, 1)
        moments = [v for s in run.trainer.optimizer.state.values() for v in s.values()
                   if torch.is_tensor(v)]
        return {
            "model": name, "offload": offload, "device": str(run.accelerator.device),
            "peak_rss_mb": peak_rss_mb(),
            "peak_rss_setup_mb": rss_before_stage,
            "cuda_peak_mb": (torch.cuda.max_memory_allocated() / 2**20
                             if torch.cuda.is_available() else None),
            "policy_mb": _megabytes(run.policy.parameters()),
            "optimizer_state_mb": _megabytes(moments),
            "reward_models_mb": sum(_megabytes(m.model.parameters()) for m in run.reward.models()),
        }


def nll_child(mode: str, threads: int) -> dict[str, Any]:
    """Three forward+backward steps of the loss in this (fresh) process; returns peak and time."""
    import time

    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from raftlm.training.batches import IGNORE, Example, collate, token_nll

    def full_logits_nll(model: Any, batch: dict) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), batch["labels"][:, 1:],
                               ignore_index=IGNORE, reduction="none")

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128256, hidden_size=512, intermediate_size=1376,
                         num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(1)
    examples = [Example(torch.randint(0, 128256, (192,), generator=gen).tolist(),
                        torch.randint(0, 128256, (64,), generator=gen).tolist())
                for _ in range(8)]
    batch = collate(examples, pad_id=0)
    loss_fn = full_logits_nll if mode == "full" else token_nll
    before = peak_rss_mb()
    times, losses = [], []
    for _ in range(3):
        start = time.perf_counter()
        loss = loss_fn(model, batch).sum()
        loss.backward()
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
        model.zero_grad(set_to_none=True)
    return {"mode": mode, "peak_rss_mb": peak_rss_mb(), "model_rss_mb": before,
            "step_s": min(times), "loss": losses[0]}


def token_nll_table(threads: int, env: dict) -> None:
    print("token_nll, random Llama (vocab 128256, hidden 512, 2 layers), batch 8 x (192 + 64) "
          f"tokens, fp32, CPU, {threads} threads, load average {os.getloadavg()[0]:.1f}")
    print("| loss | peak RSS MB | above the model MB | step s (fwd+bwd) | loss |")
    print("|---|---|---|---|---|")
    rows = {}
    for mode in ("full", "response"):
        done = subprocess.run([sys.executable, __file__, "--nll-child", mode, str(threads)],
                              env=env, capture_output=True, text=True, check=False)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            print(f"{mode}: failed\n{done.stderr[-2000:]}")
            return
        r = rows[mode] = json.loads(lines[-1][len("RESULT "):])
        name = ("full-vocabulary logits, every position" if mode == "full"
                else "response positions only, chunked")
        print(f"| {name} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - r['model_rss_mb']:.0f} | "
              f"{r['step_s']:.2f} | {r['loss']:.2f} |", flush=True)
    full, ours = rows["full"], rows["response"]
    above = [r["peak_rss_mb"] - r["model_rss_mb"] for r in (full, ours)]
    print(f"\nabove-the-model peak {above[0] / max(1.0, above[1]):.1f}x lower, "
          f"step {full['step_s'] / ours['step_s']:.2f}x faster")


def _megabytes(tensors: Any) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"],
                        choices=["tiny", "smollm2"])
    parser.add_argument("--token-nll", action="store_true",
                        help="measure token_nll's peak memory on a 128k-vocabulary model instead")
    parser.add_argument("--threads", type=int, default=2, help="--token-nll: torch threads")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "OFFLOAD"), help=argparse.SUPPRESS)
    parser.add_argument("--nll-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(*args.child)), flush=True)
        return
    if args.nll_child:
        print("RESULT " + json.dumps(nll_child(args.nll_child[0], int(args.nll_child[1]))),
              flush=True)
        return
    if args.token_nll:
        token_nll_table(args.threads, dict(os.environ))
        return
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    header = (f"{'model':<8} {'offload':<7} {'device':<7} {'peak RSS':>9} {'setup RSS':>9} "
              f"{'CUDA peak':>9} {'policy':>7} {'opt.st':>7} {'reward':>7}  (MB)")
    print(header)
    for name in args.models:
        for mode in MODES:
            done = subprocess.run([sys.executable, __file__, "--child", name, mode], env=env,
                                  capture_output=True, text=True, check=False)
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                print(f"{name} {mode}: failed\n{done.stderr[-2000:]}")
                continue
            r = json.loads(lines[-1][len("RESULT "):])
            cuda = "n/a" if r["cuda_peak_mb"] is None else f"{r['cuda_peak_mb']:.0f}"
            print(f"{r['model']:<8} {r['offload']:<7} {r['device']:<7} {r['peak_rss_mb']:>9.0f} "
                  f"{r['peak_rss_setup_mb']:>9.0f} {cuda:>9} {r['policy_mb']:>7.1f} "
                  f"{r['optimizer_state_mb']:>7.1f} {r['reward_models_mb']:>7.1f}", flush=True)


if __name__ == "__main__":
    main()
