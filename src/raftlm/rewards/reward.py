"""The reward: the weighted sum of its terms, their error policy, and `score` for a stage.

Every term follows TRL's reward-function convention (`rewards.terms`)::

    fn(prompts=[...], completions=[...], **columns) -> list[float]

``prompts`` are the original prompt values (text or chat messages), ``columns`` the other
prompt-file columns as lists aligned with them (a reference ``answer``, say). Terms are called
with keywords, as TRL does, so ``def f(completions, **kwargs)`` works too. A term's kind is the
config key that names it (`kinds.TERM_KINDS`): ``name`` (a built-in or a function), ``model`` (a
reward-model folder), ``url`` (a reward server), ``judge`` (an LLM judge).
CPU-bound terms run one after the other in the calling thread; I/O-bound ones (`async def`
functions, servers, judges) run concurrently with them and with each other, in one background
event loop.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from raftlm.config import RewardConfig
from raftlm.rewards.functions import (
    CONTEXT_KEYWORDS,
    PER_ITEM_KEYWORDS,
    conversational,
    declared_keywords,
    is_async,
    is_user_function,
    load_function,
    required_columns,
)
from raftlm.rewards.kinds import TERM_KINDS, reward_fingerprint, term_kind
from raftlm.rewards.model import ModelReward
from raftlm.rewards.terms import (
    ERROR_POLICIES,
    BackgroundLoop,
    RewardError,
    TermFailure,
    WrongCount,
    as_list,
    invalid,
    one_line,
    raised_where,
)

if TYPE_CHECKING:
    from raftlm.data.prompts import PromptRecord
    from raftlm.sampling.completion import Completion

__all__ = ["TERM_KINDS", "ModelReward", "Reward", "RewardError", "RewardResult", "Term",
           "build_reward", "load_function", "reward_fingerprint", "score", "term_kind"]

TRACEBACK_HINT = "RAFTLM_TRACEBACK=1 prints the traceback"


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
    conversational: bool = False  # TRL's messages for a trajectory (`is_user_function`)
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
        if on_error not in ERROR_POLICIES:
            raise ValueError(f"on_error must be one of {', '.join(ERROR_POLICIES)}, "
                             f"got {on_error!r}")
        if not terms:
            raise ValueError("a reward needs at least one term")
        self.stops_run = ERROR_POLICIES[on_error].stops_run
        self.terms: list[Term] = []
        seen: dict[str, int] = {}
        for term in terms:
            term = term if isinstance(term, Term) else Term(*term)
            seen[term.name] = seen.get(term.name, 0) + 1
            if seen[term.name] > 1:  # keep per_term keys apart
                term.name = f"{term.name}#{seen[term.name]}"
            self.terms.append(term)

    def declares(self, keyword: str) -> bool:
        """Whether some term asks for the context keyword (`environments` costs a replay)."""
        return any(keyword in term.context_keys for term in self.terms)

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
                    per_term[term.name] = _run_now(self._score(term, batch))
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

    async def _score_async_terms(self, terms: list[Term], batch: tuple) -> dict[str, np.ndarray]:
        results = await asyncio.gather(*(self._score(t, batch) for t in terms))
        return {t.name: r for t, r in zip(terms, results)}

    async def _score(self, term: Term, batch: tuple) -> np.ndarray:
        """One term's scores under the error policy. Written once for plain and `async def`
        terms: a plain term's call never suspends, so `_run_now` finishes it without a loop."""
        prompts, completions, columns, context = batch
        if term.conversational and any(context.get("trajectories") or ()):
            # TRL's conversational arguments; `completions` stay text for the error messages.
            batch = (prompts, conversational(prompts, completions, context["trajectories"]),
                     *batch[2:])
        try:
            output = await _call(term, prompts=batch[0], completions=batch[1], **columns,
                                 **_context_for(term, context))
        except TermFailure as failure:
            return self._partial(term, failure, completions)
        except WrongCount as err:  # no single candidate is to blame, whatever on_error says
            raise RewardError(f"reward '{term.name}' {err}") from err
        except Exception as err:
            # An outage (a timeout) or a term whose failures are not its items': calling item
            # by item would only fail b*K times the same way.
            if not term.blame_items or isinstance(err, TimeoutError):
                return self._batch_failed(term, err, len(completions))
            scores = np.full(len(completions), np.nan)
            for i in range(len(completions)):
                try:
                    values = await _call(term, **_item(batch, i),
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
            elif self.stops_run:
                raise RewardError(_item_message(term.name, f"returned {problem}", i,
                                                completions[i]))
        return scores

    def _partial(self, term: Term, failure: TermFailure, completions: list[str]) -> np.ndarray:
        if self.stops_run:
            raise RewardError(f"reward '{term.name}' {failure}") from failure
        failed = {i for i, v in enumerate(failure.scores) if v is None}
        return self._checked(term, failure.scores, completions, failed)

    def _batch_failed(self, term: Term, err: Exception, n: int) -> np.ndarray:
        if self.stops_run:
            raise RewardError(_failed(term, err)) from err
        return np.full(n, np.nan)

    def _item_score(self, term: Term, i: int, completion: str, values: Any) -> float:
        """One item's score from its own call's output (or exception); NaN when skipped."""
        if isinstance(values, WrongCount):
            raise RewardError(f"reward '{term.name}' {values}") from values
        if isinstance(values, Exception):
            if self.stops_run:
                raise RewardError(_failed(term, values, i, completion)) from values
            return math.nan
        values = as_list(values)
        if values is None or len(values) != 1:  # a wrong count stops the run, as for a batch
            got = len(values) if values is not None else "no"
            raise RewardError(_item_message(term.name, f"returned {got} scores for 1 "
                                            "completion", i, completion))
        problem = invalid(values[0])
        if problem is None:
            return float(values[0])
        if self.stops_run:
            raise RewardError(_item_message(term.name, f"returned {problem}", i, completion))
        return math.nan

    def _after_items(self, term: Term, batch_err: Exception, scores: np.ndarray) -> np.ndarray:
        if self.stops_run:  # every item passed alone: the batch call itself is at fault
            raise RewardError(_failed(term, batch_err)) from batch_err
        return scores


def _item(batch: tuple, i: int) -> dict[str, Any]:
    prompts, completions, columns, _ = batch
    return {"prompts": [prompts[i]], "completions": [completions[i]],
            **{k: [v[i]] for k, v in columns.items()}}


def _context_for(term: Term, context: dict[str, Any], item: int | None = None) -> dict[str, Any]:
    """The context keywords the term declares, None where unknown (scoring outside a stage),
    per-item lists cut to item `item`."""
    out = {k: context.get(k) for k in term.context_keys}
    if item is not None:
        for key in PER_ITEM_KEYWORDS:
            if out.get(key) is not None:
                out[key] = [out[key][item]]
    return out


async def _call(term: Term, **kwargs: Any) -> Any:
    """Call the term: await an `async def` one within its timeout, call a plain one."""
    if term.is_async:
        return await asyncio.wait_for(term.fn(**kwargs), term.timeout_s)
    return term.fn(**kwargs)


def _run_now(coroutine: Coroutine[Any, Any, np.ndarray]) -> np.ndarray:
    """Run a coroutine that never suspends (`Reward._score` of a plain term) to its end."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise RuntimeError("a plain reward term awaited something")


def _failed(term: Term, err: Exception, item: int | None = None, completion: str = "") -> str:
    """One line for a term that raised (or timed out), naming the item when one is to blame."""
    if isinstance(err, TimeoutError):
        what = "timed out"
    else:
        # Where the user's function raised: the one line the CLI prints is all a user sees.
        where = raised_where(err, term.fn)
        what = f"raised {type(err).__name__}: {one_line(err)}{f' ({where})' if where else ''}"
    message = (f"reward '{term.name}' {what}" if item is None
               else _item_message(term.name, what, item, completion))
    return message if isinstance(err, TimeoutError) else f"{message}; {TRACEBACK_HINT}"


def _item_message(name: str, what: str, index: int, completion: str) -> str:
    return f"reward '{name}' {what} for item {index} (completion: {completion[:60]!r})"


def score(reward: Reward, records: list[PromptRecord], completions: list[list[Completion]],
          stage: int | None = None, step: int | None = None,
          on_scored: Callable[[int, int, RewardResult], None] | None = None,
          tokenizer: Any = None, environments: list[list[Any]] | None = None) -> RewardResult:
    """Score every completion of every record; the result is flat, prompt-major.

    `stage` and `step` reach the terms that declare them. With the policy's `tokenizer`, each
    of `queries` ends with the text of the end-of-turn token its completion stopped on, as
    OpenRLHF's `query` does (a reward model scores the turn it was trained on); without
    one, `queries` end at the completion. With `on_scored`, records are
    scored in chunks of about `reward.chunk_size` candidates (whole prompts) and
    ``on_scored(first, last, result)`` is called after each, `result` covering the
    completions of ``records[first:last]``: a caller can keep each chunk before the next
    one starts, so a reward server dying mid-stage loses only the chunk in flight.
    `environments` (like `completions`) reach the terms that declare them.
    """
    result_chunks = []
    for first, last in _chunks([len(row) for row in completions],
                               reward.chunk_size if on_scored else None):
        envs = [e for row in environments[first:last] for e in row] if environments else None
        part = _score_records(reward, records[first:last], completions[first:last],
                              {"stage": stage, "step": step, "environments": envs}, tokenizer)
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
                   completions: list[list[Completion]], context: dict[str, Any], tokenizer: Any
                   ) -> RewardResult:
    flat_records = [r for r, row in zip(records, completions) for _ in row]
    flat = [c for row in completions for c in row]
    if not flat:  # an empty shard (more processes than prompts): no reward call at all
        return RewardResult(np.zeros(0), {}, 0)
    keys = sorted({key for r in records for key in r.columns})
    columns = {key: [r.columns.get(key) for r in flat_records] for key in keys}
    prompt_texts = [r.text for r in flat_records]
    queries = [t + c.text + _end_of_turn(c, tokenizer) for t, c in zip(prompt_texts, flat)]
    return reward([r.prompt for r in flat_records], [c.text for c in flat], columns,
                  **context, prompt_texts=prompt_texts, queries=queries,
                  trajectories=[getattr(c, "turns", None) for c in flat])


def _end_of_turn(completion: Completion, tokenizer: Any) -> str:
    """The text of the eos token a completion stopped on ('' when it did not, or unknown)."""
    if tokenizer is None or completion.finish_reason != "eos" or not completion.token_ids:
        return ""
    return tokenizer.decode(completion.token_ids[-1:], skip_special_tokens=False)


def build_reward(config: RewardConfig) -> Reward:
    """Build the weighted-sum reward from the config's terms."""
    terms = []
    for term in config.terms:
        key = term_kind(term)
        kind = TERM_KINDS[key]
        name = term.label or kind.label(getattr(term, key))
        timeout = term.timeout_s if kind.times_whole_call else None
        terms.append(Term(name, term.weight, kind.build(term), timeout,
                          conversational=key == "name" and is_user_function(term)))
    return Reward(terms, on_error=config.on_error)
