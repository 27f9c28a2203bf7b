"""Rewards: built-in scorers, user functions, reward models, and their weighted sum.

Every term follows TRL's reward-function convention::

    fn(prompts=[...], completions=[...], **columns) -> list[float]

``prompts`` are the original prompt values (text or chat messages), ``columns`` the other
prompt-file columns as lists aligned with them (a reference ``answer``, say). Terms are called
with keywords, as TRL does, so ``def f(completions, **kwargs)`` works too.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import numbers
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raftlm.config import RewardConfig
from raftlm.rewards.verifiable import BUILTIN_REWARDS

if TYPE_CHECKING:
    from raftlm.data.prompts import PromptRecord
    from raftlm.sampling.completion import Completion

def load_function(spec: str) -> Callable[..., Any]:
    """Load ``package.module:function`` or ``path/to/file.py:function`` (relative to cwd)."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ValueError(
            f"reward {spec!r}: expected 'package.module:function' or 'file.py:function'"
        )
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"reward {spec!r}: file not found: {path}")
        name = f"raftlm_user_reward_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # so pickling and dataclasses inside the file work
        try:
            module_spec.loader.exec_module(module)
        except Exception as err:
            raise ValueError(f"reward {spec!r}: importing {path} failed: {err!r}") from err
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise ValueError(f"reward {spec!r}: cannot import module '{target}': {err}") from err
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"reward {spec!r}: '{target}' has no attribute '{attr}'")
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: '{attr}' is not callable")
    return fn


class ModelReward:
    """A local HF sequence-classification model scoring prompt + completion (logit 0)."""

    def __init__(self, path: str | Path, batch_size: int = 16):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.path = str(path)
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            self.path, local_files_only=True
        ).eval()
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # The model finds each sequence's last token through pad_token_id.
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    def to(self, device: Any) -> ModelReward:
        """Move the model (an offload manager swaps it with the policy between phases)."""
        self.model.to(device)
        return self

    def _text(self, prompt: str | list[dict], completion: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            messages = [*messages, {"role": "assistant", "content": completion}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        if not isinstance(prompt, str):
            prompt = "\n".join(m["content"] for m in prompt)
        return prompt + completion

    def __call__(self, prompts: list, completions: list[str], **kwargs: Any) -> list[float]:
        import torch
        from tqdm.auto import tqdm

        texts = [self._text(p, c) for p, c in zip(prompts, completions, strict=True)]
        templated = bool(getattr(self.tokenizer, "chat_template", None))
        scores: list[float] = []
        starts = range(0, len(texts), self.batch_size)
        with torch.inference_mode():
            for start in tqdm(starts, desc="reward model", leave=False, disable=len(starts) < 2):
                batch = self.tokenizer(
                    texts[start : start + self.batch_size],
                    padding=True,
                    return_tensors="pt",
                    add_special_tokens=not templated,  # the template holds its own specials
                ).to(self.device)
                logits = self.model(**batch).logits
                scores += logits[:, 0].float().cpu().tolist()
        return scores


class RewardError(RuntimeError):
    """A reward term failed; the message names the term and, where known, the item."""


@dataclass
class RewardResult:
    scores: np.ndarray  # float64 [N], weighted sum; NaN where a candidate was skipped
    per_term: dict[str, np.ndarray]  # each term's raw scores (NaN where invalid)
    n_invalid: int  # candidates skipped because some term failed on them


class Reward:
    """The weighted sum of reward terms ``(name, weight, fn)``.

    ``on_error="raise"`` stops at the first failure with a RewardError naming term and item;
    ``"skip"`` marks the failing candidates NaN and counts them. A term returning the wrong
    number of scores always raises: no single candidate is to blame.
    """

    def __init__(self, terms: list[tuple[str, float, Callable]], on_error: str = "raise"):
        if on_error not in {"raise", "skip"}:
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if not terms:
            raise ValueError("a reward needs at least one term")
        self.on_error = on_error
        self.terms: list[tuple[str, float, Callable]] = []
        seen: dict[str, int] = {}
        for name, weight, fn in terms:
            seen[name] = seen.get(name, 0) + 1
            unique = name if seen[name] == 1 else f"{name}#{seen[name]}"  # keep per_term keys
            self.terms.append((unique, float(weight), fn))

    def models(self) -> list[ModelReward]:
        """The reward-model terms, for moving between devices."""
        return [fn for _, _, fn in self.terms if isinstance(fn, ModelReward)]

    def __call__(
        self, prompts: list, completions: list[str], columns: dict[str, list] | None = None
    ) -> RewardResult:
        columns = columns or {}
        n = len(completions)
        for key, values in {"prompts": prompts, **columns}.items():
            if len(values) != n:
                raise ValueError(f"{key} has {len(values)} entries for {n} completions")
        total = np.zeros(n)
        per_term = {}
        for name, weight, fn in self.terms:
            _check_columns(name, fn, columns)
            raw = self._score_term(name, fn, prompts, completions, columns)
            per_term[name] = raw
            total += weight * raw  # NaN in any term makes the candidate NaN
        return RewardResult(total, per_term, int(np.isnan(total).sum()))

    def _score_term(
        self, name: str, fn: Callable, prompts: list, completions: list[str], columns: dict
    ) -> np.ndarray:
        n = len(completions)
        try:
            output = fn(prompts=prompts, completions=completions, **columns)
        except Exception as batch_err:
            # Call item by item to find the candidates to blame (and keep the others).
            return self._score_items(name, fn, prompts, completions, columns, batch_err)
        values = _as_list(output)
        if values is None or len(values) != n:
            got = len(values) if values is not None else type(output).__name__
            raise RewardError(f"reward '{name}' returned {got} scores for {n} completions")
        scores = np.full(n, np.nan)
        for i, value in enumerate(values):
            problem = _invalid(value)
            if problem is None:
                scores[i] = float(value)
            elif self.on_error == "raise":
                raise RewardError(_item_message(name, f"returned {problem}", i, completions[i]))
        return scores

    def _score_items(
        self,
        name: str,
        fn: Callable,
        prompts: list,
        completions: list[str],
        columns: dict,
        batch_err: Exception,
    ) -> np.ndarray:
        scores = np.full(len(completions), np.nan)
        for i, completion in enumerate(completions):
            item_columns = {k: [v[i]] for k, v in columns.items()}
            try:
                values = _as_list(
                    fn(prompts=[prompts[i]], completions=[completion], **item_columns)
                )
            except Exception as err:
                if self.on_error == "raise":
                    what = f"raised {type(err).__name__}: {err}"
                    raise RewardError(_item_message(name, what, i, completion)) from err
                continue
            problem = "no score" if not values or len(values) != 1 else _invalid(values[0])
            if problem is None:
                scores[i] = float(values[0])
            elif self.on_error == "raise":
                raise RewardError(_item_message(name, f"returned {problem}", i, completion))
        if self.on_error == "raise":  # every item passed alone: the batch call itself is at fault
            raise RewardError(
                f"reward '{name}' raised {type(batch_err).__name__}: {batch_err}"
            ) from batch_err
        return scores


def _as_list(output: Any) -> list | None:
    if hasattr(output, "tolist") and not isinstance(output, (str, bytes)):
        output = output.tolist()  # numpy arrays and torch tensors
    if isinstance(output, (list, tuple)):
        return list(output)
    return None


def _invalid(value: Any) -> str | None:
    """Why a score is unusable, or None when it is a finite number."""
    if not isinstance(value, numbers.Real):
        return f"a non-number ({type(value).__name__}: {value!r:.40})"
    if not math.isfinite(float(value)):
        return str(float(value))
    return None


def _item_message(name: str, what: str, index: int, completion: str) -> str:
    return f"reward '{name}' {what} for item {index} (completion: {completion[:60]!r})"


def _check_columns(name: str, fn: Callable, columns: dict) -> None:
    """Fail early, whatever on_error says, when a term needs a column the prompts lack."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # some C callables have no signature
        return
    needed = [
        p.name
        for p in params
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name not in {"prompts", "completions"}
    ]
    missing = [p for p in needed if p not in columns]
    if missing:
        raise RewardError(
            f"reward '{name}' needs column(s) {missing}; the prompt rows have {sorted(columns)}"
        )


def score(reward: Reward, records: list[PromptRecord], completions: list[list[Completion]]
          ) -> RewardResult:
    """Score every completion of every record; the result is flat, prompt-major."""
    flat_records = [r for r, row in zip(records, completions) for _ in row]
    texts = [c.text for row in completions for c in row]
    if not texts:  # an empty shard (more processes than prompts): no reward call at all
        return RewardResult(np.zeros(0), {}, 0)
    keys = sorted({key for r in records for key in r.columns})
    columns = {key: [r.columns.get(key) for r in flat_records] for key in keys}
    return reward([r.prompt for r in flat_records], texts, columns)


def build_reward(config: RewardConfig) -> Reward:
    """Build the weighted-sum reward from the config's terms."""
    terms = []
    for term in config.terms:
        if term.model:
            terms.append((term.model, term.weight, ModelReward(term.model, term.batch_size)))
        elif term.name in BUILTIN_REWARDS:
            terms.append((term.name, term.weight, BUILTIN_REWARDS[term.name]))
        elif ":" in term.name:
            terms.append((term.name, term.weight, load_function(term.name)))
        else:
            raise ValueError(
                f"unknown reward {term.name!r}: use a built-in "
                f"({', '.join(BUILTIN_REWARDS)}), 'package.module:function' or 'file.py:function'"
            )
    return Reward(terms, on_error=config.on_error)
