"""`raftlm compare RUN_DIR RUN_DIR ...`: several runs overlaid on one self-contained page.

Reads only the run directories (metrics.jsonl, config.yaml), like `raftlm report`. Writes
OUT/compare.html (images inlined as data URIs) and OUT/*.png: held-out accuracy (or reward) per
stage and per second of wall time, reward against KL to the initial policy, token entropy of
the sampled responses, and a table of each run's final numbers.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from raftlm.run.report import RunRecords, load_run, png_bytes, series
from raftlm.run.rundir import atomic_write_bytes, atomic_write_text

FINAL_COLUMNS = [  # (metrics key, column title); the last record holding the key is shown
    ("eval/accuracy", "held-out accuracy"),
    ("eval/reward_mean", "held-out reward"),
    ("eval/sampled_accuracy", "sampled accuracy"),
    ("eval/kl_to_initial", "KL to pi_0"),
    ("train/entropy", "entropy"),
    ("eval/distinct_2", "distinct-2"),
    ("train/clip_fraction", "clip fraction"),
    ("train/groups_dropped", "groups dropped"),
    ("tokens/trained", "tokens trained"),
]


def run_label(run: RunRecords) -> str:
    """The run's folder name, with its objective when the name does not already say it."""
    objective = (yaml.safe_load(run.config_text or "{}") or {}).get("training", {}).get(
        "objective", "sft")
    name = run.root.resolve().name
    return name if objective in name else f"{name} ({objective})"


def score_key(runs: Sequence[RunRecords]) -> tuple[str, str]:
    """Accuracy when every run has it, else the held-out greedy reward."""
    if all(series(r.metrics, "eval/accuracy")[0] for r in runs):
        return "eval/accuracy", "held-out accuracy (greedy)"
    return "eval/reward_mean", "held-out reward (greedy)"


def wall_seconds(metrics: list[dict[str, Any]]) -> list[float]:
    """Cumulative wall time at the end of each record (the sum of its time/* phases)."""
    total, out = 0.0, []
    for record in metrics:
        total += sum(v for k, v in record.items()
                     if k.startswith("time/") and isinstance(v, (int, float)))
        out.append(total)
    return out


def _figure(title: str, xlabel: str, ylabel: str) -> tuple[Figure, Any]:
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def score_per_stage_figure(runs: Sequence[RunRecords], labels: list[str]) -> Figure:
    key, name = score_key(runs)
    fig, ax = _figure(f"{name} per stage", "stage", name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for run, label in zip(runs, labels):
        ax.plot(*series(run.metrics, key), marker="o", label=label)
    ax.legend(fontsize="small")
    return fig


def score_per_second_figure(runs: Sequence[RunRecords], labels: list[str]) -> Figure:
    key, name = score_key(runs)
    fig, ax = _figure(f"{name} per wall-clock second", "wall time (s, cumulative)", name)
    for run, label in zip(runs, labels):
        points = [(t, m[key]) for t, m in zip(wall_seconds(run.metrics), run.metrics)
                  if isinstance(m.get(key), (int, float))]
        ax.plot([t for t, _ in points], [v for _, v in points], marker="o", label=label)
    ax.legend(fontsize="small")
    return fig


def reward_vs_kl_figure(runs: Sequence[RunRecords], labels: list[str]) -> Figure | None:
    fig, ax = _figure("held-out reward against KL to the initial policy",
                      "KL(pi_t || pi_0) (sampled held-out responses)", "held-out reward (greedy)")
    drawn = False
    for run, label in zip(runs, labels):
        points = [(m["eval/kl_to_initial"], m["eval/reward_mean"]) for m in run.metrics
                  if "eval/kl_to_initial" in m and "eval/reward_mean" in m]
        if points:
            ax.plot([k for k, _ in points], [r for _, r in points], marker="o", label=label)
            drawn = True
    if drawn:
        ax.legend(fontsize="small")
    return fig if drawn else None


def entropy_figure(runs: Sequence[RunRecords], labels: list[str]) -> Figure | None:
    fig, ax = _figure("token entropy of the sampled training responses", "stage",
                      "-mean log pi_old (nats/token)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    drawn = False
    for run, label in zip(runs, labels):
        stages, values = series(run.metrics, "train/entropy")
        if stages:
            ax.plot(stages, values, marker="o", label=label)
            drawn = True
    if drawn:
        ax.legend(fontsize="small")
    return fig if drawn else None


def build_comparison_figures(runs: Sequence[RunRecords], labels: list[str]
                             ) -> dict[str, tuple[str, Figure]]:
    """name -> (caption, figure); figures without data in any run are left out."""
    candidates = {
        "score_per_stage": ("Held-out score after each stage (stage 0: the initial policy).",
                            score_per_stage_figure(runs, labels)),
        "score_per_second": ("The same against cumulative wall time (generation, reward, "
                             "training and evaluation).", score_per_second_figure(runs, labels)),
        "reward_vs_kl": ("What each run paid in KL to the initial policy for its reward.",
                         reward_vs_kl_figure(runs, labels)),
        "entropy": ("Token entropy of each stage's sampled responses (-mean of the recorded "
                    "sampling log-probs).", entropy_figure(runs, labels)),
    }
    return {name: (caption, fig) for name, (caption, fig) in candidates.items()
            if fig is not None}


def final_rows(runs: Sequence[RunRecords], labels: list[str]) -> list[list[Any]]:
    """One row per run: label, stages, final value of each FINAL_COLUMNS key, wall seconds."""
    rows = []
    for run, label in zip(runs, labels):
        row: list[Any] = [label, max((m["stage"] for m in run.metrics), default=0)]
        for key, _ in FINAL_COLUMNS:
            values = series(run.metrics, key)[1]
            row.append(values[-1] if values else None)
        row.append(wall_seconds(run.metrics)[-1] if run.metrics else None)
        rows.append(row)
    return rows


def render_comparison(labels: list[str], roots: list[Path], images: dict[str, tuple[str, bytes]],
                      rows: list[list[Any]]) -> str:
    """The comparison page; every value is HTML-escaped, every image inlined."""
    e = html.escape
    plots = "".join(
        f'<figure id="plot-{e(name)}"><img alt="{e(name)}" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode()}"><figcaption>{e(caption)}</figcaption></figure>'
        for name, (caption, png) in images.items()
    )
    columns = ["run", "stages"] + [title for _, title in FINAL_COLUMNS] + ["wall time (s)"]
    head = "".join(f"<th>{e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{e(_fmt(v))}</td>" for v in row) + "</tr>"
                   for row in rows)
    sources = "".join(f"<li>{e(label)}: {e(str(root))}</li>" for label, root in zip(labels, roots))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>raftlm compare</title>
<style>{CSS}</style></head><body>
<h1>raftlm compare: {len(labels)} runs</h1>
<h2>Final numbers</h2>
<table id="final"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<h2>Plots</h2><section id="plots">{plots}</section>
<h2>Runs</h2><ul id="runs">{sources}</ul>
</body></html>
"""


def _fmt(value: Any) -> str:
    if value is None:
        return "\u2013"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px; color: #222; }
#plots { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #555; max-width: 640px; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
th { background: #f0f0f0; } td:first-child { text-align: left; }
"""


def write_comparison(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """Write OUT/compare.html and OUT/<plot>.png for `run_dirs`; returns the page's path."""
    if len(run_dirs) < 1:
        raise ValueError("raftlm compare needs at least one run directory")
    runs = [load_run(d) for d in run_dirs]
    labels = [run_label(r) for r in runs]
    figures = build_comparison_figures(runs, labels)
    images = {name: (caption, png_bytes(fig)) for name, (caption, fig) in figures.items()}
    out = Path(out)
    for name, (_, png) in images.items():
        atomic_write_bytes(out / f"{name}.png", png)
    path = out / "compare.html"
    atomic_write_text(path, render_comparison(labels, [r.root for r in runs], images,
                                              final_rows(runs, labels)))
    return path
