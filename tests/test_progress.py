"""Progress output: tqdm in a terminal, timed plain lines elsewhere, nothing with --quiet."""

from __future__ import annotations

import io
import json
import os
import pty

import pytest
import yaml
from tiny import save_tiny_model

from raftlm.cli import main as cli_main
from raftlm.run.progress import PlainProgress, progress, progress_seconds, set_quiet


@pytest.fixture(autouse=True)
def not_quiet():
    set_quiet(False)
    yield
    set_quiet(False)


def test_a_log_file_gets_plain_lines_without_carriage_returns(monkeypatch):
    monkeypatch.setenv("RAFTLM_PROGRESS_SECONDS", "0")
    out = io.StringIO()
    bar = progress(total=3, desc="collect stage 1", unit="seq", file=out)
    for _ in range(3):
        bar.update(1)
    bar.close()
    text = out.getvalue()
    assert isinstance(bar, PlainProgress)
    assert "\r" not in text
    assert text.splitlines()[-1].startswith("collect stage 1: 3/3 seq")


def test_plain_lines_wait_for_the_interval(monkeypatch):
    monkeypatch.setenv("RAFTLM_PROGRESS_SECONDS", "3600")
    out = io.StringIO()
    bar = progress(total=100, desc="train stage 1", unit="step", file=out)
    bar.update(100)
    bar.set_postfix(loss="0.5")
    bar.close()
    assert out.getvalue() == ""


def test_a_terminal_gets_a_tqdm_bar():
    leader, follower = pty.openpty()
    with os.fdopen(follower, "w") as terminal:
        bar = progress(total=2, desc="collect", unit="seq", file=terminal)
        bar.update(2)
        terminal.flush()
        shown = os.read(leader, 4096).decode()
        bar.close()
    os.close(leader)
    assert not isinstance(bar, PlainProgress)
    assert shown.startswith("\rcollect:") and "0/2" in shown  # a redrawn bar


def test_quiet_silences_progress(monkeypatch):
    monkeypatch.setenv("RAFTLM_PROGRESS_SECONDS", "0")
    set_quiet(True)
    out = io.StringIO()
    bar = progress(total=2, desc="collect", unit="seq", file=out)
    bar.update(2)
    bar.set_postfix_str("12 tok/s")
    bar.close()
    assert out.getvalue() == ""
    assert bar.format_dict["n"] == 0  # a disabled bar still answers report_progress


def test_a_bad_interval_is_named(monkeypatch):
    monkeypatch.setenv("RAFTLM_PROGRESS_SECONDS", "soon")
    with pytest.raises(ValueError, match="RAFTLM_PROGRESS_SECONDS"):
        progress_seconds()


@pytest.fixture(scope="module")
def tiny_run_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("progress")
    rows = [{"prompt": f"Say {i}", "answer": str(i)} for i in range(4)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "run": {"output_dir": str(root / "run"), "overwrite": True},
        "model": {"path": str(save_tiny_model(root / "model")), "dtype": "fp32"},
        "data": {"train_file": str(root / "train.jsonl"), "eval_file": str(root / "train.jsonl")},
        "raft": {"stages": 1, "prompts_per_stage": 2, "samples_per_prompt": 2},
        "generation": {"max_new_tokens": 4},
        "tracking": {"report": False},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_train_to_a_log_prints_plain_progress_lines(tiny_run_config, capsys, monkeypatch):
    monkeypatch.setenv("RAFTLM_PROGRESS_SECONDS", "0")
    assert cli_main(["train", "--config", str(tiny_run_config)]) == 0
    captured = capsys.readouterr()
    assert "collect stage 1: 4/4 seq" in captured.err
    assert "\r" not in captured.err
    assert "stage 1/1" in captured.out


def test_train_quiet_keeps_only_the_stage_summaries(tiny_run_config, capsys, monkeypatch):
    monkeypatch.setenv("RAFTLM_PROGRESS_SECONDS", "0")
    assert cli_main(["train", "--quiet", "--config", str(tiny_run_config)]) == 0
    captured = capsys.readouterr()
    assert "collect stage" not in captured.err and "train stage" not in captured.err
    assert "stage 1/1" in captured.out
