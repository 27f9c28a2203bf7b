"""RAFT as separate jobs (docs/phases.md): what sharding buys and what splitting costs.

1. Sampling throughput: one `raftlm generate` job on all cores, one on a core's share, and N
   shard jobs (`--shard i/N`) running at once, the cores split between them (`run.threads`).
   Reports wall time (process start to exit: imports, model load, sampling, writing), CPU time,
   each job's sampling seconds, and new tokens per second of wall time.
2. End-to-end overhead: `raftlm train` for one stage (evaluation off) against
   generate -> score -> select -> finetune, each a fresh process, on the same config; both end
   in the same checkpoint (tests/test_jobs.py asserts it).

    nice -n 10 .venv/bin/python benchmarks/jobs.py           # embedded SmolLM2-135M, arithmetic
    nice -n 10 .venv/bin/python benchmarks/jobs.py --tiny    # the tiny random model of the tests
    nice -n 10 .venv/bin/python benchmarks/jobs.py --only end-to-end --prompts 8 --k 4

Every command runs as `python -m raftlm ... --quiet` in a temporary folder; the machine's load
average is printed before and after, since a shared machine's numbers move with it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def raftlm(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "raftlm", *args, "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def run_all(commands: list[list[str]]) -> list[tuple[float, float]]:
    """Start every command at once; each one's (wall seconds, CPU seconds: user + system).
    CPU seconds move less than wall time with the load of a shared machine."""
    start = time.perf_counter()
    procs = [raftlm(*c) for c in commands]
    results = []
    for proc in procs:
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err = proc.stderr.read()
        if proc.returncode:
            raise SystemExit(f"failed: {proc.args}\n{err}")
        results.append((time.perf_counter() - start, usage.ru_utime + usage.ru_stime))
    return results


def write_config(folder: Path, tiny: bool, prompts: int, k: int, max_new: int) -> Path:
    if tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import save_tiny_model

        rows = [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(200)]
        (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        raw = {"model": {"path": str(save_tiny_model(folder / "model")), "dtype": "fp32",
                         "lora": {"r": 4, "alpha": 8}},
               "data": {"train_file": str(folder / "train.jsonl")},
               "reward": {"terms": [{"name": "numeric_answer"}]}}
    else:
        raw = yaml.safe_load((ROOT / "configs/arithmetic.yaml").read_text())
    raw.setdefault("raft", {}).update(stages=1, prompts_per_stage=prompts, samples_per_prompt=k)
    raw.setdefault("generation", {})["max_new_tokens"] = max_new
    raw["evaluation"] = {"enabled": False}
    raw["tracking"] = {"report": False}
    raw["run"] = {**raw.get("run", {}), "output_dir": str(folder / "train")}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def shard_stats(work: Path) -> tuple[int, list[float]]:
    """New tokens and each shard's sampling seconds, from the shard files' headers and rows."""
    tokens, seconds = 0, []
    for path in sorted((work / "stages/001/shards").glob("*.jsonl")):
        lines = path.read_text().splitlines()
        seconds.append(json.loads(lines[0])["shard"]["seconds"])
        tokens += sum(json.loads(line)["n_tokens"] for line in lines[1:])
    return tokens, seconds


def sampling_throughput(folder: Path, config: Path, shards: int, cores: int,
                        repeats: int) -> None:
    per_shard = max(1, cores // shards)
    print(f"\n1. sampling: 1 job x {cores} threads, 1 job x {per_shard} thread(s), {shards} shard "
          f"jobs x {per_shard} thread(s) at once; alternated {repeats} time(s)")
    for attempt in range(repeats):
        for n, threads in ((1, cores), (1, per_shard), (shards, per_shard)):
            work = folder / f"gen-{n}-{threads}-{attempt}"
            runs = run_all([["generate", "--config", str(config), "--out", str(work),
                             "--shard", f"{i}/{n}", "--set", f"run.threads={threads}"]
                            for i in range(1, n + 1)])
            tokens, sampling = shard_stats(work)
            wall, cpu = max(w for w, _ in runs), sum(c for _, c in runs)
            print(f"  {n} job(s) x {threads} thread(s): wall {wall:6.1f} s, CPU {cpu:6.1f} s, "
                  f"in-job sampling {', '.join(f'{s:.1f}' for s in sampling)} s; {tokens} new "
                  f"tokens, {tokens / wall:6.1f} tok/s of wall (load {os.getloadavg()[0]:.1f})")


def end_to_end(folder: Path, config: Path, threads: int, repeats: int) -> None:
    print(f"\n2. one stage: raftlm train vs the four jobs (each a fresh process), run.threads="
          f"{threads}; alternated {repeats} time(s)")
    c, threads_set = str(config), f"run.threads={threads}"
    for attempt in range(repeats):
        train_wall, train_cpu = run_all([["train", "--config", c, "--set", threads_set,
                                          "--set", "run.overwrite=true"]])[0]
        work, out = str(folder / f"work-{attempt}"), str(folder / f"jobs-{attempt}")
        steps = {
            "generate": ["generate", "--config", c, "--out", work, "--set", threads_set],
            "score": ["score", work, "--config", c, "--set", threads_set],
            "select": ["select", work, "--config", c, "--set", threads_set],
            "finetune": ["finetune", "--config", c, "--data", work, "--out", out,
                         "--set", threads_set],
        }
        times = {name: run_all([cmd])[0] for name, cmd in steps.items()}
        wall, cpu = sum(w for w, _ in times.values()), sum(c for _, c in times.values())
        metrics = json.loads((folder / "train/metrics.jsonl").read_text().splitlines()[-1])
        phases = {k[5:-2]: v for k, v in metrics.items() if k.startswith("time/")}
        print(f"  raftlm train: wall {train_wall:6.1f} s, CPU {train_cpu:6.1f} s (in the stage: "
              + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()) + ")")
        print(f"  four jobs:    wall {wall:6.1f} s, CPU {cpu:6.1f} s ("
              + ", ".join(f"{k} {w:.1f}/{c:.1f}" for k, (w, c) in times.items())
              + " s wall/CPU)")
        print(f"  overhead: wall {wall - train_wall:+.1f} s ({wall / train_wall:.2f}x), "
              f"CPU {cpu - train_cpu:+.1f} s ({cpu / train_cpu:.2f}x)  "
              f"(load {os.getloadavg()[0]:.1f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="The tests' tiny random model.")
    parser.add_argument("--prompts", type=int, default=16, help="b [default: 16].")
    parser.add_argument("--k", type=int, default=8, help="K [default: 8].")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=2,
                        help="Alternations of the compared runs [default: 2].")
    parser.add_argument("--threads", type=int, default=1,
                        help="End-to-end: run.threads of both [default: 1; a 2-thread torch "
                             "stalls when a shared machine's other work takes its cores].")
    parser.add_argument("--only", choices=["sampling", "end-to-end"],
                        help="Run one of the two measurements [default: both].")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}; {os.cpu_count()} cores; "
          f"{'tiny model' if args.tiny else 'embedded SmolLM2-135M-Instruct'}, "
          f"b={args.prompts}, K={args.k}, max_new_tokens={args.max_new_tokens}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = write_config(folder, args.tiny, args.prompts, args.k, args.max_new_tokens)
        if args.only != "end-to-end":
            sampling_throughput(folder, config, args.shards, args.cores, args.repeats)
        if args.only != "sampling":
            end_to_end(folder, config, args.threads, args.repeats)
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
