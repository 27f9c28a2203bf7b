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

    from raftlm.components import prepare_run
    from raftlm.loop import raft_stage

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


def _megabytes(tensors: Any) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"],
                        choices=["tiny", "smollm2"])
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "OFFLOAD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(*args.child)), flush=True)
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
