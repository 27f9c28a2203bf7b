"""`raftlm compare`: the overlaid figures hold each run's numbers, the page is self-contained
and renders in a browser."""

import shutil

import pytest
from test_report import chromium

from raftlm.cli import main as cli_main
from raftlm.run.compare import (
    band,
    build_comparison_figures,
    group_runs,
    summary_rows,
    summary_table,
    write_comparison,
)
from raftlm.run.plots import wall_seconds
from raftlm.run.report import load_run
from raftlm.run.rundir import write_jsonl


def make_run(root, objective, gain, entropy=True, seed=0, accuracy_shift=0.0):
    """A finished 2-stage run directory whose held-out accuracy rises by `gain` per stage."""
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(
        f"run:\n  seed: {seed}\n  output_dir: {root}\ntraining:\n  objective: {objective}\n")
    metrics = [{"stage": 0, "eval/accuracy": 0.1, "eval/reward_mean": 0.1,
                "eval/kl_to_initial": 0.0, "time/eval_s": 10.0}]
    for stage in (1, 2):
        metrics.append({
            "stage": stage, "eval/accuracy": 0.1 + gain * stage + accuracy_shift,
            "eval/reward_mean": 0.1 + gain * stage, "eval/kl_to_initial": 0.5 * stage,
            "time/generate_s": 20.0, "time/train_s": 5.0, "time/eval_s": 10.0,
            "tokens/trained": 100 * stage, "tokens/generated": 1000, "train/groups_dropped": 3,
            **({"train/entropy": 1.0 / stage} if entropy else {}),
        })
    write_jsonl(root / "metrics.jsonl", metrics)
    return root


@pytest.fixture
def runs(tmp_path):
    return [make_run(tmp_path / "arith-sft", "sft", 0.1),
            make_run(tmp_path / "arith-b", "grpo", 0.2)]


@pytest.fixture
def seeds(tmp_path):
    """Three seeds of grpo (accuracy shifted by -0.1, 0, +0.1) and one sft run."""
    return [make_run(tmp_path / f"arith-grpo-s{s}", "grpo", 0.2, seed=s,
                     accuracy_shift=0.1 * (s - 1)) for s in range(3)] + [
        make_run(tmp_path / "arith-sft-s0", "sft", 0.1)]


def labels_of(fig):
    return [line.get_label() for line in fig.axes[0].get_lines()]


def groups_of(dirs, labels=None):
    return group_runs([load_run(d) for d in dirs], labels)


def test_every_configuration_is_one_line_per_figure_labelled_by_folder_and_objective(runs):
    groups = groups_of(runs)
    assert [g.label for g in groups] == ["arith-sft", "arith-b (grpo)"]
    fig = build_comparison_figures(groups)["score_per_stage"][1]
    assert labels_of(fig) == ["arith-sft", "arith-b (grpo)"]
    assert list(fig.axes[0].get_lines()[1].get_ydata()) == pytest.approx([0.1, 0.3, 0.5])


def test_runs_that_differ_only_in_seed_are_one_group_drawn_as_mean_and_min_max_band(seeds):
    groups = groups_of(seeds)
    assert [(g.label, len(g.runs)) for g in groups] == [("arith-grpo", 3), ("arith-sft", 1)]
    stages, mean, low, high = band(groups[0], "eval/accuracy")
    assert stages == [0, 1, 2]
    assert mean == pytest.approx([0.1, 0.3, 0.5])
    assert low == pytest.approx([0.1, 0.2, 0.4]) and high == pytest.approx([0.1, 0.4, 0.6])
    fig = build_comparison_figures(groups)["score_per_stage"][1]
    assert labels_of(fig) == ["arith-grpo (n=3)", "arith-sft"]
    assert len(fig.axes[0].collections) == 1  # one band: the single sft run has none


def test_labels_group_runs_explicitly_and_must_match_the_runs(seeds):
    groups = groups_of(seeds, ["a", "b", "a", "b"])
    assert [(g.label, [r.root.name for r in g.runs]) for g in groups] == [
        ("a", ["arith-grpo-s0", "arith-grpo-s2"]), ("b", ["arith-grpo-s1", "arith-sft-s0"])]
    with pytest.raises(ValueError, match="2 --label values for 4 run directories"):
        groups_of(seeds, ["a", "b"])


def test_wall_clock_and_token_axes_are_cumulative(runs):
    records = [load_run(r) for r in runs]
    assert wall_seconds(records[0].metrics) == [10.0, 45.0, 80.0]
    figures = build_comparison_figures(group_runs(records))
    seconds = figures["score_per_second"][1].axes[0].get_lines()[0].get_xdata()
    tokens = figures["score_per_token"][1].axes[0].get_lines()[0].get_xdata()
    assert list(seconds) == [10.0, 45.0, 80.0] and list(tokens) == [0.0, 1000.0, 2000.0]


def test_entropy_figure_is_left_out_when_no_run_recorded_it(tmp_path):
    groups = groups_of([make_run(tmp_path / "x", "sft", 0.1, entropy=False)])
    assert set(build_comparison_figures(groups)) == {
        "score_per_stage", "score_per_second", "score_per_token", "reward_vs_kl"}


def test_summary_gives_mean_and_std_over_seeds_and_counts_as_integers(seeds):
    rows = summary_rows(groups_of(seeds))
    grpo = rows[0]
    assert grpo["eval/accuracy"] == pytest.approx((0.5, 0.1))
    assert grpo["train/groups_dropped"] == (6.0, 0.0)  # 3 per stage, 2 stages, every seed
    titles, cells = summary_table(rows)
    line = dict(zip(titles, cells[0]))
    assert line["held-out accuracy"] == "0.500 \u00b1 0.100"
    assert line["groups dropped"] == "6 \u00b1 0" and line["tokens trained"] == "300 \u00b1 0"
    assert line["stages"] == "2" and line["wall time (s)"] == "80 \u00b1 0"
    assert dict(zip(titles, cells[1]))["held-out accuracy"] == "0.300"  # one run: no std


def test_page_is_one_self_contained_file_with_its_pngs_and_a_markdown_summary(runs, tmp_path):
    path = write_comparison(runs, tmp_path / "out")
    page = path.read_text()
    assert path == tmp_path / "out/compare.html"
    assert page.count('src="data:image/png;base64,') == 5
    assert "http://" not in page and "https://" not in page
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [
        "entropy.png", "reward_vs_kl.png", "score_per_second.png", "score_per_stage.png",
        "score_per_token.png"]
    summary = (tmp_path / "out/summary.md").read_text().splitlines()
    assert summary[0].startswith("| group | runs | stages | held-out accuracy |")
    assert len(summary) == 4


def test_cli_compare_names_the_page(runs, capsys):
    assert cli_main(["compare", *map(str, runs)]) == 0
    assert f"comparison: {runs[0].parent / 'compare/compare.html'}" in capsys.readouterr().out


def test_cli_compare_groups_by_label(seeds, tmp_path, capsys):
    labels = [a for _ in seeds for a in ("--label", "all")]
    assert cli_main(["compare", *map(str, seeds), *labels, "--out", str(tmp_path / "one")]) == 0
    assert "| all | 4 | 2 |" in (tmp_path / "one/summary.md").read_text()


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
    assert 'data-images-decoded="5/5"' in dom
    assert 'data-table-rows="2"' in dom
    assert 'data-table-visible="true"' in dom
