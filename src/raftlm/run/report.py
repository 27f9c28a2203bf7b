"""`raftlm report RUN_DIR`: plots and one self-contained HTML page of what a RAFT run did.

Reads only the run directory (config.yaml, metrics.jsonl, stages/NNN/candidates.jsonl), so it
works on a finished run, on one in progress, and on a copy from another machine. Writes
RUN_DIR/plots/*.png and RUN_DIR/report.html (images inlined as data URIs: one file to share).
Figures use matplotlib's object API (no pyplot): no global state, no display, and each
`*_figure` function returns its Figure so tests can inspect the plotted data.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, MaxNLocator

from raftlm.run.rundir import RunDir, atomic_write_bytes, atomic_write_text, read_jsonl

TABLE_COLUMNS = [
    "train/reward_mean", "train/reward_selected_mean", "train/n_selected", "train/sft_loss",
    "eval/reward_mean", "eval/accuracy", "eval/sampled_reward_mean", "eval/best_of_k_reward",
    "eval/pass_at_k", "eval/distinct_1", "eval/distinct_2", "eval/kl_to_initial",
    "eval/response_tokens_mean",
]
HEADLINE = [  # (key, label): held-out numbers first, training reward when there is no eval
    ("eval/accuracy", "held-out accuracy (greedy)"),
    ("eval/reward_mean", "held-out reward (greedy)"),
    ("eval/best_of_k_reward", "held-out best-of-K reward"),
    ("eval/kl_to_initial", "KL to the initial policy"),
    ("eval/distinct_2", "distinct-2 of sampled responses"),
    ("train/reward_mean", "training candidates' mean reward"),
]
PHASES = ["generate", "reward", "train", "eval"]
CHATML_TURN = re.compile(r"<\|im_start\|>(\w+)\n(.*?)(?:<\|im_end\|>|\Z)", re.S)


@dataclass
class RunRecords:
    """What a run directory holds, read back."""

    root: Path
    config_text: str
    metrics: list[dict[str, Any]]  # metrics.jsonl: one record per stage, 0 = baseline
    candidates: dict[int, list[dict[str, Any]]]  # stage -> rows of its candidates.jsonl


def load_run(run_dir: str | Path) -> RunRecords:
    run = RunDir(run_dir)
    if not run.metrics_path.is_file():
        raise FileNotFoundError(f"{run.root}: no metrics.jsonl (is this a raftlm run directory?)")
    metrics = run.read_metrics()
    stages = sorted({m["stage"] for m in metrics if m.get("stage", 0) > 0})
    return RunRecords(
        root=run.root,
        config_text=run.config_path.read_text() if run.config_path.is_file() else "",
        metrics=metrics,
        candidates={s: read_jsonl(run.candidates_path(s)) for s in stages},
    )


def series(metrics: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(stages, values) of `key` over the records that hold a number for it."""
    points = [(m["stage"], m[key]) for m in metrics if isinstance(m.get(key), (int, float))]
    return [s for s, _ in points], [float(v) for _, v in points]


# Figures ---------------------------------------------------------------------------------------

def _line_figure(metrics: list[dict[str, Any]], lines: list[tuple[str, str]], title: str,
                 ylabel: str) -> Figure | None:
    """One line per (key, label) with data; None when no key has any."""
    present = [(key, label) for key, label in lines if series(metrics, key)[0]]
    if not present:
        return None
    fig = Figure(figsize=(5.8, 3.5), layout="constrained")
    ax = fig.add_subplot()
    for key, label in present:
        ax.plot(*series(metrics, key), marker="o", label=label)
    _stage_axis(ax, title, ylabel)
    return fig


def reward_figure(metrics: list[dict[str, Any]]) -> Figure | None:
    """Mean reward per stage: training candidates, the selected ones, and held-out."""
    return _line_figure(metrics, [
        ("train/reward_mean", "train: all candidates"),
        ("train/reward_selected_mean", "train: selected"),
        ("eval/reward_mean", "held-out: greedy"),
        ("eval/sampled_reward_mean", "held-out: sampled"),
        ("eval/best_of_k_reward", "held-out: best of K"),
    ], "Reward per stage", "mean reward")


def term_names(metrics: list[dict[str, Any]]) -> list[str]:
    """The reward terms a run recorded `reward/<term>/mean` for, in first-seen order."""
    names: dict[str, None] = {}
    for m in metrics:
        for key in m:
            if key.startswith("reward/") and key.endswith("/mean") and len(key) > 12:
                names[key[len("reward/"):-len("/mean")]] = None
    return list(names)


def term_reward_figure(metrics: list[dict[str, Any]]) -> Figure | None:
    """Each reward term's mean over the stage's candidates (its own scale, before weights)."""
    return _line_figure(metrics, [(f"reward/{name}/mean", name) for name in term_names(metrics)],
                        "Reward terms per stage", "mean of the term")


def accuracy_figure(metrics: list[dict[str, Any]]) -> Figure | None:
    """Held-out accuracy per stage (only for prompts with reference answers)."""
    return _line_figure(metrics, [
        ("eval/accuracy", "greedy"),
        ("eval/sampled_accuracy", "sampled (pass@1)"),
        ("eval/pass_at_k", "pass@K"),
    ], "Held-out accuracy per stage", "accuracy")


def reward_distribution_figure(candidates: dict[int, list[dict[str, Any]]]) -> Figure | None:
    """Box plots per stage of all candidates' rewards next to the selected ones'."""
    stages = [s for s, rows in sorted(candidates.items()) if _rewards(rows)]
    if not stages:
        return None
    fig = Figure(figsize=(5.8, 3.5), layout="constrained")
    ax = fig.add_subplot()
    for offset, selected, color, label in [(-0.18, False, "#9e9e9e", "all candidates"),
                                           (0.18, True, "#1f77b4", "selected")]:
        data = [_rewards(candidates[s], selected) for s in stages]
        kept = [(s, d) for s, d in zip(stages, data) if d]
        if not kept:
            continue
        boxes = ax.boxplot([d for _, d in kept], positions=[s + offset for s, _ in kept],
                           widths=0.3, patch_artist=True, manage_ticks=False)
        for box in boxes["boxes"]:
            box.set(facecolor=color, alpha=0.7)
        boxes["boxes"][0].set_label(label)
    ax.set_xticks(stages)
    _stage_axis(ax, "Reward distribution of training candidates", "reward")
    return fig


def kl_diversity_figure(metrics: list[dict[str, Any]]) -> Figure | None:
    """What alignment cost: KL to the initial policy, diversity and response length."""
    panels = [
        ("KL(pi_t || pi_0)", [("eval/kl_to_initial", "sampled responses")]),
        ("Diversity", [("eval/distinct_1", "distinct-1"), ("eval/distinct_2", "distinct-2")]),
        ("Response length", [("eval/sampled_tokens_mean", "sampled"),
                             ("eval/response_tokens_mean", "greedy")]),
    ]
    panels = [(t, [(k, lab) for k, lab in lines if series(metrics, k)[0]]) for t, lines in panels]
    panels = [(t, lines) for t, lines in panels if lines]
    if not panels:
        return None
    fig = Figure(figsize=(3.9 * len(panels), 3.4), layout="constrained")
    for i, (title, lines) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for key, label in lines:
            ax.plot(*series(metrics, key), marker="o", label=label)
        _stage_axis(ax, title, {"Response length": "tokens"}.get(title, ""))
    return fig


def time_figure(metrics: list[dict[str, Any]]) -> Figure | None:
    """Wall time per stage, stacked by phase (time/<phase>_s)."""
    phases = PHASES + sorted({k[5:-2] for m in metrics for k in m
                              if k.startswith("time/") and k[5:-2] not in PHASES})
    stages = [m["stage"] for m in metrics]
    columns = [(p, [float(m.get(f"time/{p}_s") or 0.0) for m in metrics]) for p in phases]
    columns = [(p, v) for p, v in columns if any(v)]
    if not columns:
        return None
    fig = Figure(figsize=(5.8, 3.5), layout="constrained")
    ax = fig.add_subplot()
    bottom = [0.0] * len(stages)
    for phase, values in columns:
        ax.bar(stages, values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xticks(stages)
    _stage_axis(ax, "Time per stage", "seconds")
    return fig


def build_figures(run: RunRecords) -> dict[str, tuple[str, Figure]]:
    """name -> (caption, figure) for every plot the run has data for."""
    figures = {
        "reward": ("Mean reward per stage (stage 0 = before training).",
                   reward_figure(run.metrics)),
        "reward_terms": ("What each reward term scored: its mean over the stage's training "
                         "candidates, unweighted.", term_reward_figure(run.metrics)),
        "accuracy": ("Held-out accuracy against the reference answers.",
                     accuracy_figure(run.metrics)),
        "reward_distribution": ("Rewards of all sampled training candidates (grey) and of "
                                "those selected for fine-tuning (blue).",
                                reward_distribution_figure(run.candidates)),
        "kl_diversity": ("The cost: drift from the initial policy, diversity of sampled "
                         "responses (collapsing diversity is a sign of reward hacking) and "
                         "response length.", kl_diversity_figure(run.metrics)),
        "time": ("Where the time went.", time_figure(run.metrics)),
    }
    return {name: (caption, fig) for name, (caption, fig) in figures.items() if fig is not None}


def _stage_axis(ax: Any, title: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("stage")
    ax.set_ylabel(ylabel)
    if not isinstance(ax.xaxis.get_major_locator(), FixedLocator):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # stages are whole numbers
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def _rewards(rows: list[dict[str, Any]], selected_only: bool = False) -> list[float]:
    return [r["reward"] for r in rows
            if r.get("reward") is not None and (r.get("selected") or not selected_only)]


def png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


# The page --------------------------------------------------------------------------------------

def headline(metrics: list[dict[str, Any]]) -> list[str]:
    """'label: first -> last (stage a -> b)' for the run's most telling numbers."""
    lines = []
    for key, label in HEADLINE:
        stages, values = series(metrics, key)
        if key.startswith("train/") and lines:
            continue  # held-out numbers already tell the story
        if len(stages) >= 2:
            lines.append(f"{label}: {values[0]:.3f} \u2192 {values[-1]:.3f} "
                         f"(stage {stages[0]} \u2192 {stages[-1]})")
        elif stages:
            lines.append(f"{label}: {values[0]:.3f} (stage {stages[0]})")
    _, diversity = series(metrics, "eval/distinct_2")
    if len(diversity) >= 2 and diversity[-1] < 0.67 * diversity[0]:
        lines.append("warning: distinct-2 fell by more than a third; read the example responses "
                     "for signs of reward hacking (repeated, degenerate answers)")
    return lines


def examples(candidates: dict[int, list[dict[str, Any]]]) -> list[tuple[int, str, dict]]:
    """(stage, 'best' | 'worst' | 'all tied', candidate) per stage, by reward."""
    chosen = []
    for stage, rows in sorted(candidates.items()):
        scored = [r for r in rows if r.get("reward") is not None]
        if not scored:
            continue
        best = max(scored, key=lambda r: r["reward"])
        worst = min(scored, key=lambda r: r["reward"])
        if best["reward"] == worst["reward"]:
            chosen.append((stage, "all tied", best))
        else:
            chosen += [(stage, "best", best), (stage, "worst", worst)]
    return chosen


def prompt_as_chat(row: dict[str, Any]) -> str:
    """A candidate's prompt as the chat it is (``user: What is 12 + 30?``), not the template.

    Reads the rendered ChatML turns of ``prompt`` (system prompts included); for other chat
    templates, the ``original_prompt`` (text or messages) the loop records; else the raw text.
    """
    text = str(row.get("prompt", ""))
    turns = [(role, content.strip()) for role, content in CHATML_TURN.findall(text)]
    turns = [(role, content) for role, content in turns if content]  # the generation prompt
    original = row.get("original_prompt")
    if not turns and isinstance(original, str) and original != text:  # another template
        turns = [("user", original)]
    elif not turns and isinstance(original, list):
        turns = [(m.get("role", "?"), m.get("content", "")) for m in original
                 if isinstance(m, dict)]
    return "\n".join(f"{role}: {content}" for role, content in turns) if turns else text


def render_html(run: RunRecords, images: dict[str, tuple[str, bytes]]) -> str:
    """The report page; every value is HTML-escaped, every image inlined."""
    e = html.escape
    heads = "".join(f"<li>{e(line)}</li>" for line in headline(run.metrics))
    plots = "".join(
        f'<figure id="plot-{e(name)}"><img alt="{e(name)}" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode()}"><figcaption>{e(caption)}</figcaption></figure>'
        for name, (caption, png) in images.items()
    )
    columns = ["stage"] + [c for c in TABLE_COLUMNS if any(c in m for m in run.metrics)]
    columns.append("time/total_s")
    rows = [{**m, "time/total_s": sum(v for k, v in m.items() if k.startswith("time/")
                                      and isinstance(v, (int, float)))} for m in run.metrics]
    table = _table("stages", columns, [[r.get(c) for c in columns] for r in rows])
    every = sorted({k for m in run.metrics for k in m if k != "stage"})
    full = _table("all-metrics", ["metric"] + [str(m["stage"]) for m in run.metrics],
                  [[k] + [m.get(k) for m in run.metrics] for k in every])
    cards = "".join(
        f'<div class="example {kind.split()[0]}">'
        f'<h4>stage {stage}: {kind} (reward {_fmt(row["reward"])}{_terms(row)}'
        f'{", selected" if row.get("selected") else ""})</h4>'
        f'<pre class="prompt">{e(prompt_as_chat(row))}</pre>'
        f'<pre class="response">{e(str(row.get("response", "")))}</pre></div>'
        for stage, kind, row in examples(run.candidates)
    )
    title = f"RAFT run: {run.root.resolve().name}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>{CSS}</style></head><body>
<h1>{e(title)}</h1>
<section id="headline"><ul>{heads or "<li>no metrics recorded yet</li>"}</ul></section>
<h2>Plots</h2><section id="plots">{plots or "<p>nothing to plot yet</p>"}</section>
<h2>Metrics per stage</h2>{table}
<details><summary>every metric (metrics.jsonl)</summary>{full}</details>
<h2>Example responses: best and worst candidate per stage</h2>
<section id="examples">{cards or "<p>no candidates recorded</p>"}</section>
<h2>Config</h2><pre id="config">{e(run.config_text)}</pre>
<p class="footer">{e(str(run.root.resolve()))}</p>
</body></html>
"""


def _terms(row: dict[str, Any]) -> str:
    """`; numeric_answer 1.000, judge 0.700` from a candidate's per-term rewards, if recorded."""
    terms = row.get("rewards")
    if not isinstance(terms, dict) or len(terms) < 2:
        return ""  # one term: the reward says it all
    return "; " + ", ".join(f"{html.escape(str(k))} {_fmt(v)}" for k, v in terms.items())


def _table(table_id: str, columns: list[str], rows: list[list[Any]]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{e(_fmt(v))}</td>" for v in row) + "</tr>"
                   for row in rows)
    return (f'<div class="scroll"><table id="{table_id}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def _fmt(value: Any) -> str:
    if value is None:
        return "\u2013"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1e5 else f"{value:.3g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
#headline ul { font-size: 1.2em; background: #f3f7fb; padding: 0.8em 2em; border-radius: 6px; }
#plots { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #555; max-width: 640px; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #f0f0f0; } td:first-child { text-align: left; }
.example { border-left: 4px solid #2ca02c; padding-left: 0.8em; margin: 0.8em 0; }
.example.worst { border-color: #d62728; } .example.all { border-color: #888; }
.scroll { overflow-x: auto; }
pre { white-space: pre-wrap; background: #fafafa; padding: 0.4em; margin: 0.2em 0; }
.footer { color: #888; font-size: 0.8em; }
"""


def write_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/plots/*.png and RUN_DIR/report.html; returns the report's path."""
    run = load_run(run_dir)
    images = {name: (caption, png_bytes(fig))
              for name, (caption, fig) in build_figures(run).items()}
    for name, (_, png) in images.items():
        atomic_write_bytes(run.root / "plots" / f"{name}.png", png)
    path = run.root / "report.html"
    atomic_write_text(path, render_html(run, images))
    return path
