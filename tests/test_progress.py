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
from raftlm.config import RaftConfig
from raftlm.run.progress import (
    PlainProgress,
    count_decoded,
    count_finished,
    count_prefilled,
    decode_progress,
    progress,
    progress_seconds,
    rate_postfix,
    set_quiet,
)
from raftlm.sampling import generate as generate_module


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
    assert bar.format_dict["n"] == 0  # a disabled bar still answers count_finished


def test_a_bad_interval_is_named(monkeypatch):
    monkeypatch.setenv("RAFTLM_PROGRESS_SECONDS", "soon")
    with pytest.raises(ValueError, match="RAFTLM_PROGRESS_SECONDS"):
        progress_seconds()


def test_a_decoding_bar_advances_with_each_token_before_any_sequence_finishes():
    bar = decode_progress(total=4, max_new_tokens=10, desc="eval", file=io.StringIO())
    count_decoded(bar, 4)  # one step of four sequences: a tenth of each one's budget
    assert bar.n == pytest.approx(0.4)
    assert bar.format_dict["rate"] is None or bar.format_dict["rate"] > 0
    assert bar.postfix.startswith("0 done")


def test_sequences_that_stop_early_still_complete_the_bar():
    bar = decode_progress(total=4, max_new_tokens=10, desc="eval", file=io.StringIO())
    for _ in range(3):
        count_decoded(bar, 4)
    count_finished(bar, 4, 12)  # all four stopped at eos after 3 tokens
    assert bar.n == pytest.approx(4) and bar.finished == 4 and bar.tokens == 12
    assert bar.postfix.startswith("4 done")


def test_the_sampler_moves_the_bar_before_its_first_sequence_finishes(model, tok, monkeypatch):
    bars = []

    def spy(*args, **kwargs):
        bar = decode_progress(*args, **kwargs, file=io.StringIO())
        real_update, first = bar.update, []
        bar.update = lambda n=1: (first or first.append((bar.n + n, bar.finished)), real_update(n))
        bar.first_update = first
        bars.append(bar)
        return bar

    monkeypatch.setattr(generate_module, "decode_progress", spy)
    prompts = [tok("Say 1")["input_ids"], tok("Say 2")["input_ids"]]
    rows = generate_module.generate(model, tok, prompts, 3, RaftConfig().generation,
                                    max_new_tokens=6, seeds=[0, 1])
    (bar,) = bars
    (n, finished), = bar.first_update
    assert finished == 0 and n > 0  # moved by the first step's tokens
    assert bar.n == pytest.approx(6) and bar.finished == 6
    assert bar.tokens == sum(len(c.token_ids) for row in rows for c in row)


def test_the_decode_rate_leaves_out_the_time_spent_prefilling():
    # 70 s of prefill, then one 2-second step of 128 rows: 64 tok/s, not 128 / 72 = 1.8.
    assert rate_postfix(0, 128, 72.0, 9600, 70.0) == (
        "0 done, 64.0 tok/s, prefill 9,600 tok at 137 tok/s")


def test_before_the_first_token_the_bar_shows_prefill_not_zero_tok_s():
    assert rate_postfix(0, 0, 30.0, 4000, 30.0) == "0 done, prefill 4,000 tok at 133 tok/s"
    assert rate_postfix(0, 0, 0.5) == "0 done"


def test_a_log_gets_a_line_while_the_first_prompts_are_prefilled(monkeypatch):
    monkeypatch.setenv("RAFTLM_PROGRESS_SECONDS", "0")
    out = io.StringIO()
    bar = decode_progress(total=64, max_new_tokens=256, desc="eval gsm8k", file=out)
    count_prefilled(bar, 1000, 5.0)  # no sequence has decoded a token yet
    assert "eval gsm8k: 0/64" in out.getvalue()
    assert "prefill 1,000 tok at 200 tok/s" in out.getvalue()
    bar.close()


def test_the_sampler_reports_each_prompt_prefilled_once(model, tok, monkeypatch):
    bars = []
    monkeypatch.setattr(generate_module, "decode_progress", lambda *a, **k: bars.append(
        decode_progress(*a, **k, file=io.StringIO())) or bars[-1])
    prompts = [tok("Say 1")["input_ids"], tok("Say 22 now")["input_ids"]]
    generate_module.generate(model, tok, prompts, 3, RaftConfig().generation, max_new_tokens=4,
                             seeds=[0, 1])
    (bar,) = bars
    # All tokens but the last of each prompt, once for its three samples.
    assert bar.prefill_tokens == sum(len(p) - 1 for p in prompts)
    assert bar.prefill_seconds > 0


def test_a_long_bar_in_a_log_thins_its_lines(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("tqdm.std.time", lambda: clock[0])  # tqdm's clock
    out = io.StringIO()
    bar = PlainProgress(total=1500, desc="eval", unit="seq", file=out, interval=10)
    for _ in range(1500):  # 25 minutes, one update a second
        clock[0] += 1
        bar.update(1)
    bar.close()
    assert 10 <= len(out.getvalue().splitlines()) <= 30  # every 10 s would be 150 lines


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
