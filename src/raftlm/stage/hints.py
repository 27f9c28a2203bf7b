"""`raft.hints`: STaR's rationalization (Zelikman et al. 2022, "STaR: Bootstrapping Reasoning
With Reasoning"), docs/teaching.md.

After the collector's rounds, each prompt none of whose samples is accepted (eligible, with a
reward of at least `raft.hints.accept_reward`, else `selection.min_reward`: what gvm calls
accepted) is sampled `raft.hints.samples` more times from a hinted prompt: the template filled
with the prompt and its row's reference answer. A hinted response is

- kept when it is accepted and does not quote the hint (`quotes_hint`): it joins the prompt's
  row after the prompt's own samples and is trained on as a response to the ORIGINAL prompt
  (the prompt's token ids, the response's own sampled ids: never re-tokenized);
- quoted when it is accepted but quotes the hint, wrong when it is not accepted: both stay in
  the row and in candidates.jsonl, with no reward, so Rank never selects or compares them.

Every hinted response is flagged (`Rollout.hint`, `hint` in candidates.jsonl) and carries no
log-probs (they were the policy's under the hinted prompt, not under the one it is trained on):
ratio objectives take its pi_old from the policy before the stage's update, as for any sample
without recorded log-probs. The hinted samples continue each prompt's sample indices and go
through the stage's Collect, so they are seeded, journaled and reused on resume like the rest.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from raftlm.config import ConfigError, RaftConfig
from raftlm.config.teaching import HintsConfig, active_hints
from raftlm.data.prompts import PromptRecord, PromptSet, render_chat
from raftlm.stage.collect import Collect, StageRun
from raftlm.stage.rank import ranked_view, useful_prompts
from raftlm.stage.rollouts import Rollouts


def with_hints(run: StageRun, rollouts: Rollouts, collect: Collect
               ) -> tuple[Rollouts, dict[str, Any]]:
    """The stage's rollouts with the hinted samples of its unsolved prompts in their rows, and
    the `sampling/hinted_*` numbers."""
    config, hints = run.config, active_hints(run.config)
    threshold = accept_threshold(config)
    unsolved = [p for p, row in enumerate(_accepted(rollouts, config, threshold))
                if not row.any()]
    n = hints.samples or config.raft.samples_per_prompt
    prompts = [rollouts.prompts[p] for p in unsolved]
    own = [len(rollouts.responses[p]) for p in unsolved]
    stats = {"sampling/hinted_prompts": len(unsolved), "sampling/hinted_samples": n * len(own),
             "sampling/hinted_kept": 0, "sampling/hinted_quoted": 0,
             "sampling/hinted_solved_prompts": 0, "sampling/hinted_tokens": 0}
    if not unsolved:
        return rollouts, stats
    part = collect(prompts, [m + n for m in own], shown=[
        hinted_prompt(r, hints, run.tokenizer, config.data.system_prompt) for r in prompts])
    accepted = _accepted(part, config, threshold)
    responses, rewards = list(rollouts.responses), part.rewards.copy()
    for q, p in enumerate(unsolved):
        hint = hint_text(hints, prompts[q])
        row = []
        for j, response in enumerate(part.responses[q][own[q]:], start=own[q]):
            quoted = quotes_hint(response.text, hint, hints.quote_markers)
            outcome = "wrong" if not accepted[q, j] else "quoted" if quoted else "kept"
            row.append(dataclasses.replace(response, hint=outcome, token_log_probs=None))
            if outcome != "kept":
                rewards[q, j] = np.nan
            if outcome != "wrong":  # the rest: samples - kept - quoted
                stats[f"sampling/hinted_{outcome}"] += 1
            stats["sampling/hinted_tokens"] += len(response.token_ids)
        stats["sampling/hinted_solved_prompts"] += any(r.hint == "kept" for r in row)
        responses[p] = rollouts.responses[p] + row
    merged = Rollouts(rollouts.prompts, responses, _rows_replaced(rollouts.rewards, unsolved,
                                                                  rewards),
                      {name: _rows_replaced(rollouts.per_term.get(name), unsolved,
                                            part.per_term.get(name), len(rollouts.prompts))
                       for name in sorted(rollouts.per_term.keys() | part.per_term.keys())})
    if rollouts.set_aside is not None:  # a prompt a kept hint solved has a signal now
        merged.set_aside = rollouts.set_aside & ~useful_prompts(merged, config)
    return merged, stats


def accept_threshold(config: RaftConfig) -> float:
    """The reward at or above which a response counts as accepted (`raft.hints`)."""
    hints = active_hints(config)
    return hints.accept_reward if hints.accept_reward is not None else (
        config.selection.min_reward)


def hinted_prompt(record: PromptRecord, hints: HintsConfig, tokenizer: Any,
                  system_prompt: str | None) -> PromptRecord:
    """`record` as the policy is shown it with the hint: the template filled with its text
    (a chat prompt: its last user message) and its answer, rendered as the data loader renders
    prompts. Its id, prompt value and columns stay the record's (rewards read those)."""
    answer = record.columns[hints.answer_field]
    if isinstance(record.prompt, str):
        prompt: str | list[dict] = hints.template.format(prompt=record.prompt, answer=answer)
    else:
        last = max(i for i, m in enumerate(record.prompt) if m["role"] == "user")
        prompt = [dict(m, content=hints.template.format(prompt=m["content"], answer=answer))
                  if i == last else m for i, m in enumerate(record.prompt)]
    text, token_ids = render_chat(prompt, tokenizer, system_prompt)
    return dataclasses.replace(record, text=text, token_ids=token_ids)


def hint_text(hints: HintsConfig, record: PromptRecord) -> str:
    """The hint alone: the template filled with an empty prompt and the answer, stripped
    ("Hint: the answer is 42.")."""
    return hints.template.format(prompt="", answer=record.columns[hints.answer_field]).strip()


def quotes_hint(response: str, hint: str, markers: list[str]) -> bool:
    """Whether `response` quotes the hint: it contains the hint itself or one of `markers`
    (default "hint"), compared case-insensitively with runs of whitespace as one space. The
    answer alone is no quote: reaching it is the point."""
    def normal(text: str) -> str:
        return " ".join(text.casefold().split())

    said = normal(response)
    return any(normal(s) and normal(s) in said for s in [hint, *markers])


def check_hint_answers(config: RaftConfig, prompts: PromptSet) -> None:
    """Refuse hints for a prompt set whose rows lack the answer the hint gives."""
    hints = active_hints(config)
    if hints is None:
        return
    missing = next((r for r in prompts.records if r.columns.get(hints.answer_field) is None),
                   None)
    if missing is not None:
        raise ConfigError(f"raft.hints.answer_field: prompt {missing.id} of {prompts.source} has "
                          f"no '{hints.answer_field}' column (the answer the hint gives)")


def _accepted(rollouts: Rollouts, config: RaftConfig, threshold: float) -> np.ndarray:
    """bool [P, K]: eligible responses (the response filters passed) with a shaped reward of
    at least `threshold`, as gvm counts them (`collectors.gvm_counts`)."""
    rewards, selection = ranked_view(rollouts, config)
    return selection.eligible & (np.nan_to_num(rewards, nan=-np.inf) >= threshold)


def _rows_replaced(table: np.ndarray | None, rows: list[int], new: np.ndarray | None,
                   n: int = 0) -> np.ndarray:
    """`table` ([P, K]; NaN when None) widened to `new`'s width, its `rows` replaced by `new`'s
    (NaN when None)."""
    old = np.full((n, 0), np.nan) if table is None else table
    width = max(old.shape[1], 0 if new is None else new.shape[1])
    out = np.pad(old, ((0, 0), (0, width - old.shape[1])), constant_values=np.nan)
    out[rows] = np.nan
    if new is not None:
        out[rows, : new.shape[1]] = new
    return out
