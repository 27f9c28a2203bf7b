"""CPU threads: idle OpenMP threads sleep instead of spinning (set before torch loads libgomp),
and every tool takes the same `--threads`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raftlm.cli import build_parser
from raftlm.cli import main as cli_main
from raftlm.run.threads import configure_threads

SRC = Path(__file__).resolve().parents[1] / "src"

# Worker threads' CPU seconds while the main thread runs small matmuls with short pauses (a
# decode step's pattern): spinning workers burn CPU through every pause.
SPIN = """
import os, sys, time
if sys.argv[1] == "before":
    from raftlm.run.threads import prefer_passive_wait
    prefer_passive_wait()
import torch
if sys.argv[1] == "after":
    from raftlm.run.threads import prefer_passive_wait
    prefer_passive_wait()
torch.set_num_threads(2)
a = torch.randn(128, 128)

def worker_cpu():
    ticks = 0
    for tid in os.listdir("/proc/self/task"):
        if int(tid) != os.getpid():
            fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")

a @ a
start = worker_cpu()
for _ in range(100):
    a @ a
    time.sleep(0.002)
print(worker_cpu() - start)
"""


def worker_cpu_seconds(when: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    out = subprocess.run([sys.executable, "-c", SPIN, when], env=env, capture_output=True,
                         text=True, check=True)
    return float(out.stdout.strip())


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux's /proc")
@pytest.mark.skipif((os.cpu_count() or 1) < 2,
                    reason="libgomp barely spins when there are more threads than cores")
def test_libgomp_threads_sleep_when_the_policy_is_set_before_torch_loads():
    assert worker_cpu_seconds("before") < 0.05
    # The control: libgomp's default spins, and reads the variable only when torch loads it.
    assert worker_cpu_seconds("never") > 0.1
    assert worker_cpu_seconds("after") > 0.1


def test_the_entry_point_sets_the_wait_policy_before_the_cli_runs():
    script = ("import os, sys; sys.argv = ['raftlm', '--version']\n"
              "from raftlm.__main__ import main\n"
              "try:\n    main()\nexcept SystemExit:\n    pass\n"
              "print(os.environ['OMP_WAIT_POLICY'])")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "PASSIVE"


@pytest.mark.parametrize("command", ["sample", "chat", "export", "serve"])
def test_every_tool_takes_threads(command):
    args = build_parser().parse_args([command, "some/model", "--threads", "3",
                                      *{"sample": ["--prompt", "Hi"],
                                        "export": ["--format", "hf", "--out", "x"]}.get(
                                          command, [])])
    assert args.threads == 3


def test_threads_sets_torchs_thread_count(tiny_model_dir, capsys):
    before = torch.get_num_threads()
    try:
        assert cli_main(["sample", str(tiny_model_dir), "--prompt", "Hi", "--n", "1",
                         "--max-new-tokens", "2", "--threads", "1", "--quiet"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_negative_thread_count_is_one_line(tiny_model_dir, capsys):
    assert cli_main(["sample", str(tiny_model_dir), "--prompt", "Hi", "--threads", "-2"]) != 0
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_no_threads_keeps_torchs_default():
    assert configure_threads(None) == torch.get_num_threads()


def test_the_installed_command_is_the_entry_that_sets_the_wait_policy():
    """The `raftlm` script must start at `raftlm.__main__:main`, not at `cli.main`, or the
    installed command spins idle OpenMP threads while `python -m raftlm` does not."""
    from pathlib import Path

    import tomllib

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["raftlm"] == "raftlm.__main__:main"
