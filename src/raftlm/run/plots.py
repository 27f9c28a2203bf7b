"""The figures of `raftlm report` and `raftlm compare`, and the series they plot.

Figures use matplotlib's object API (no pyplot): no global state, no display, and each
`*_figure` function returns its Figure so tests can inspect the plotted data. Each takes a run's
metrics.jsonl records (or its candidates) and returns None when the run has no data for it.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, MaxNLocator

PHASES = ["generate", "reward", "train", "eval"]

def series(metrics: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(stages, values) of `key` over the records that hold a number for it."""
    points = [(m["stage"], m[key]) for m in metrics if isinstance(m.get(key), (int, float))]
    return [s for s, _ in points], [float(v) for _, v in points]


def cumulative(metrics: list[dict[str, Any]], keys: Callable[[str], bool]) -> list[float]:
    """Running total, at the end of each record, of the numeric values whose key `keys` takes."""
    total, out = 0.0, []
    for record in metrics:
        total += sum(v for k, v in record.items() if keys(k) and isinstance(v, (int, float)))
        out.append(total)
    return out


def wall_seconds(metrics: list[dict[str, Any]]) -> list[float]:
    """Cumulative wall time at the end of each record (the sum of its time/* phases)."""
    return cumulative(metrics, lambda k: k.startswith("time/"))


def generated_tokens(metrics: list[dict[str, Any]]) -> list[float]:
    """Cumulative tokens sampled for training (`tokens/generated`) at the end of each record."""
    return cumulative(metrics, lambda k: k == "tokens/generated")


# Figures ---------------------------------------------------------------------------------------

# A marker and dash pattern per line of a figure: two series with equal values (held-out
# sampled reward and best-of-K often are) would otherwise draw one over the other and leave a
# legend entry with no line to be seen.
LINE_STYLES = [("o", "-", 6), ("s", "--", 5), ("^", "-.", 5), ("D", ":", 4), ("v", "--", 4)]


def _line_figure(metrics: list[dict[str, Any]], lines: list[tuple[str, str]], title: str,
                 ylabel: str) -> Figure | None:
    """One line per (key, label) with data; None when no key has any."""
    present = [(key, label) for key, label in lines if series(metrics, key)[0]]
    if not present:
        return None
    fig = Figure(figsize=(5.8, 3.5), layout="constrained")
    ax = fig.add_subplot()
    for (key, label), (marker, dashes, size) in zip(present, _styles(len(present))):
        ax.plot(*series(metrics, key), marker=marker, linestyle=dashes, markersize=size,
                label=label)
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
        for (key, label), (marker, dashes, size) in zip(lines, _styles(len(lines))):
            ax.plot(*series(metrics, key), marker=marker, linestyle=dashes, markersize=size,
                    label=label)
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


def cost_figure(metrics: list[dict[str, Any]]) -> Figure | None:
    """Held-out accuracy (or greedy reward) against cumulative generated tokens and seconds:
    what the run paid for it, the axes on which collectors (`raft.collector`) are judged."""
    key = "eval/accuracy" if series(metrics, "eval/accuracy")[0] else "eval/reward_mean"
    held = [i for i, m in enumerate(metrics) if isinstance(m.get(key), (int, float))]
    if len(held) < 2:
        return None
    fig = Figure(figsize=(7.8, 3.4), layout="constrained")
    for n, (axis, label) in enumerate([(generated_tokens, "generated tokens (cumulative)"),
                                       (wall_seconds, "seconds (cumulative)")]):
        ax, xs = fig.add_subplot(1, 2, n + 1), axis(metrics)
        ax.plot([xs[i] for i in held], [metrics[i][key] for i in held], marker="o")
        ax.set_xlabel(label)
        ax.set_ylabel(key.replace("eval/", "held-out "))
        ax.grid(alpha=0.3)
    return fig


def _stage_axis(ax: Any, title: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("stage")
    ax.set_ylabel(ylabel)
    if not isinstance(ax.xaxis.get_major_locator(), FixedLocator):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # stages are whole numbers
    ax.grid(alpha=0.3)
    legend_beside(ax)


def legend_beside(ax: Any) -> None:
    """The axes' legend to the right of the plot, never over a line or bar ("best" placement
    still covers data where every corner holds some). Constrained layout makes room."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1),
                  borderaxespad=0)


def _styles(count: int) -> list[tuple[str, str, int]]:
    return [LINE_STYLES[i % len(LINE_STYLES)] for i in range(count)]


def _rewards(rows: list[dict[str, Any]], selected_only: bool = False) -> list[float]:
    return [r["reward"] for r in rows
            if r.get("reward") is not None and (r.get("selected") or not selected_only)]


def png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")  # the legend beside, whole
    return buffer.getvalue()
