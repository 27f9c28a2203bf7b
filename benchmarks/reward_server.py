"""The remote reward term's cost: its overhead per candidate against the same function
in-process, and a slow reward server's stage time at concurrency 1, 4 and 16.

Overhead: `numeric_answer` on one stage's candidates (32 prompts x K=8 = 256, the default
config's arithmetic prompts and answers), in-process against `reward.terms[].url` pointing at
`raftlm serve-reward --reward numeric_answer` (its own process, localhost), batch_size 16,
concurrency 4; the median of --repeats scorings each.

Slow server: `raftlm serve-reward` serving an `async def` reward that sleeps 50 ms per request;
the time to score 256 candidates at concurrency 1, 4 and 16, with one completion per request
(batch_size 1: 256 requests) and with batch_size 16 (16 requests).

    .venv/bin/python benchmarks/reward_server.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from raftlm.rewards.remote import RemoteReward
from raftlm.rewards.reward import Reward
from raftlm.rewards.verifiable import numeric_answer

SLEEPY = """
import asyncio

async def sleepy(completions, **columns):
    await asyncio.sleep(0.05)  # 50 ms per request, whatever its size
    return [1.0] * len(completions)
"""
N = 256  # one default stage: 32 prompts x K=8


@contextmanager
def serve_reward(spec: str) -> Iterator[str]:
    """`raftlm serve-reward --reward SPEC --port 0` in its own process; yields its URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "raftlm", "serve-reward", "--reward", spec, "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = process.stdout.readline()
        match = re.search(r"(http://\S+/score)", line)
        if not match:
            raise RuntimeError(line + process.stdout.read())
        yield match.group(1)
    finally:
        process.terminate()
        process.wait(timeout=30)


def median_seconds(reward: Reward, prompts: list, completions: list, columns: dict,
                   repeats: int) -> float:
    reward(prompts, completions, columns)  # warm-up: imports, first connections
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        reward(prompts, completions, columns)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    a = [(i * 7) % 90 + 10 for i in range(N)]
    b = [(i * 13) % 90 + 10 for i in range(N)]
    prompts = [f"What is {x} + {y}?" for x, y in zip(a, b)]
    answers = [str(x + y) for x, y in zip(a, b)]
    completions = [f"{x} + {y} = {x + y + (i % 3 == 0)}" for i, (x, y) in
                   enumerate(zip(a, b))]
    columns = {"answer": answers}

    local = median_seconds(Reward([("f", 1.0, numeric_answer)]), prompts, completions, columns,
                           args.repeats)
    with serve_reward("numeric_answer") as url:
        remote = Reward([("f", 1.0, RemoteReward(url, batch_size=16, concurrency=4))])
        assert remote(prompts, completions, columns).scores.tolist() == \
            Reward([("f", 1.0, numeric_answer)])(prompts, completions, columns).scores.tolist()
        served = median_seconds(remote, prompts, completions, columns, args.repeats)
    print(f"numeric_answer on {N} candidates: in-process {local * 1e3:.1f} ms, remote "
          f"(batch_size 16, concurrency 4) {served * 1e3:.1f} ms; overhead "
          f"{(served - local) / N * 1e6:.0f} us per candidate")

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "sleepy.py"
        path.write_text(SLEEPY)
        with serve_reward(f"{path}:sleepy") as url:
            print(f"\n50 ms per request, {N} candidates (seconds):")
            print("batch_size  concurrency=1  concurrency=4  concurrency=16")
            for batch_size in (1, 16):
                cells = []
                for concurrency in (1, 4, 16):
                    term = RemoteReward(url, batch_size=batch_size, concurrency=concurrency)
                    seconds = median_seconds(Reward([("sleepy", 1.0, term)]), prompts,
                                             completions, columns, max(1, args.repeats // 2))
                    cells.append(f"{seconds:13.2f}")
                print(f"{batch_size:10d}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
