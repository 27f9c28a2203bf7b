"""Benchmark: raftlm.core.raft_alignment on a NumPy array vs plain Python loops.

The Python loops get the same data as nested lists of Python floats (the conversion is
not timed). Two loops are timed:

* "loop": what a naive user writes; it reads only the kept responses' tokens and
  checks nothing.
* "checked loop": the same plus the checks raft_alignment makes (every reward finite,
  every log-probability finite and <= 0), i.e. the same work as raftlm.

Run: .venv/bin/python benchmarks/core.py [--stages 8 --prompts 4096 --responses 8 --tokens 128]
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from raftlm.core import raft_alignment


def python_loop_alignment(stages_log_probs: list, stages_rewards: list) -> list[float]:
    """Per-stage RAFT loss with Python floats only, no validation."""
    losses = []
    for stage_lp, stage_rw in zip(stages_log_probs, stages_rewards, strict=True):
        total, n_tokens = 0.0, 0
        for prompt_lp, prompt_rw in zip(stage_lp, stage_rw, strict=True):
            best = max(range(len(prompt_rw)), key=prompt_rw.__getitem__)  # first max wins
            for lp in prompt_lp[best]:
                total -= lp
                n_tokens += 1
        losses.append(round(total / n_tokens, 4))
    return losses


def checked_python_loop_alignment(stages_log_probs: list, stages_rewards: list) -> list[float]:
    """python_loop_alignment plus the input checks raft_alignment performs."""
    for stage_lp, stage_rw in zip(stages_log_probs, stages_rewards, strict=True):
        for prompt_lp, prompt_rw in zip(stage_lp, stage_rw, strict=True):
            for reward in prompt_rw:
                if not math.isfinite(reward):
                    raise ValueError("non-finite reward")
            for response in prompt_lp:
                for lp in response:
                    if not (math.isfinite(lp) and lp <= 0):
                        raise ValueError("bad log-probability")
    return python_loop_alignment(stages_log_probs, stages_rewards)


def best_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """(fastest wall time of `repeats` calls, last result)."""
    best, result = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=4096)
    parser.add_argument("--responses", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the fast path")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    shape = (args.stages, args.prompts, args.responses, args.tokens)
    rng = np.random.default_rng(args.seed)
    log_probs = -rng.exponential(size=shape)  # <= 0, like real token log-probabilities
    rewards = rng.random(shape[:3])
    print(f"T={shape[0]} P={shape[1]} K={shape[2]} L={shape[3]} ({log_probs.size:,} log-probs)")

    fast_s, fast = best_time(lambda: raft_alignment(log_probs, rewards), args.repeats)
    nested_lp, nested_rw = log_probs.tolist(), rewards.tolist()  # not timed
    loop_s, loop = best_time(lambda: python_loop_alignment(nested_lp, nested_rw), 1)
    checked_s, checked = best_time(lambda: checked_python_loop_alignment(nested_lp, nested_rw), 1)

    # The loops add in a different order; rounding to 4 decimals can flip the last digit.
    for name, other in (("loop", loop), ("checked loop", checked)):
        diff = max(abs(a - b) for a, b in zip(fast, other, strict=True))
        if diff > 1e-4:
            raise SystemExit(f"mismatch between raftlm and the {name}: {fast} vs {other}")
    print(f"losses          {fast} (loops agree: exact={fast == loop})")
    print(f"raftlm ndarray  {fast_s * 1e3:9.2f} ms  (best of {args.repeats})")
    print(f"python loop     {loop_s * 1e3:9.2f} ms  speedup {loop_s / fast_s:6.1f}x")
    print(f"checked loop    {checked_s * 1e3:9.2f} ms  speedup {checked_s / fast_s:6.1f}x")


if __name__ == "__main__":
    main()
