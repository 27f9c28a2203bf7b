"""A command's output is raftlm's own: no library warnings, progress bars or tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from tiny import save_tiny_model

from raftlm.run import progress

SRC = Path(__file__).resolve().parents[1] / "src"


def raftlm(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}  # every warning would show
    return subprocess.run([sys.executable, "-m", "raftlm", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_own_output(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr
    for noise in ("Warning", "Traceback", "deprecated", "[transformers]", "it/s]"):
        assert noise not in result.stderr, result.stderr
        assert noise not in result.stdout, result.stdout


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("own_output")
    save_tiny_model(root / "model")
    (root / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": f"{i} + 1", "answer": str(i + 1)}) + "\n"
                for i in range(4)))
    return root


@pytest.mark.slow  # two subprocesses, each importing torch
def test_train_and_sample_print_only_raftlms_output(workdir):
    (workdir / "config.yaml").write_text(
        "model: {path: model, dtype: fp32}\n"
        "data: {train_file: prompts.jsonl}\n"
        "raft: {stages: 1, prompts_per_stage: 2, samples_per_prompt: 2}\n"
        "generation: {max_new_tokens: 4}\n"
        "evaluation: {enabled: false}\n"
        "tracking: {report: false}\n"
        "run: {output_dir: run}\n")
    train = raftlm("train", "--config", "config.yaml", cwd=workdir)
    assert_own_output(train)
    assert "run directory: run" in train.stdout
    sample = raftlm("sample", "run", "--prompt", "1 + 1", "--n", "2", "--max-new-tokens", "4",
                    "--column", "answer=2", cwd=workdir)
    assert_own_output(sample)
    assert "--- sample 2/2" in sample.stdout


def emitted(verbose: bool) -> list[tuple[type, str]]:
    """The warnings that get through configure_output(verbose=...) (filters restored after)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        progress.configure_output(quiet=False, verbose=verbose)
        for message, category in [
            ("`is_gradient_checkpointing` is deprecated and will be removed", FutureWarning),
            ("`is_gradient_checkpointing` is deprecated", DeprecationWarning),  # other category
            ("something else is deprecated", FutureWarning),
        ]:
            warnings.warn(message, category, stacklevel=1)
    return [(w.category, str(w.message)) for w in caught]


def test_only_the_listed_library_warnings_are_hidden():
    assert emitted(verbose=False) == [
        (DeprecationWarning, "`is_gradient_checkpointing` is deprecated"),
        (FutureWarning, "something else is deprecated"),
    ]


def test_verbose_hides_nothing():
    assert len(emitted(verbose=True)) == 3
