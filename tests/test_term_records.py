"""What each reward term did, as recorded: the report's per-term plot and the table of sampled
completions sent to TensorBoard and W&B every `tracking.log_completions` stages."""

from __future__ import annotations

import sys
import types

import pytest

from raftlm.config import TrackingConfig
from raftlm.run.plots import term_names, term_reward_figure
from raftlm.run.report import build_figures, load_run
from raftlm.run.rundir import RunDir, write_jsonl
from raftlm.run.tracking import Tracker, completion_table

ROWS = [
    {"prompt_id": 0, "sample": j, "prompt": "<|im_start|>user\n1+1?<|im_end|>",
     "original_prompt": "1+1?", "response": f"it is {j} | ok", "reward": 0.5 * j,
     "rewards": {"numeric_answer": float(j == 2), "judge": 0.1 * j}, "selected": j == 2}
    for j in range(3)
]


def write_run(root, metrics):
    (root / "config.yaml").write_text("raft:\n  stages: 2\n")
    write_jsonl(root / "metrics.jsonl", metrics)
    for s in {m["stage"] for m in metrics} - {0}:
        write_jsonl(root / f"stages/{s:03d}/candidates.jsonl", ROWS)
    return root


def test_the_report_plots_each_terms_mean_per_stage(tmp_path):
    metrics = [{"stage": s, "train/reward_mean": 0.5, "reward/numeric_answer/mean": 0.2 * s,
                "reward/judge/mean": 0.7} for s in (1, 2)]
    run = load_run(write_run(tmp_path, metrics))
    assert term_names(run.metrics) == ["numeric_answer", "judge"]
    lines = {line.get_label(): line for line in term_reward_figure(run.metrics).axes[0].lines}
    assert list(lines["numeric_answer"].get_ydata()) == pytest.approx([0.2, 0.4])
    assert list(lines["judge"].get_xdata()) == [1, 2]
    assert "reward_terms" in build_figures(run)


def test_no_term_plot_without_term_metrics(tmp_path):
    run = load_run(write_run(tmp_path, [{"stage": 1, "train/reward_mean": 0.5}]))
    assert term_reward_figure(run.metrics) is None
    assert "reward_terms" not in build_figures(run)


def test_the_completion_table_has_a_column_per_term_and_the_datas_prompt():
    columns, table = completion_table(ROWS)
    assert columns[-2:] == ["reward/numeric_answer", "reward/judge"]
    assert table[2][columns.index("prompt")] == "1+1?"
    assert table[2][-2:] == [1.0, pytest.approx(0.2)]
    assert table[2][columns.index("selected")] is True


def test_completions_reach_tensorboard_every_n_stages(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = Tracker(RunDir(tmp_path), TrackingConfig(tensorboard=True, log_completions=2))
    logged = [tracker.log_completions(stage, ROWS) for stage in (1, 2, 3, 4)]
    tracker.close()
    assert logged == [False, True, False, True]
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    texts = events.Tensors("completions/text_summary")
    assert [t.step for t in texts] == [2, 4]
    table = texts[0].tensor_proto.string_val[0].decode()
    assert "| reward/numeric_answer | reward/judge |" in table and "it is 2 \\| ok" in table


def test_completions_reach_wandb_as_a_table(tmp_path, monkeypatch):
    logged = []

    class Run:
        def log(self, data, step):
            logged.append((step, data))

        def finish(self):
            pass

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data

    fake = types.SimpleNamespace(init=lambda **kwargs: Run(), Table=Table)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    tracker = Tracker(RunDir(tmp_path), TrackingConfig(wandb=True, log_completions=1))
    assert tracker.log_completions(3, ROWS)
    ((step, data),) = logged
    assert step == 3 and data["completions"].columns[-1] == "reward/judge"
    assert len(data["completions"].data) == 3


def test_nothing_is_logged_when_switched_off(tmp_path):
    tracker = Tracker(RunDir(tmp_path), TrackingConfig(tensorboard=True, log_completions=0))
    assert not tracker.log_completions(2, ROWS)
    tracker.close()
