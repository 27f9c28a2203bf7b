"""A reward server that dies mid-stage: the run stops with one clear error, what was already
scored stays in the stage's journal, and once the server is back `--resume` scores only the
rest and ends exactly like a run that was never interrupted."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import save_tiny_model

from raftlm import RaftConfig, train
from raftlm.rewards.reward import RewardError

# Scores by digit share; logs each request's size; with DIE_AFTER set, the server process
# exits abruptly (no answer) on the request after that many.
SERVED = """
import os

LOG = {log!r}

def digits(prompts, completions, **columns):
    with open(LOG, "a") as log:
        log.write(f"{{len(completions)}}\\n")
    served = sum(1 for _ in open(LOG))
    if os.environ.get("DIE_AFTER") and served > int(os.environ["DIE_AFTER"]):
        os._exit(1)
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`raftlm serve-reward` in its own process on a fixed port (so it can come back)."""

    def __init__(self, spec: str, port: int, die_after: int | None = None):
        env = {**__import__("os").environ, "DIE_AFTER": str(die_after or "")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "raftlm", "serve-reward", "--reward", spec,
             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=env)
        line = self.process.stdout.readline()
        assert re.search(r"http://\S+/score", line), line + self.process.stdout.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(timeout=30)


def served_sizes(log: Path) -> list[int]:
    return [int(n) for n in log.read_text().split()] if log.exists() else []


@pytest.mark.slow
def test_a_server_dying_mid_stage_loses_nothing_scored_and_resume_ends_identical(tmp_path):
    model = save_tiny_model(tmp_path / "model")
    rows = [{"prompt": f"Say {i} digits"} for i in range(8)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    log = tmp_path / "requests.log"
    (tmp_path / "served.py").write_text(SERVED.format(log=str(log)))
    spec, port = f"{tmp_path / 'served.py'}:digits", free_port()

    def config(name: str) -> RaftConfig:
        return RaftConfig.from_dict({
            "run": {"output_dir": str(tmp_path / name), "seed": 5},
            "model": {"path": str(model), "dtype": "fp32", "lora": {"r": 4, "alpha": 8}},
            "data": {"train_file": str(tmp_path / "train.jsonl")},
            "raft": {"stages": 2, "prompts_per_stage": 4, "samples_per_prompt": 3},
            "generation": {"max_new_tokens": 6},
            # one completion per request, one request at a time: chunks of 4 candidates, so
            # whole prompts of 3 are journaled two at a time (6 requests per chunk)
            "reward": {"terms": [{"url": f"http://127.0.0.1:{port}/score", "batch_size": 1,
                                  "concurrency": 1, "retry_s": 1.0, "label": "digits"}]},
            "training": {"learning_rate": 1e-2, "micro_batch_size": 2},
            "evaluation": {"enabled": False}, "tracking": {"report": False},
        })

    server = Server(spec, port)
    try:
        train(config("uninterrupted"))
    finally:
        server.stop()
    log.unlink()

    server = Server(spec, port, die_after=12 + 8)  # stage 1's 12, then dies inside stage 2
    try:
        with pytest.raises(RewardError, match=f"reward 'digits' POST http://127.0.0.1:{port}"):
            train(config("interrupted"))
    finally:
        server.stop()
    assert served_sizes(log) == [1] * 21  # the 21st request killed the server
    log.unlink()

    server = Server(spec, port)
    try:
        train(config("interrupted"), resume=True)
    finally:
        server.stop()

    def records(name: str) -> tuple[list, list]:
        metrics = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").open()]
        candidates = [json.loads(line) for stage in (1, 2) for line in
                      (tmp_path / name / f"stages/{stage:03d}/candidates.jsonl").open()]
        return ([{k: v for k, v in m.items() if not k.startswith("time/")} for m in metrics],
                candidates)

    assert records("interrupted") == records("uninterrupted")
    # Stage 2's first chunk (prompts 0-1, 6 candidates) was journaled before the server died;
    # its second chunk (2 candidates in) was not: resume asks for that chunk's 6 only.
    assert served_sizes(log) == [1] * 6
