"""The reward: the weighted sum of its terms, their error policy, and `score` for a stage.

Every term follows TRL's reward-function convention (`rewards.terms`)::

    fn(prompts=[...], completions=[...], **columns) -> list[float]

``prompts`` are the original prompt values (text or chat messages), ``columns`` the other
prompt-file columns as lists aligned with them (a reference ``answer``, say). Terms are called
with keywords, as TRL does, so ``def f(completions, **kwargs)`` works too. A term's kind is the
config key that names it (`TERM_KINDS`): ``name`` (a built-in or a function), ``model`` (a
reward-model folder), ``url`` (a reward server), ``judge`` (an LLM judge).
CPU-bound terms run one after the other in the calling thread; I/O-bound ones (`async def`
functions, servers, judges) run concurrently with them and with each other, in one background
event loop.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from raftlm.config import RewardConfig, RewardTerm
from raftlm.rewards.functions import (
    CONTEXT_KEYWORDS,
    build_function_term,
    declared_keywords,
    function_label,
    is_async,
    load_function,
    required_columns,
)
from raftlm.rewards.judge import build_judge_term, judge_label
from raftlm.rewards.model import ModelReward, build_model_term, model_label
from raftlm.rewards.remote import build_remote_term, remote_label
from raftlm.rewards.terms import (
    BackgroundLoop,
    RewardError,
    TermFailure,
    as_list,
    invalid,
    one_line,
)

if TYPE_CHECKING:
    from raftlm.data.prompts import PromptRecord
    from raftlm.sampling.completion import Completion

__all__ = ["TERM_KINDS", "ModelReward", "Reward", "RewardError", "RewardResult", "Term",
           "build_reward", "load_function", "score", "term_kind"]

# A term's kind is the one key of its config that is set; each kind builds its callable and
# gives its default name in metrics (`reward/<name>/mean`).
TERM_KINDS: dict[str, tuple[Callable[[RewardTerm], Callable], Callable[[str], str]]] = {
    "name": (build_function_term, function_label),
    "model": (build_model_term, model_label),
    "url": (build_remote_term, remote_label),
    "judge": (build_judge_term, judge_label),
}


@dataclass
class RewardResult:
    scores: np.ndarray  # float64 [N], weighted sum; NaN where a candidate was skipped
    per_term: dict[str, np.ndarray]  # each term's raw scores (NaN where invalid)
    n_invalid: int  # candidates skipped because some term failed on them


@dataclass
class Term:
    """One term of the sum: its stable name (the key of `per_term`), weight and callable."""

    name: str
    weight: float
    fn: Callable
    timeout_s: float | None = None  # async terms: the longest one call may take
    is_async: bool = field(init=False)
    context_keys: set[str] = field(init=False)  # the context keywords `fn` declares
    blame_items: bool = field(init=False)

    def __post_init__(self) -> None:
        self.weight = float(self.weight)
        self.is_async = is_async(self.fn)
        self.context_keys = declared_keywords(self.fn) & set(CONTEXT_KEYWORDS)
        self.blame_items = bool(getattr(self.fn, "blame_items", True))

    def columns_needed(self) -> list[str]:
        needed = getattr(self.fn, "columns_needed", None)
        return list(needed) if needed is not None else required_columns(self.fn)

    def models(self) -> list[Any]:
        models = getattr(self.fn, "models", None)
        return list(models()) if callable(models) else []


class Reward:
    """The weighted sum of reward terms.

    ``on_error="raise"`` stops at the first failure with a RewardError naming term and item;
    ``"skip"`` marks the failing candidates NaN and counts them. A term returning the wrong
    number of scores always raises: no single candidate is to blame.
    """

    def __init__(self, terms: list[Term | tuple[str, float, Callable]], on_error: str = "raise"):
        if on_error not in {"raise", "skip"}:
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if not terms:
            raise ValueError("a reward needs at least one term")
        self.on_error = on_error
        self.terms: list[Term] = []
        seen: dict[str, int] = {}
        for term in terms:
            term = term if isinstance(term, Term) else Term(*term)
            seen[term.name] = seen.get(term.name, 0) + 1
            if seen[term.name] > 1:  # keep per_term keys apart
                term.name = f"{term.name}#{seen[term.name]}"
            self.terms.append(term)

    def models(self) -> list[Any]:
        """What the terms hold that an offload manager moves between devices."""
        return [model for term in self.terms for model in term.models()]

    @property
    def chunk_size(self) -> int | None:
        """Candidates per chunk when results are recorded as they come; None = all at once."""
        sizes = [getattr(t.fn, "chunk_size", None) for t in self.terms]
        return max((s for s in sizes if s), default=None)

    def __call__(self, prompts: list, completions: list[str],
                 columns: dict[str, list] | None = None, **context: Any) -> RewardResult:
        """Score `completions`; `context` holds `stage`, `step`, `prompt_texts` (or some)."""
        columns = columns or {}
        n = len(completions)
        for key, values in {"prompts": prompts, **columns}.items():
            if len(values) != n:
                raise ValueError(f"{key} has {len(values)} entries for {n} completions")
        for term in self.terms:
            missing = [c for c in term.columns_needed() if c not in columns]
            if missing:  # whatever on_error says: no candidate is to blame
                raise RewardError(f"reward '{term.name}' needs column(s) {missing}; the prompt "
                                  f"rows have {sorted(columns)}")
        batch = (prompts, completions, columns, context)
        concurrent = [t for t in self.terms if t.is_async]
        background = (BackgroundLoop(self._score_async_terms(concurrent, batch))
                      if concurrent else None)
        per_term: dict[str, np.ndarray] = {}
        try:
            for term in self.terms:
                if not term.is_async:
                    per_term[term.name] = self._score_term(term, batch)
        except BaseException:
            if background is not None:
                background.cancel()
            raise
        if background is not None:
            per_term.update(background.result())
        total = np.zeros(n)
        for term in self.terms:
            total += term.weight * per_term[term.name]  # NaN in any term makes the candidate NaN
        return RewardResult(total, {t.name: per_term[t.name] for t in self.terms},
                            int(np.isnan(total).sum()))

    # ------------------------------------------------------------------ one term, the policy

    def _score_term(self, term: Term, batch: tuple) -> np.ndarray:
        prompts, completions, columns, context = batch
        try:
            output = term.fn(prompts=prompts, completions=completions, **columns,
                             **_context_for(term, context))
        except TermFailure as failure:
            return self._partial(term, failure, completions)
        except Exception as err:
            if not term.blame_items:
                return self._batch_failed(term, err, len(completions))
            scores = np.full(len(completions), np.nan)
            for i in range(len(completions)):
                try:
                    values = term.fn(**_item(batch, i), **_context_for(term, context, i))
                except Exception as item_err:
                    values = item_err
                scores[i] = self._item_score(term, i, completions[i], values)
            return self._after_items(term, err, scores)
        return self._checked(term, output, completions)

    async def _score_async_terms(self, terms: list[Term], batch: tuple) -> dict[str, np.ndarray]:
        results = await asyncio.gather(*(self._score_async(t, batch) for t in terms))
        return {t.name: r for t, r in zip(terms, results)}

    async def _score_async(self, term: Term, batch: tuple) -> np.ndarray:
        prompts, completions, columns, context = batch
        try:
            output = await _call_async(term, prompts=prompts, completions=completions,
                                       **columns, **_context_for(term, context))
        except TermFailure as failure:
            return self._partial(term, failure, completions)
        except Exception as err:
            if not term.blame_items or isinstance(err, TimeoutError):  # an outage: no retries
                return self._batch_failed(term, err, len(completions))
            scores = np.full(len(completions), np.nan)
            for i in range(len(completions)):
                try:
                    values = await _call_async(term, **_item(batch, i),
                                               **_context_for(term, context, i))
                except Exception as item_err:
                    values = item_err
                scores[i] = self._item_score(term, i, completions[i], values)
            return self._after_items(term, err, scores)
        return self._checked(term, output, completions)

    def _checked(self, term: Term, output: Any, completions: list[str],
                 failed: set[int] | None = None) -> np.ndarray:
        n = len(completions)
        values = as_list(output)
        if values is None or len(values) != n:
            got = len(values) if values is not None else type(output).__name__
            raise RewardError(f"reward '{term.name}' returned {got} scores for {n} completions")
        scores = np.full(n, np.nan)
        for i, value in enumerate(values):
            if failed and i in failed:
                continue
            problem = invalid(value)
            if problem is None:
                scores[i] = float(value)
            elif self.on_error == "raise":
                raise RewardError(_item_message(term.name, f"returned {problem}", i,
                                                completions[i]))
        return scores

    def _partial(self, term: Term, failure: TermFailure, completions: list[str]) -> np.ndarray:
        if self.on_error == "raise":
            raise RewardError(f"reward '{term.name}' {failure}") from failure
        failed = {i for i, v in enumerate(failure.scores) if v is None}
        return self._checked(term, failure.scores, completions, failed)

    def _batch_failed(self, term: Term, err: Exception, n: int) -> np.ndarray:
        if self.on_error == "raise":
            raise RewardError(f"reward '{term.name}' {_describe(err)}") from err
        return np.full(n, np.nan)

    def _item_score(self, term: Term, i: int, completion: str, values: Any) -> float:
        """One item's score from its own call's output (or exception); NaN when skipped."""
        if isinstance(values, Exception):
            if self.on_error == "raise":
                what = f"raised {type(values).__name__}: {values}"
                raise RewardError(_item_message(term.name, what, i, completion)) from values
            return math.nan
        values = as_list(values)
        problem = "no score" if not values or len(values) != 1 else invalid(values[0])
        if problem is None:
            return float(values[0])
        if self.on_error == "raise":
            raise RewardError(_item_message(term.name, f"returned {problem}", i, completion))
        return math.nan

    def _after_items(self, term: Term, batch_err: Exception, scores: np.ndarray) -> np.ndarray:
        if self.on_error == "raise":  # every item passed alone: the batch call itself is at fault
            raise RewardError(f"reward '{term.name}' {_describe(batch_err)}") from batch_err
        return scores


def _item(batch: tuple, i: int) -> dict[str, Any]:
    prompts, completions, columns, _ = batch
    return {"prompts": [prompts[i]], "completions": [completions[i]],
            **{k: [v[i]] for k, v in columns.items()}}


def _context_for(term: Term, context: dict[str, Any], item: int | None = None) -> dict[str, Any]:
    """The context keywords the term declares, None where unknown (scoring outside a stage),
    per-item lists cut to item `item`."""
    out = {k: context.get(k) for k in term.context_keys}
    if item is not None and out.get("prompt_texts") is not None:
        out["prompt_texts"] = [out["prompt_texts"][item]]
    return out


async def _call_async(term: Term, **kwargs: Any) -> Any:
    return await asyncio.wait_for(term.fn(**kwargs), term.timeout_s)


def _describe(err: Exception) -> str:
    if isinstance(err, TimeoutError):
        return "timed out"
    return f"raised {type(err).__name__}: {one_line(err)}"


def _item_message(name: str, what: str, index: int, completion: str) -> str:
    return f"reward '{name}' {what} for item {index} (completion: {completion[:60]!r})"


def score(reward: Reward, records: list[PromptRecord], completions: list[list[Completion]],
          stage: int | None = None, step: int | None = None,
          on_scored: Callable[[int, int, RewardResult], None] | None = None) -> RewardResult:
    """Score every completion of every record; the result is flat, prompt-major.

    `stage` and `step` reach the terms that declare them. With `on_scored`, records are
    scored in chunks of about `reward.chunk_size` candidates (whole prompts) and
    ``on_scored(first, last, result)`` is called after each, `result` covering the
    completions of ``records[first:last]``: a caller can keep each chunk before the next
    one starts, so a reward server dying mid-stage loses only the chunk in flight.
    """
    result_chunks = []
    for first, last in _chunks([len(row) for row in completions],
                               reward.chunk_size if on_scored else None):
        part = _score_records(reward, records[first:last], completions[first:last], stage, step)
        if on_scored is not None:
            on_scored(first, last, part)
        result_chunks.append(part)
    if len(result_chunks) == 1:
        return result_chunks[0]
    if not result_chunks:
        return RewardResult(np.zeros(0), {}, 0)
    names = list(result_chunks[0].per_term)
    return RewardResult(
        np.concatenate([r.scores for r in result_chunks]),
        {name: np.concatenate([r.per_term[name] for r in result_chunks]) for name in names},
        sum(r.n_invalid for r in result_chunks),
    )


def _chunks(counts: list[int], size: int | None) -> list[tuple[int, int]]:
    """(first, last) record ranges of about `size` candidates each (whole records)."""
    if not size:
        return [(0, len(counts))] if counts else []
    ranges, first, held = [], 0, 0
    for i, count in enumerate(counts):
        held += count
        if held >= size:
            ranges.append((first, i + 1))
            first, held = i + 1, 0
    if first < len(counts):
        ranges.append((first, len(counts)))
    return ranges


def _score_records(reward: Reward, records: list[PromptRecord],
                   completions: list[list[Completion]], stage: int | None, step: int | None
                   ) -> RewardResult:
    flat_records = [r for r, row in zip(records, completions) for _ in row]
    texts = [c.text for row in completions for c in row]
    if not texts:  # an empty shard (more processes than prompts): no reward call at all
        return RewardResult(np.zeros(0), {}, 0)
    keys = sorted({key for r in records for key in r.columns})
    columns = {key: [r.columns.get(key) for r in flat_records] for key in keys}
    context = {"stage": stage, "step": step, "prompt_texts": [r.text for r in flat_records]}
    return reward([r.prompt for r in flat_records], texts, columns, **context)


def term_kind(term: RewardTerm) -> str:
    """The term's kind: the one kind key its config sets (the config validates there is one)."""
    kinds = [kind for kind in TERM_KINDS if getattr(term, kind)]
    if len(kinds) != 1:
        raise ValueError(f"a reward term sets exactly one of {', '.join(TERM_KINDS)}; "
                         f"got {kinds or 'none'}")
    return kinds[0]


def build_reward(config: RewardConfig) -> Reward:
    """Build the weighted-sum reward from the config's terms."""
    terms = []
    for term in config.terms:
        kind = term_kind(term)
        build, label = TERM_KINDS[kind]
        name = term.label or label(getattr(term, kind))
        # Servers and judges time each request themselves; a function's call is timed whole.
        timeout = term.timeout_s if kind == "name" else None
        terms.append(Term(name, term.weight, build(term), timeout))
    return Reward(terms, on_error=config.on_error)
