"""`raftlm compare`: the overlaid figures hold each run's numbers, the page is self-contained
and renders in a browser."""

import shutil

import pytest
from test_report import chromium

from raftlm.cli import main as cli_main
from raftlm.run.compare import (
    build_comparison_figures,
    final_rows,
    run_label,
    score_per_second_figure,
    score_per_stage_figure,
    wall_seconds,
    write_comparison,
)
from raftlm.run.report import load_run
from raftlm.run.rundir import write_jsonl


def make_run(root, objective, gain, entropy=True):
    """A finished 2-stage run directory whose held-out accuracy rises by `gain` per stage."""
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(f"training:\n  objective: {objective}\n")
    metrics = [{"stage": 0, "eval/accuracy": 0.1, "eval/reward_mean": 0.1,
                "eval/kl_to_initial": 0.0, "time/eval_s": 10.0}]
    for stage in (1, 2):
        metrics.append({
            "stage": stage, "eval/accuracy": 0.1 + gain * stage,
            "eval/reward_mean": 0.1 + gain * stage, "eval/kl_to_initial": 0.5 * stage,
            "time/generate_s": 20.0, "time/train_s": 5.0, "time/eval_s": 10.0,
            "tokens/trained": 100 * stage,
            **({"train/entropy": 1.0 / stage} if entropy else {}),
        })
    write_jsonl(root / "metrics.jsonl", metrics)
    return root


@pytest.fixture
def runs(tmp_path):
    return [make_run(tmp_path / "arith-sft", "sft", 0.1),
            make_run(tmp_path / "arith-b", "grpo", 0.2)]


def labels_of(fig):
    return [line.get_label() for line in fig.axes[0].get_lines()]


def test_every_run_is_one_line_per_figure_labelled_by_folder_and_objective(runs):
    records = [load_run(r) for r in runs]
    labels = [run_label(r) for r in records]
    assert labels == ["arith-sft", "arith-b (grpo)"]
    fig = score_per_stage_figure(records, labels)
    assert labels_of(fig) == labels
    assert list(fig.axes[0].get_lines()[1].get_ydata()) == pytest.approx([0.1, 0.3, 0.5])


def test_wall_clock_axis_is_the_cumulative_time_of_all_phases(runs):
    records = [load_run(r) for r in runs]
    assert wall_seconds(records[0].metrics) == [10.0, 45.0, 80.0]
    fig = score_per_second_figure(records, ["a", "b"])
    assert list(fig.axes[0].get_lines()[0].get_xdata()) == [10.0, 45.0, 80.0]


def test_entropy_figure_is_left_out_when_no_run_recorded_it(tmp_path):
    records = [load_run(make_run(tmp_path / "x", "sft", 0.1, entropy=False))]
    assert set(build_comparison_figures(records, ["x"])) == {
        "score_per_stage", "score_per_second", "reward_vs_kl"}


def test_final_table_holds_each_runs_last_numbers(runs):
    records = [load_run(r) for r in runs]
    first, second = final_rows(records, ["a", "b"])
    assert first[:4] == ["a", 2, pytest.approx(0.3), pytest.approx(0.3)]
    assert second[2] == pytest.approx(0.5)
    assert first[-1] == pytest.approx(80.0)


def test_page_is_one_self_contained_file_with_its_pngs(runs, tmp_path):
    path = write_comparison(runs, tmp_path / "out")
    page = path.read_text()
    assert path == tmp_path / "out/compare.html"
    assert page.count('src="data:image/png;base64,') == 4
    assert "http://" not in page and "https://" not in page
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [
        "entropy.png", "reward_vs_kl.png", "score_per_second.png", "score_per_stage.png"]


def test_cli_compare_names_the_page(runs, capsys):
    assert cli_main(["compare", *map(str, runs)]) == 0
    assert f"comparison: {runs[0].parent / 'compare/compare.html'}" in capsys.readouterr().out


def test_cli_compare_on_a_folder_without_a_run_fails_clearly(runs, tmp_path, capsys):
    assert cli_main(["compare", str(runs[0]), str(tmp_path / "nothing")]) == 2
    assert "raftlm compare: error:" in capsys.readouterr().err


PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images].map(i => i.naturalWidth > 0 && i.width > 0);
  const table = document.querySelector("#final");
  document.body.dataset.imagesDecoded = images.filter(Boolean).length + "/" + images.length;
  document.body.dataset.tableRows = table.tBodies[0].rows.length;
  document.body.dataset.tableVisible = table.getBoundingClientRect().height > 0;
});
</script></body>"""


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not installed (CI installs it: apt-get install chromium)")
def test_comparison_renders_plots_and_table_in_headless_chromium(runs, tmp_path):
    page = write_comparison(runs, tmp_path / "out").read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE))
    dom = chromium(f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
                   "--dump-dom", probe.as_uri()).stdout
    assert 'data-images-decoded="4/4"' in dom
    assert 'data-table-rows="2"' in dom
    assert 'data-table-visible="true"' in dom
