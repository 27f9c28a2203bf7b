"""Fault injection: a run killed (SIGKILL) at random moments, stopped by SIGTERM, or out of disk
space, and then resumed, ends exactly as the uninterrupted run: same metrics (times aside), same
candidate files, same checkpoints and final weights, no stray temporary files.

`make chaos` runs the SIGKILL test with RAFTLM_CHAOS_KILLS=100 (20 here), once per
`raft.sampling` mode (fixed, dynamic, gvm) and, under `make chaos` only, on a multi-turn run
(a scripted environment answering each turn) and on a run whose stages build on each other
(replay, anchor rows, restart, a temperature ramp); docs/resume.md has its result. Killed processes
are real processes running `raftlm.cli.main`, forked from a forkserver that imported raftlm
once (a fresh interpreter spends ~2.5 s importing torch, which
would leave little time for killing anything else); one test kills `python -m raftlm` itself.
"""

import errno
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from tiny import assert_same_run, save_tiny_model, write_digits_task

from raftlm.cli import main as cli_main
from raftlm.run import signals
from raftlm.run.checkpoint import verify_manifest
from raftlm.run.journal import StageJournal
from raftlm.run.rundir import RunDir

KILLS = int(os.environ.get("RAFTLM_CHAOS_KILLS", "20"))
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    save_tiny_model(root / "model")
    write_digits_task(root)
    config = {
        "run": {"output_dir": str(root / "run"), "seed": 1, "threads": 1},
        "model": {"path": str(root / "model"), "dtype": "fp32", "lora": {"r": 4, "alpha": 8}},
        "data": {"train_file": str(root / "train.jsonl"), "eval_file": str(root / "eval.jsonl")},
        "raft": {"stages": 3, "prompts_per_stage": 4, "samples_per_prompt": 3},
        "generation": {"max_new_tokens": 6, "batch_size": 8},
        "reward": {"terms": [f"{root / 'rewards.py'}:digits"]},
        "training": {"learning_rate": 1e-2, "micro_batch_size": 2},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root


def snapshot(run_dir: Path) -> dict:
    """What must not depend on interruptions: metrics without times, every file's bytes (the
    report and plots show times: only their names), the list of files (no strays)."""
    metrics = [{k: v for k, v in m.items() if not k.startswith("time/")}
               for m in RunDir(run_dir).read_metrics()]
    files = {}
    for path in sorted(run_dir.rglob("*")):
        name = str(path.relative_to(run_dir))
        if path.is_file() and path.name not in ("metrics.jsonl", ".lock"):
            timed = name == "report.html" or name.startswith("plots/")
            files[name] = None if timed else path.read_bytes()
    return {"metrics": metrics, "files": files}


def run_cli(argv: list[str], log: str) -> None:
    """Forkserver child: the CLI with its output in `log`."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.exit(cli_main(argv))


@pytest.fixture(scope="module")
def forkserver(workspace):
    os.environ.update(OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    context = multiprocessing.get_context("forkserver")
    # What a run imports lazily, too: every child would pay for it again.
    context.set_forkserver_preload([
        "raftlm.cli", "raftlm.stage.loop", "raftlm.run.report", "test_faults", "peft",
        "transformers.models.llama.modeling_llama", "matplotlib.backends.backend_agg"])
    return context


def start(context, workspace: Path, log: Path):
    run = workspace / "run"
    argv = (["train", "--resume", str(run)] if (run / "config.yaml").is_file()
            else ["train", "--config", str(workspace / "config.yaml")])
    process = context.Process(target=run_cli, args=(argv, str(log)))
    process.start()
    return process


@pytest.fixture(scope="module")
def reference(workspace, forkserver):
    """The uninterrupted run's snapshot and its wall time (of a second run: the first one
    also warms caches, e.g. matplotlib's fonts)."""
    return uninterrupted(forkserver, workspace)


def uninterrupted(forkserver, workspace: Path) -> tuple[dict, float]:
    for _ in range(2):
        RunDir.create(workspace / "run", overwrite=True)
        began = time.perf_counter()
        process = start(forkserver, workspace, workspace / "reference.log")
        process.join()
        assert process.exitcode == 0, (workspace / "reference.log").read_text()
        duration = time.perf_counter() - began
    return snapshot(workspace / "run"), duration


# raft.sampling modes whose stages take several rounds (docs/sampling.md); min_reward 0.15 on
# the digit share leaves some prompts without a signal, so dynamic draws more and gvm allocates.
SAMPLING_MODES = {
    "dynamic": {"raft": {"collector": "dynamic", "dynamic": {"max_rounds": 3}}},
    "gvm": {"raft": {"collector": "gvm", "gvm": {"first_samples": 2, "max_samples": 6}}},
}


# A multi-turn run (docs/agents.md): a scripted environment answers every model turn as a
# deterministic tool would, so trajectories are journaled and each later turn continues its
# trajectory's KV. `make chaos` only: three turns per trajectory make the run slower.
CHAOS_ONLY = pytest.mark.skipif("RAFTLM_CHAOS_KILLS" not in os.environ, reason="make chaos only")
MULTI_TURN = pytest.param("multi-turn", marks=CHAOS_ONLY)
STEPS = """
class Steps:
    def reset(self, prompt, answer, **row):
        self.steps = 0

    def step(self, action):
        self.steps += 1
        return f"{len(action)} characters", None, self.steps >= 3
"""


# Stages that build on each other (docs/recipes.md): every stage restarts from the initial
# policy and replays all earlier kept responses (read back from their kept.jsonl), with anchor
# rows and a temperature ramp. `make chaos` only: replay makes the later stages' training longer.
BUILDING = pytest.param("replay", marks=CHAOS_ONLY)
BUILDING_CONFIG = {"raft": {"replay": {}}, "training": {"start": "restart"},
                   "generation": {"temperature": {"start": 1.0, "end": 0.7}}}

# STaR hints (docs/teaching.md): each stage's hinted round is journaled and resumed like a
# collector's round. `make chaos` only, so that `make test` stays short.
HINTED = pytest.param("hints", marks=CHAOS_ONLY)


@pytest.fixture(scope="module", params=["fixed", *SAMPLING_MODES, MULTI_TURN, BUILDING, HINTED])
def killed_run(request, workspace, forkserver, reference):
    """(workspace, uninterrupted snapshot, its wall time) of the run the SIGKILL test kills:
    the shared one (fixed sampling), or one in a folder of its own per sampling mode, for the
    multi-turn run and for the run whose stages build on each other."""
    if request.param == "fixed":
        return workspace, *reference
    root = workspace / request.param
    root.mkdir(exist_ok=True)
    config = yaml.safe_load((workspace / "config.yaml").read_text())
    config["run"]["output_dir"] = str(root / "run")
    if request.param == "multi-turn":
        (root / "steps.py").write_text(STEPS)
        config["rollout"] = {"environment": f"{root / 'steps.py'}:Steps", "max_turns": 3,
                             "max_trajectory_tokens": 200}
    elif request.param == "replay":
        anchor = [{"prompt": f"Say {i} digits", "response": "7" * i} for i in range(1, 9)]
        (root / "anchor.jsonl").write_text("".join(json.dumps(r) + "\n" for r in anchor))
        for section, values in BUILDING_CONFIG.items():
            config[section].update(values)
        config["data"]["anchor"] = {"path": str(root / "anchor.jsonl"), "share": 0.5}
    else:  # a sampling mode, or hints on the fixed collector
        mode = SAMPLING_MODES.get(request.param, {"raft": {"hints": {"samples": 2}}})
        config["raft"].update(mode["raft"])
        config["selection"] = {"min_reward": 0.15}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root, *uninterrupted(forkserver, root)


def in_flight(run: Path) -> str:
    """What a killed run was doing, judged from the files it left."""
    if not (run / "config.yaml").is_file():
        return "start-up"
    strays = [p for p in run.rglob(".*") if p.name != ".lock"]
    if any(p.parent.name == "checkpoints" for p in strays):
        return "checkpoint writing"
    if strays:
        return "writing a file"
    journals = list(run.glob("stages/*/journal.rank*.jsonl"))
    if journals:
        text = journals[0].read_text()
        return "training/evaluation" if '"rewards"' in text else "sampling/scoring"
    stages = len(RunDir(run).read_metrics())
    return "report" if stages == 4 else "start-up/evaluation"


def test_random_sigkills_then_resume_end_exactly_like_the_uninterrupted_run(
        killed_run, forkserver):
    workspace, expected, duration = killed_run
    rng = random.Random(int(os.environ.get("RAFTLM_CHAOS_SEED", "0")))
    kills, episodes, phases = 0, 0, Counter()
    while kills < KILLS:
        RunDir.create(workspace / "run", overwrite=True)
        episodes += 1
        while True:
            log = workspace / f"attempt-{episodes}.log"
            process = start(forkserver, workspace, log)
            process.join(rng.uniform(0, duration))
            if process.is_alive():
                os.kill(process.pid, signal.SIGKILL)
                process.join()
                kills += 1
                phases[in_flight(workspace / "run")] += 1
                continue
            assert process.exitcode == 0, log.read_text()[-2000:]
            break
        assert_same_run(snapshot(workspace / "run"), expected, f"episode {episodes}")
    print(f"\n{kills} SIGKILLs in {episodes} runs (uninterrupted run: {duration:.1f} s), "
          f"each resumed to the identical result; killed during: {dict(phases)}")
    assert len(phases) >= 2  # the kills were spread over the run, not all in one phase


def resume_in_child(context, workspace: Path) -> None:
    process = start(context, workspace, workspace / "resume.log")
    process.join()
    assert process.exitcode == 0, (workspace / "resume.log").read_text()[-2000:]


def test_sigterm_stops_safely_prints_the_resume_command_and_resume_finishes(
        workspace, forkserver, reference):
    RunDir.create(workspace / "run", overwrite=True)
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "raftlm", "train", "--config", str(workspace / "config.yaml")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert process.stdout.readline().startswith("stage 0/3")  # the run is under way
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143
    assert f"raftlm train --resume {workspace / 'run'}" in err and "Traceback" not in err
    resume_in_child(forkserver, workspace)
    assert_same_run(snapshot(workspace / "run"), reference[0])


def test_a_second_signal_exits_at_once(monkeypatch):
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    with signals.stop_on_signals():
        with pytest.raises(signals.Interrupted):
            with signals.critical():  # a first signal inside a write waits for its end...
                signals._handle(signal.SIGINT, None)
                signals._handle(signal.SIGINT, None)  # ...a second one does not
        assert exits == [130]


@pytest.mark.parametrize("writer", ["checkpoint", "journal", "metrics"])
def test_disk_full_fails_in_one_line_keeps_the_checkpoint_and_resumes_exactly(
        workspace, forkserver, reference, monkeypatch, capsys, writer):
    from raftlm.run import rundir

    targets = {"checkpoint": (rundir, "write_trainer_state"),
               "journal": (StageJournal, "_append"), "metrics": (RunDir, "append_metrics")}
    owner, name = targets[writer]
    original, calls = getattr(owner, name), Counter()

    def full_disk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == {"checkpoint": 2, "journal": 20, "metrics": 3}[writer]:
            raise OSError(errno.ENOSPC, "No space left on device", "somewhere")
        return original(*args, **kwargs)

    RunDir.create(workspace / "run", overwrite=True)
    monkeypatch.setattr(owner, name, full_disk)
    assert cli_main(["train", "--config", str(workspace / "config.yaml")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("raftlm train:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert "no space left on device" in errors[0] and "--resume" in errors[0]
    for _, checkpoint in RunDir(workspace / "run").checkpoints():
        assert verify_manifest(checkpoint) is None
    monkeypatch.setattr(owner, name, original)  # space freed
    resume_in_child(forkserver, workspace)
    assert_same_run(snapshot(workspace / "run"), reference[0])
