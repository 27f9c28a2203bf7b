"""`raftlm compare RUN_DIR RUN_DIR ...`: several runs overlaid on one self-contained page.

Reads only the run directories (metrics.jsonl, config.yaml), like `raftlm report`. Runs whose
configs differ only in `run.*` (the seed, the folder) and `tracking.*` form one group (or the
runs sharing a `--label`); each figure draws a group's mean over its runs with a min-max band.
Writes OUT/compare.html (images inlined as data URIs), OUT/*.png and OUT/summary.md: held-out
accuracy (or reward) per stage, per second of wall time and per generated token, reward
against KL to the initial policy, token entropy of the sampled responses, and a table of each
group's final numbers as mean ± std over its runs.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from raftlm.errors import InvalidInput
from raftlm.run.plots import generated_tokens, legend_beside, png_bytes, series, wall_seconds
from raftlm.run.report import RunRecords, load_run
from raftlm.run.rundir import atomic_write_bytes, atomic_write_text

# (metrics key, column title, how a run's value is read): "final" = the last record holding
# the key, "total" = the sum over the run's stages (a count, printed as an integer).
SUMMARY_COLUMNS = [
    ("eval/accuracy", "held-out accuracy", "final"),
    ("eval/reward_mean", "held-out reward", "final"),
    ("eval/sampled_accuracy", "sampled accuracy", "final"),
    ("eval/kl_to_initial", "KL to pi_0", "final"),
    ("train/entropy", "entropy", "final"),
    ("eval/distinct_2", "distinct-2", "final"),
    ("train/clip_fraction", "clip fraction", "final"),
    ("train/groups_dropped", "groups dropped", "total"),
    ("tokens/generated", "tokens generated", "total"),
    ("tokens/trained", "tokens trained", "total"),
]
IGNORED_SECTIONS = ("run", "tracking")  # what may differ within a group


@dataclass
class RunGroup:
    """Runs of one configuration (seeds apart), drawn as one mean line with a band."""

    label: str
    runs: list[RunRecords]

    @property
    def legend(self) -> str:
        return self.label if len(self.runs) == 1 else f"{self.label} (n={len(self.runs)})"


def _config(run: RunRecords) -> dict[str, Any]:
    return yaml.safe_load(run.config_text or "{}") or {}


def run_label(run: RunRecords) -> str:
    """The run's folder name (without a trailing seed such as -s1 or _seed2), with its
    objective when the name does not already say it."""
    objective = _config(run).get("training", {}).get("objective", "sft")
    name = re.sub(r"[-_.](s|seed)?\d+$", "", run.root.resolve().name) or run.root.name
    return name if objective in name else f"{name} ({objective})"


def group_runs(runs: Sequence[RunRecords], labels: Sequence[str] | None = None
               ) -> list[RunGroup]:
    """Groups in order of first appearance: runs sharing a label, or without labels, runs
    whose configs are equal outside `run.*` and `tracking.*`."""
    if labels is not None and len(labels) != len(runs):
        raise InvalidInput(f"raftlm compare: {len(labels)} --label values for {len(runs)} run "
                           "directories; give one per run (runs sharing a label form a group)")
    groups: dict[str, RunGroup] = {}
    for i, run in enumerate(runs):
        if labels is not None:
            key, label = labels[i], labels[i]
        else:
            rest = {k: v for k, v in _config(run).items() if k not in IGNORED_SECTIONS}
            key, label = yaml.safe_dump(rest, sort_keys=True), run_label(run)
        groups.setdefault(key, RunGroup(label, [])).runs.append(run)
    out = list(groups.values())
    seen: dict[str, int] = {}
    for group in out:  # two configurations with one folder name: tell them apart
        seen[group.label] = seen.get(group.label, 0) + 1
        if seen[group.label] > 1:
            group.label = f"{group.label} #{seen[group.label]}"
    return out


def score_key(runs: Sequence[RunRecords]) -> tuple[str, str]:
    """Accuracy when every run has it, else the held-out greedy reward."""
    if all(series(r.metrics, "eval/accuracy")[0] for r in runs):
        return "eval/accuracy", "held-out accuracy (greedy)"
    return "eval/reward_mean", "held-out reward (greedy)"


XAxis = Callable[[list[dict[str, Any]]], list[float]]


def band(group: RunGroup, key: str, x: XAxis | None = None
         ) -> tuple[list[float], list[float], list[float], list[float]]:
    """(x, mean, min, max) of `key` over the group's runs at every stage where each run holds
    it; x is the stage, or the mean over the runs of `x(metrics)` at that stage."""
    per_run = []
    for run in group.runs:
        xs = x(run.metrics) if x else [float(m["stage"]) for m in run.metrics]
        per_run.append({m["stage"]: (xs[i], float(m[key])) for i, m in enumerate(run.metrics)
                        if isinstance(m.get(key), (int, float))})
    stages = sorted(set.intersection(*(set(points) for points in per_run))) if per_run else []
    xs = [float(np.mean([p[s][0] for p in per_run])) for s in stages]
    values = [np.array([p[s][1] for p in per_run]) for s in stages]
    return (xs, [float(v.mean()) for v in values], [float(v.min()) for v in values],
            [float(v.max()) for v in values])


def _figure(title: str, xlabel: str, ylabel: str) -> tuple[Figure, Any]:
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _band_figure(groups: Sequence[RunGroup], key: str, title: str, xlabel: str, ylabel: str,
                 x: XAxis | None = None) -> Figure | None:
    """Each group's mean line, its min-max band shaded; None when no group has the key."""
    fig, ax = _figure(title, xlabel, ylabel)
    if x is None:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    drawn = False
    for group in groups:
        xs, mean, low, high = band(group, key, x)
        if not xs:
            continue
        (line,) = ax.plot(xs, mean, marker="o", label=group.legend)
        if len(group.runs) > 1:
            ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        drawn = True
    if drawn:
        legend_beside(ax)
    return fig if drawn else None


def reward_vs_kl_figure(groups: Sequence[RunGroup]) -> Figure | None:
    """Mean held-out reward against mean KL to pi_0 per stage, one line per group."""
    fig, ax = _figure("held-out reward against KL to the initial policy",
                      "KL(pi_t || pi_0) (sampled held-out responses)", "held-out reward (greedy)")
    drawn = False
    for group in groups:
        kl_stages, kl, _, _ = band(group, "eval/kl_to_initial")
        reward_stages, reward, _, _ = band(group, "eval/reward_mean")
        by_stage = dict(zip(reward_stages, reward))
        points = [(k, by_stage[s]) for s, k in zip(kl_stages, kl) if s in by_stage]
        if points:
            ax.plot([k for k, _ in points], [r for _, r in points], marker="o",
                    label=group.legend)
            drawn = True
    if drawn:
        legend_beside(ax)
    return fig if drawn else None


def build_comparison_figures(groups: Sequence[RunGroup]) -> dict[str, tuple[str, Figure]]:
    """name -> (caption, figure); figures without data in any group are left out."""
    runs = [run for group in groups for run in group.runs]
    key, name = score_key(runs)
    spread = " Lines: the mean over a group's runs; shaded: their min-max."
    candidates = {
        "score_per_stage": (
            "Held-out score after each stage (stage 0: the initial policy)." + spread,
            _band_figure(groups, key, f"{name} per stage", "stage", name)),
        "score_per_second": (
            "The same against cumulative wall time (generation, reward, training and "
            "evaluation).", _band_figure(groups, key, f"{name} per wall-clock second",
                                         "wall time (s, cumulative)", name, wall_seconds)),
        "score_per_token": (
            "The same against the cumulative number of tokens sampled for training "
            "(tokens/generated): the sample cost.", _band_figure(
                groups, key, f"{name} per generated token", "generated tokens (cumulative)",
                name, generated_tokens)),
        "reward_vs_kl": ("What each group paid in KL to the initial policy for its reward.",
                         reward_vs_kl_figure(groups)),
        "entropy": ("Token entropy of each stage's sampled responses (-mean of the recorded "
                    "sampling log-probs)." + spread,
                    _band_figure(groups, "train/entropy", "token entropy of the sampled "
                                 "training responses", "stage",
                                 "-mean log pi_old (nats/token)")),
    }
    return {name: (caption, fig) for name, (caption, fig) in candidates.items()
            if fig is not None}


def _run_value(run: RunRecords, key: str, how: str) -> float | None:
    values = series(run.metrics, key)[1]
    if not values:
        return None
    return float(sum(values)) if how == "total" else values[-1]


def summary_rows(groups: Sequence[RunGroup]) -> list[dict[str, Any]]:
    """One row per group: label, runs, stages, and (mean, std) over its runs of every
    SUMMARY_COLUMNS value and of the wall time (None where no run has the key)."""
    rows = []
    for group in groups:
        row: dict[str, Any] = {
            "label": group.label, "runs": len(group.runs),
            "stages": max((m["stage"] for r in group.runs for m in r.metrics), default=0)}
        for key, _, how in SUMMARY_COLUMNS:
            row[key] = _mean_std([_run_value(r, key, how) for r in group.runs])
        row["wall_s"] = _mean_std([wall_seconds(r.metrics)[-1] if r.metrics else None
                                   for r in group.runs])
        rows.append(row)
    return rows


def _mean_std(values: list[float | None]) -> tuple[float, float | None] | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    std = float(np.std(present, ddof=1)) if len(present) > 1 else None
    return float(np.mean(present)), std


def summary_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Column titles and formatted cells: mean ± std (sample std over the group's runs),
    counts as integers, columns no group has left out."""
    columns = [(key, title, how) for key, title, how in SUMMARY_COLUMNS
               if any(row[key] is not None for row in rows)]
    titles = ["group", "runs", "stages"] + [t for _, t, _ in columns] + ["wall time (s)"]
    cells = []
    for row in rows:
        line = [row["label"], str(row["runs"]), str(row["stages"])]
        line += [_fmt(row[key], integer=how == "total") for key, _, how in columns]
        line.append(_fmt(row["wall_s"], integer=True))
        cells.append(line)
    return titles, cells


def _fmt(value: tuple[float, float | None] | None, integer: bool = False) -> str:
    if value is None:
        return "\u2013"
    mean, std = value
    one = (lambda v: f"{v:.0f}") if integer else (lambda v: f"{v:.3f}")
    return one(mean) if std is None else f"{one(mean)} \u00b1 {one(std)}"


def markdown_table(titles: list[str], cells: list[list[str]]) -> str:
    """The summary as a Markdown table (for docs)."""
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    return "\n".join(lines + ["| " + " | ".join(line) + " |" for line in cells]) + "\n"


def render_comparison(groups: Sequence[RunGroup], images: dict[str, tuple[str, bytes]],
                      titles: list[str], cells: list[list[str]]) -> str:
    """The comparison page; every value is HTML-escaped, every image inlined."""
    e = html.escape
    plots = "".join(
        f'<figure id="plot-{e(name)}"><img alt="{e(name)}" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode()}"><figcaption>{e(caption)}</figcaption></figure>'
        for name, (caption, png) in images.items()
    )
    head = "".join(f"<th>{e(c)}</th>" for c in titles)
    body = "".join("<tr>" + "".join(f"<td>{e(v)}</td>" for v in line) + "</tr>"
                   for line in cells)
    sources = "".join(f"<li>{e(g.label)}: " + ", ".join(e(str(r.root)) for r in g.runs)
                      + "</li>" for g in groups)
    n_runs = sum(len(g.runs) for g in groups)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>raftlm compare</title>
<style>{CSS}</style></head><body>
<h1>raftlm compare: {n_runs} runs in {len(groups)} groups</h1>
<h2>Final numbers (mean ± std over a group's runs)</h2>
<table id="final"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<h2>Plots</h2><section id="plots">{plots}</section>
<h2>Runs</h2><ul id="runs">{sources}</ul>
</body></html>
"""


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px; color: #222; }
#plots { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #555; max-width: 640px; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
th { background: #f0f0f0; } td:first-child { text-align: left; }
"""


def write_comparison(run_dirs: Sequence[str | Path], out: str | Path,
                     labels: Sequence[str] | None = None) -> Path:
    """Write OUT/compare.html, OUT/<plot>.png and OUT/summary.md for `run_dirs` (grouped by
    `labels`, one per run, or by configuration); returns the page's path."""
    if len(run_dirs) < 1:
        raise InvalidInput("raftlm compare needs at least one run directory")
    groups = group_runs([load_run(d) for d in run_dirs], labels)
    figures = build_comparison_figures(groups)
    images = {name: (caption, png_bytes(fig)) for name, (caption, fig) in figures.items()}
    out = Path(out)
    for name, (_, png) in images.items():
        atomic_write_bytes(out / f"{name}.png", png)
    titles, cells = summary_table(summary_rows(groups))
    atomic_write_text(out / "summary.md", markdown_table(titles, cells))
    path = out / "compare.html"
    atomic_write_text(path, render_comparison(groups, images, titles, cells))
    return path
