"""CPU threads under a competing load: torch's default against raftlm's choices.

Each configuration runs in a fresh process (libgomp reads ``OMP_WAIT_POLICY`` when torch loads
it) on a small random Llama (4 layers, hidden 256): ``sample`` decodes 8 sequences x 32 tokens
one token at a time (many small kernels: where waiting threads hurt most), ``train`` runs
forward + backward on 8 x 128 tokens. Each is timed ``--repeats`` times after a warm-up run
(fewer once 3 s are spent; a configuration that slow keeps its first run); the median is
printed. The competing load (``--load`` busy Python
processes, default 2 per core) is started by this script and stopped before it exits;
configurations alternate so that a change in the machine's other work hits all of them alike.

    .venv/bin/python benchmarks/threads.py             # idle and loaded, every configuration
    .venv/bin/python benchmarks/threads.py --load 4 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# name -> (OMP_WAIT_POLICY or None for libgomp's default, threads or None for the choice)
CONFIGS = {
    "torch default": (None, "torch"),
    "OMP_NUM_THREADS=1": (None, 1),
    "passive, 1 thread": ("PASSIVE", 1),
    "raftlm default": ("raftlm", "raftlm"),  # passive, one thread per core
}


def worker(threads: str, repeats: int) -> None:
    """Time the two workloads in this process and print them as JSON."""
    if threads == "raftlm":
        from raftlm.run.threads import prefer_passive_wait

        prefer_passive_wait()  # before torch, as raftlm's entry point does
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if threads == "raftlm":
        from raftlm.run.threads import configure_threads

        configure_threads(None)
    elif threads != "torch":
        torch.set_num_threads(int(threads))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4)
    model = LlamaForCausalLM(config)
    prompts = torch.randint(0, 1000, (8, 16))
    batch = torch.randint(0, 1000, (8, 128))

    def sample() -> None:
        with torch.no_grad():
            model.generate(prompts, max_new_tokens=32, min_new_tokens=32, do_sample=True,
                           pad_token_id=0)

    def train() -> None:
        model.zero_grad()
        model(batch, labels=batch).loss.backward()

    times = {}
    for name, step in [("sample", sample), ("train", train)]:
        runs: list[float] = []
        while len(runs) < repeats + 1 and sum(runs) < 3.0:  # a few seconds per workload
            start = time.perf_counter()
            step()
            runs.append(time.perf_counter() - start)
        times[name] = statistics.median(runs[1:] or runs)  # the first run warms up
    print(json.dumps({"threads": torch.get_num_threads(), **times}))


def run_config(name: str, repeats: int) -> dict:
    policy, threads = CONFIGS[name]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if policy not in (None, "raftlm"):
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, __file__, "--worker", str(threads), "--repeats",
                          str(repeats)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def start_load(processes: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(processes)]


def stop_load(load: list[subprocess.Popen]) -> None:
    for process in load:
        process.kill()
    for process in load:
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", type=int, default=2 * len(os.sched_getaffinity(0)),
                        help="Busy processes of the competing load [default: 2 per core].")
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs per workload.")
    parser.add_argument("--rounds", type=int, default=1,
                        help="Times each configuration runs (alternating); the best is kept.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.repeats)
        return
    cores = len(os.sched_getaffinity(0))
    print(f"{cores} cores; load before start: {os.getloadavg()[0]:.2f}; "
          f"competing load: {args.load} busy processes")
    results: dict[tuple[str, str], list[dict]] = {}
    for condition in ("idle", "loaded"):
        load = start_load(args.load) if condition == "loaded" else []
        try:
            if load:
                time.sleep(2)  # let the scheduler spread it
            for _ in range(args.rounds):
                for name in CONFIGS:
                    results.setdefault((name, condition), []).append(
                        run_config(name, args.repeats))
        finally:
            stop_load(load)
    print(f"\n{'configuration':<20} {'threads':>7}  {'sample idle':>11} {'loaded':>8}  "
          f"{'train idle':>10} {'loaded':>8}   (seconds, best of {args.rounds} medians)")
    for name in CONFIGS:
        idle, loaded = results[(name, "idle")], results[(name, "loaded")]
        best = {(c, w): min(r[w] for r in rs) for c, rs in [("idle", idle), ("loaded", loaded)]
                for w in ("sample", "train")}
        threads = "/".join(sorted({str(r["threads"]) for r in idle + loaded}))
        print(f"{name:<20} {threads:>7}  {best['idle', 'sample']:>11.2f} "
              f"{best['loaded', 'sample']:>8.2f}  {best['idle', 'train']:>10.2f} "
              f"{best['loaded', 'train']:>8.2f}")


if __name__ == "__main__":
    main()
