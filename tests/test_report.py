"""The run report: figures hold the run's numbers, the page is self-contained and renders."""

import shutil
import subprocess

import matplotlib.image
import numpy as np
import pytest
import yaml
from tiny import save_tiny_model

from raftlm.cli import main as cli_main
from raftlm.run.plots import (
    cost_figure,
    reward_distribution_figure,
    reward_figure,
    time_figure,
)
from raftlm.run.report import build_figures, headline, load_run, prompt_as_chat, write_report
from raftlm.run.rundir import write_jsonl

STAGES = 3


@pytest.fixture
def run_dir(tmp_path):
    """A run directory as `raftlm train` leaves it: baseline plus three stages."""
    root = tmp_path / "run"
    root.mkdir()
    (root / "config.yaml").write_text("raft:\n  stages: 3\n")
    metrics = [{"stage": 0, "eval/reward_mean": 0.2, "eval/accuracy": 0.2, "time/eval_s": 1.0,
                "eval/kl_to_initial": 0.0, "eval/distinct_1": 0.5, "eval/distinct_2": 0.8}]
    for s in range(1, STAGES + 1):
        metrics.append({
            "stage": s, "train/reward_mean": 0.1 * s, "train/reward_selected_mean": 0.3 * s,
            "train/n_selected": 4, "eval/reward_mean": 0.2 + 0.1 * s,
            "eval/accuracy": 0.2 + 0.1 * s, "eval/kl_to_initial": 0.5 * s,
            "eval/distinct_1": 0.5, "eval/distinct_2": 0.8 - 0.05 * s, "time/generate_s": 2.0,
            "time/reward_s": 0.5, "time/train_s": 3.0, "time/eval_s": 1.0,
        })
        rows = [{"prompt_id": p, "prompt": f"What is {p} + {p}?", "sample": j,
                 "response": f"<script>alert({p})</script> answer {p * j}",
                 "reward": float(j), "selected": j == 2} for p in range(2) for j in range(3)]
        write_jsonl(root / f"stages/{s:03d}/candidates.jsonl", rows)
    write_jsonl(root / "metrics.jsonl", metrics)
    return root


def test_reward_figure_has_one_point_per_stage(run_dir):
    fig = reward_figure(load_run(run_dir).metrics)
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert list(lines["held-out: greedy"].get_xdata()) == [0, 1, 2, 3]
    assert list(lines["held-out: greedy"].get_ydata()) == pytest.approx([0.2, 0.3, 0.4, 0.5])
    assert list(lines["train: selected"].get_xdata()) == [1, 2, 3]


def test_reward_distribution_figure_draws_all_and_selected_boxes_per_stage(run_dir):
    fig = reward_distribution_figure(load_run(run_dir).candidates)
    ax = fig.axes[0]
    assert len(ax.patches) == 2 * STAGES
    assert list(ax.get_xticks()) == [1, 2, 3]
    labels = {p.get_label() for p in ax.patches}
    assert {"all candidates", "selected"} <= labels


def test_time_figure_stacks_each_phase(run_dir):
    fig = time_figure(load_run(run_dir).metrics)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    assert labels == ["generate", "reward", "train", "eval"]
    tops = {}
    for patch in fig.axes[0].patches:
        x = round(patch.get_x() + patch.get_width() / 2)
        tops[x] = max(tops.get(x, 0.0), patch.get_y() + patch.get_height())
    assert tops == pytest.approx({0: 1.0, 1: 6.5, 2: 6.5, 3: 6.5})


def test_cost_figure_puts_held_out_accuracy_against_cumulative_tokens_and_seconds(run_dir):
    metrics = load_run(run_dir).metrics
    for record in metrics[1:]:
        record["tokens/generated"] = 100 * record["stage"]  # 100, 200, 300: 100, 300, 600 in all
    del metrics[2]["eval/accuracy"]  # a stage without evaluation still adds its cost
    fig = cost_figure(metrics)
    tokens, seconds = (ax.get_lines()[0] for ax in fig.axes)
    assert list(tokens.get_xdata()) == [0, 100, 600]
    assert list(seconds.get_xdata()) == pytest.approx([1.0, 7.5, 20.5])
    assert list(tokens.get_ydata()) == pytest.approx([0.2, 0.3, 0.5])
    assert cost_figure(metrics[:1]) is None  # one evaluation is no curve


def test_plots_are_skipped_when_the_run_has_no_data_for_them(run_dir):
    write_jsonl(run_dir / "metrics.jsonl", [{"stage": 0, "eval/reward_mean": 0.5}])
    assert set(build_figures(load_run(run_dir))) == {"reward"}


def test_headline_reads_baseline_to_final(run_dir):
    lines = headline(load_run(run_dir).metrics)
    assert lines[0] == "held-out accuracy (greedy): 0.200 \u2192 0.500 (stage 0 \u2192 3)"
    assert not any(line.startswith("training") for line in lines)


def test_headline_warns_when_diversity_collapses(run_dir):
    metrics = load_run(run_dir).metrics
    assert not any("reward hacking" in line for line in headline(metrics))
    metrics[-1]["eval/distinct_2"] = 0.2
    assert "reward hacking" in headline(metrics)[-1]


def test_report_is_titled_by_the_task_folder_above_a_generic_run_folder(run_dir, tmp_path):
    task = tmp_path / "capitals"
    task.mkdir()
    shutil.move(run_dir, task / "run")
    page = write_report(task / "run").read_text()
    assert "<h1>RAFT run: capitals</h1>" in page


def test_report_subtitle_says_model_data_and_objective(run_dir):
    (run_dir / "config.yaml").write_text(yaml.safe_dump({
        "model": {"path": "models/smol"}, "data": {"task": "arithmetic"},
        "training": {"objective": "grpo"}, "raft": {"stages": 3}}))
    page = write_report(run_dir).read_text()
    assert "model models/smol \u00b7 data arithmetic \u00b7 objective grpo \u00b7 stages 3" in page


def test_the_metrics_table_has_a_column_per_stage_not_per_metric(run_dir):
    page = write_report(run_dir).read_text()
    stages_table = page.split('id="stages"')[1].split("</table>")[0]
    assert "<tr><th>metric</th><th>0</th><th>1</th><th>2</th><th>3</th></tr>" in stages_table
    assert "<td>eval/accuracy</td>" in stages_table


def test_legends_sit_beside_the_plot_never_over_its_lines(run_dir):
    for name, (_, fig) in build_figures(load_run(run_dir)).items():
        fig.canvas.draw()
        for ax in fig.axes:
            legend = ax.get_legend()
            if legend is not None:
                overlap = legend.get_window_extent().overlaps(ax.get_window_extent())
                assert not overlap, f"{name}: the legend covers the plot"


def test_lines_of_one_plot_differ_in_marker_and_dashes(run_dir):
    metrics = load_run(run_dir).metrics
    metrics[1]["eval/sampled_reward_mean"] = metrics[1]["eval/reward_mean"]  # equal series
    lines = reward_figure(metrics).axes[0].get_lines()
    styles = [(line.get_marker(), line.get_linestyle()) for line in lines]
    assert len(set(styles)) == len(styles) >= 3


def test_report_is_one_self_contained_escaped_file(run_dir):
    path = write_report(run_dir)
    page = path.read_text()
    assert path == run_dir / "report.html"
    assert "<script>" not in page and "&lt;script&gt;alert(0)" in page
    assert "http://" not in page and "https://" not in page
    assert page.count('src="data:image/png;base64,') == 6
    assert sorted(p.name for p in (run_dir / "plots").iterdir()) == [
        "accuracy.png", "cost.png", "kl_diversity.png", "reward.png", "reward_distribution.png",
        "time.png"]
    assert "stages: 3" in page  # the config


def test_cli_report_names_the_file(run_dir, capsys):
    assert cli_main(["report", str(run_dir)]) == 0
    assert f"report: {run_dir / 'report.html'}" in capsys.readouterr().out


def test_cli_report_on_a_folder_without_a_run_fails_clearly(tmp_path, capsys):
    assert cli_main(["report", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_cli_train_writes_the_report_and_names_it(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "model")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"output_dir": str(tmp_path / "run")},
        "model": {"path": str(model), "dtype": "fp32", "lora": {"r": 4}},
        "data": {"task": "arithmetic", "task_train_size": 8, "task_eval_size": 3},
        "raft": {"stages": 2, "prompts_per_stage": 2, "samples_per_prompt": 2},
        "generation": {"max_new_tokens": 4},
    }))
    assert cli_main(["train", "--config", str(config)]) == 0
    assert f"report: {tmp_path / 'run/report.html'}" in capsys.readouterr().out
    page = (tmp_path / "run/report.html").read_text()
    stages_table = page.split('id="stages"')[1].split("</table>")[0]
    assert "<th>metric</th><th>0</th><th>1</th><th>2</th></tr>" in stages_table


# Rendering in a real browser -----------------------------------------------------------------

PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images].map(i => i.naturalWidth > 0 && i.width > 0);
  const table = document.querySelector("#stages");
  document.body.dataset.imagesDecoded = images.filter(Boolean).length + "/" + images.length;
  document.body.dataset.tableColumns = table.rows[0].cells.length;
  document.body.dataset.tableVisible = table.getBoundingClientRect().height > 0;
  const box = table.parentElement;  // the scrolling div: does the table fit the window?
  document.body.dataset.tableFits = table.getBoundingClientRect().right <= window.innerWidth
    && box.scrollWidth <= box.clientWidth;
});
</script></body>"""


def chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", *args],
        capture_output=True, text=True, timeout=120, check=True,
    )


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not installed (CI installs it: apt-get install chromium)")
def test_report_renders_plots_and_table_in_headless_chromium(run_dir, tmp_path):
    page = write_report(run_dir).read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE))
    dom = chromium(f"--user-data-dir={tmp_path / 'profile1'}", "--virtual-time-budget=5000",
                   "--window-size=1366,900", "--dump-dom", probe.as_uri()).stdout
    assert 'data-images-decoded="6/6"' in dom
    assert f'data-table-columns="{1 + STAGES + 1}"' in dom  # metric, stages 0..3
    assert 'data-table-visible="true"' in dom
    assert 'data-table-fits="true"' in dom  # a laptop's width, nothing cut off on the right

    shot = tmp_path / "shot.png"
    chromium(f"--user-data-dir={tmp_path / 'profile2'}", f"--screenshot={shot}",
             "--window-size=1280,2000", "--hide-scrollbars", (run_dir / "report.html").as_uri())
    pixels = (matplotlib.image.imread(shot)[..., :3] * 255).round()
    # matplotlib's first line colour (#1f77b4) is on screen only if the plots were painted.
    blue = (np.abs(pixels - [0x1F, 0x77, 0xB4]).max(axis=-1) < 12).sum()
    assert blue > 500, f"only {blue} plot-blue pixels in a {pixels.shape[:2]} screenshot"


def test_report_shows_a_chatml_prompt_as_roles_and_text():
    row = {"prompt": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
                     "What is 12 + 30?<|im_end|>\n<|im_start|>assistant\n"}
    assert prompt_as_chat(row) == "system: Be brief.\nuser: What is 12 + 30?"


def test_report_shows_the_original_messages_for_other_chat_templates():
    row = {"prompt": "[INST] What is 12 + 30? [/INST]",
           "original_prompt": [{"role": "user", "content": "What is 12 + 30?"}]}
    assert prompt_as_chat(row) == "user: What is 12 + 30?"


def test_report_shows_a_prompt_without_chat_template_as_is():
    assert prompt_as_chat({"prompt": "Q: 1 + 1 =", "original_prompt": "Q: 1 + 1 ="}) == "Q: 1 + 1 ="


def test_report_page_holds_the_chat_not_the_special_tokens(run_dir):
    rows = [{"prompt": "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n",
             "response": "7", "reward": 1.0, "selected": True}]
    write_jsonl(run_dir / "stages/001/candidates.jsonl", rows)
    page = write_report(run_dir).read_text()
    assert "user: What is 3 + 4?" in page and "im_start" not in page


def test_report_shows_held_out_answers_of_the_last_evaluation(run_dir):
    """34.8: the held-out answers are the ones a user wants to read, not only averages."""
    for stage, answer in ((0, "12"), (3, "<b>14</b>")):
        write_jsonl(run_dir / f"stages/{stage:03d}/eval.jsonl", [
            {"set": "heldout", "prompt_id": 0, "prompt": "What is 7 + 7?", "answer": "14",
             "response": f"7 + 7 = {answer}", "correct": {"lenient": stage == 3}}])
    page = write_report(run_dir).read_text()
    section = page[page.index('id="held-out-answers"'):page.index('id="examples"')]
    assert "stage 3&#x27;s greedy response" in section
    assert "7 + 7 = &lt;b&gt;14&lt;/b&gt;" in section
    assert "lenient: yes" in section and "= 12" not in section  # the last evaluation only
