"""`raftlm report RUN_DIR`: plots and one self-contained HTML page of what a RAFT run did.

Reads only the run directory (config.yaml, metrics.jsonl, stages/NNN/candidates.jsonl), so it
works on a finished run, on one in progress, and on a copy from another machine. Writes
RUN_DIR/plots/*.png and RUN_DIR/report.html (images inlined as data URIs: one file to share).
The figures themselves are in `raftlm.run.plots`.
"""

from __future__ import annotations

import base64
import html
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from matplotlib.figure import Figure

from raftlm.run.plots import (
    accuracy_figure,
    cost_figure,
    kl_diversity_figure,
    png_bytes,
    reward_distribution_figure,
    reward_figure,
    series,
    term_reward_figure,
    time_figure,
)
from raftlm.run.rundir import RunDir, atomic_write_bytes, atomic_write_text, read_jsonl

TABLE_COLUMNS = [
    "train/reward_mean", "train/reward_selected_mean", "train/n_selected", "train/sft_loss",
    "eval/reward_mean", "eval/accuracy", "eval/sampled_reward_mean", "eval/best_of_k_reward",
    "eval/pass_at_k", "eval/distinct_1", "eval/distinct_2", "eval/kl_to_initial",
    "eval/response_tokens_mean", "sampling/prompts_drawn", "sampling/useful_prompts",
    "sampling/samples", "tokens/generated",
]
HEADLINE = [  # (key, label): held-out numbers first, training reward when there is no eval
    ("eval/accuracy", "held-out accuracy (greedy)"),
    ("eval/reward_mean", "held-out reward (greedy)"),
    ("eval/best_of_k_reward", "held-out best-of-K reward"),
    ("eval/kl_to_initial", "KL to the initial policy"),
    ("eval/distinct_2", "distinct-2 of sampled responses"),
    ("train/reward_mean", "training candidates' mean reward"),
]
# Folder names that say nothing about the run (`raftlm init`'s runs go to TASK/run): the
# report's title takes the folder above them.
GENERIC_NAMES = {"run", "runs", "output", "outputs", "out", "results"}
CHATML_TURN = re.compile(r"<\|im_start\|>(\w+)\n(.*?)(?:<\|im_end\|>|\Z)", re.S)


HELD_OUT_SHOWN = 8  # held-out answers shown on the page


@dataclass
class RunRecords:
    """What a run directory holds, read back."""

    root: Path
    config_text: str
    metrics: list[dict[str, Any]]  # metrics.jsonl: one record per stage, 0 = baseline
    candidates: dict[int, list[dict[str, Any]]]  # stage -> rows of its candidates.jsonl
    held_out: dict[int, list[dict[str, Any]]]  # stage -> rows of its eval.jsonl (answers)


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
        held_out={s: read_jsonl(path) for s in [0, *stages]
                  if (path := run.stage_dir(s) / "eval.jsonl").is_file()},
    )


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
        "cost": ("Held-out score against what was spent on it: tokens sampled for training "
                 "and wall time.", cost_figure(run.metrics)),
    }
    return {name: (caption, fig) for name, (caption, fig) in figures.items() if fig is not None}


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


def response_html(row: dict[str, Any]) -> str:
    """A candidate's response: a multi-turn rollout as a card per turn (the model's turns, each
    tool's result or error, an environment's observation; a prefilled call opening greyed as
    not the model's), else its text."""
    e = html.escape
    if not row.get("turns"):
        return f'<pre class="response">{e(str(row.get("response", "")))}</pre>'
    cards = []
    for turn in row["turns"]:
        role, content = str(turn.get("role", "?")), str(turn.get("content", ""))
        label = role if role == "assistant" else f"{role} {turn.get('name') or ''}".strip()
        if turn.get("error"):
            label += f" (error: {turn['error']})"
        prefilled = str(turn.get("prefilled") or "")
        body = e(content)
        if prefilled and content.startswith(prefilled):
            body = (f'<span class="prefilled" title="prefilled (tool_choice): not the '
                    f'model\'s">{e(prefilled)}</span>{e(content[len(prefilled):])}')
        cards.append(f'<div class="turn {e(role)}"><span class="role">{e(label)}</span>'
                     f'<pre>{body}</pre></div>')
    return f'<div class="turns response">{"".join(cards)}</div>'


def render_html(run: RunRecords, images: dict[str, tuple[str, bytes]]) -> str:
    """The report page; every value is HTML-escaped, every image inlined."""
    e = html.escape
    heads = "".join(f"<li>{e(line)}</li>" for line in headline(run.metrics))
    plots = "".join(
        f'<figure id="plot-{e(name)}"><img alt="{e(name)}" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode()}"><figcaption>{e(caption)}</figcaption></figure>'
        for name, (caption, png) in images.items()
    )
    # A metric a row and a stage a column: a laptop's width holds a dozen stages, while the
    # metrics (19 and more) as columns did not fit and hid behind a scroll bar.
    shown = [c for c in TABLE_COLUMNS if any(c in m for m in run.metrics)] + ["time/total_s"]
    rows = [{**m, "time/total_s": sum(v for k, v in m.items() if k.startswith("time/")
                                      and isinstance(v, (int, float)))} for m in run.metrics]
    stage_columns = ["metric"] + [str(m.get("stage")) for m in run.metrics]
    table = _table("stages", stage_columns, [[c] + [r.get(c) for r in rows] for c in shown])
    every = sorted({k for m in run.metrics for k in m if k != "stage"})
    full = _table("all-metrics", stage_columns,
                  [[k] + [m.get(k) for m in run.metrics] for k in every])
    cards = "".join(
        f'<div class="example {kind.split()[0]}">'
        f'<h4>stage {stage}: {kind} (reward {_fmt(row["reward"])}{_terms(row)}'
        f'{", selected" if row.get("selected") else ""})</h4>'
        f'<pre class="prompt">{e(prompt_as_chat(row))}</pre>{response_html(row)}</div>'
        for stage, kind, row in examples(run.candidates)
    )
    last = max(run.held_out, default=None)
    answers = "" if last is None else _table(
        "held-out", ["prompt", "answer", f"stage {last}'s greedy response", "correct"],
        [[str(r.get("prompt", "")), r.get("answer"), r.get("response"),
          ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in r.get("correct", {}).items())]
         for r in run.held_out[last][:HELD_OUT_SHOWN]])
    title = f"RAFT run: {run_name(run.root)}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>{CSS}</style></head><body>
<h1>{e(title)}</h1>
<p class="subtitle">{e(config_summary(run.config_text))}</p>
<section id="headline"><ul>{heads or "<li>no metrics recorded yet</li>"}</ul></section>
<h2>Plots</h2><section id="plots">{plots or "<p>nothing to plot yet</p>"}</section>
<h2>Metrics per stage</h2>{table}
<details><summary>every metric (metrics.jsonl)</summary>{full}</details>
<h2>Held-out answers (the last evaluation; all in stages/NNN/eval.jsonl)</h2>
<section id="held-out-answers">{answers or "<p>no held-out evaluation recorded</p>"}</section>
<h2>Example responses: best and worst candidate per stage</h2>
<section id="examples">{cards or "<p>no candidates recorded</p>"}</section>
<h2>Config</h2><pre id="config">{e(run.config_text)}</pre>
<p class="footer">{e(str(run.root.resolve()))}</p>
</body></html>
"""


def run_name(root: Path) -> str:
    """The run's name for the title: its folder's, or the task folder's above a generic one
    (`mytask/run` is "mytask", not "run")."""
    path = root.resolve()
    if path.name.lower() in GENERIC_NAMES and path.parent.name:
        return path.parent.name
    return path.name


def config_summary(config_text: str) -> str:
    """'model ... · data ... · objective ... · N stages' from the run's config, what it is."""
    try:
        config = yaml.safe_load(config_text) or {}
    except yaml.YAMLError:
        return ""
    if not isinstance(config, dict):
        return ""

    def get(section: str, key: str) -> Any:
        value = config.get(section)
        return value.get(key) if isinstance(value, dict) else None

    parts = [("model", get("model", "path")),
             ("data", get("data", "task") or get("data", "train_file") or get("data", "dataset")),
             ("objective", get("training", "objective")), ("stages", get("raft", "stages"))]
    return " \u00b7 ".join(f"{name} {value}" for name, value in parts if value is not None)


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
.turn { border: 1px solid #ddd; border-radius: 4px; margin: 0.3em 0; padding: 0.2em 0.6em; }
.turn.tool, .turn.user { background: #f6f6f6; margin-left: 2em; }
.turn .role { font-size: 0.8em; color: #666; } .prefilled { color: #999; }
.scroll { overflow-x: auto; }
th:first-child, td:first-child { position: sticky; left: 0; background: #fff; }
th:first-child { background: #f0f0f0; text-align: left; }
.subtitle { color: #555; margin-top: -0.6em; }
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
