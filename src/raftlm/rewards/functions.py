"""Reward terms that are Python functions: built-ins, `pkg.mod:fn` and `file.py:fn`.

Every function follows TRL's reward-function convention::

    fn(prompts=[...], completions=[...], **columns) -> list[float]

It may be `async def` (it then runs concurrently with the other I/O-bound terms), and it may
declare the keywords of `CONTEXT_KEYWORDS` (`stage`, `step`, `prompt_texts`, `queries`,
`trajectories`, `environments`) to receive them; a function that does not declare one does
not get it.

In a multi-turn run (a `rollout` section) whose prompt rows are chat messages (TRL's
conversational format), a user's function gets each of `completions` as TRL does: the
trajectory's chat messages (`{"role", "content"}`, a tool message's `name`); with text
prompts, and for the built-in terms, the trajectory's text, as in a single-turn run.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from raftlm.config import ConfigError
from raftlm.config.registry import load_object
from raftlm.rewards.verifiable import BUILTIN_REWARDS

if TYPE_CHECKING:
    from raftlm.config import RewardTerm

# What a term may ask for by declaring it as a parameter, besides prompts, completions and the
# prompt file's columns: the RAFT stage (1-based), the optimizer step before the stage, the
# prompts as the model saw them (chat template applied), and each of those followed by its
# completion and the end-of-turn token it stopped on (OpenRLHF's `query`).
CONTEXT_KEYWORDS = ("stage", "step", "prompt_texts", "queries", "trajectories", "environments")
# one value per completion; `trajectories`: a multi-turn rollout's turns as recorded (None for
# a single turn); `environments`: the trajectory's `rollout.environment` instance, as TRL
# passes it (None without one)
PER_ITEM_KEYWORDS = ("prompt_texts", "queries", "trajectories", "environments")


def load_function(spec: str) -> Callable[..., Any]:
    """Load ``package.module:function`` or ``path/to/file.py:function`` (relative to cwd)."""
    fn = load_object(spec, "reward")
    if not callable(fn):
        raise ConfigError(f"reward {spec!r}: '{spec.rpartition(':')[2]}' is not callable")
    return fn


def resolve_function(spec: str) -> Callable[..., Any]:
    """A built-in's name, or a `pkg.mod:fn` / `file.py:fn` spec, as its function."""
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    if ":" in spec:
        return load_function(spec)
    raise ConfigError(
        f"unknown reward {spec!r}: use a built-in "
        f"({', '.join(BUILTIN_REWARDS)}), 'package.module:function' or 'file.py:function'"
    )


def build_function_term(term: RewardTerm) -> Callable[..., Any]:
    """`name:` a built-in or a user function."""
    return resolve_function(term.name)


def is_user_function(term: RewardTerm) -> bool:
    """A `name:` term that is the user's function (it takes TRL's conversational arguments in
    a multi-turn run), not a built-in."""
    return bool(term.name) and all(resolve_function(term.name) is not builtin
                                   for builtin in BUILTIN_REWARDS.values())


def conversational(prompts: list, completions: list[str], trajectories: list) -> list:
    """TRL's conversational completions: a trajectory whose prompt is chat messages (TRL's
    conversational format) as the chat messages after the prompt; any other as its text."""
    return [[{k: v for k, v in turn.items() if k in ("role", "content", "name")}
             for turn in turns] if turns and isinstance(prompt, list) else text
            for prompt, text, turns in zip(prompts, completions, trajectories)]


def function_label(spec: str) -> str:
    """A term's short name in metrics: the function's name (`file.py:length` -> `length`)."""
    return spec.rpartition(":")[2] or spec


def is_async(fn: Callable) -> bool:
    """Whether calling `fn` returns an awaitable (an `async def` function or `__call__`)."""
    # A callable object's type holds its __call__ (a plain function's is a slot wrapper).
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


def declared_keywords(fn: Callable) -> set[str]:
    """The names `fn` takes by keyword (not those a `**kwargs` would swallow)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # some C callables have no signature
        return set()
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def required_columns(fn: Callable) -> list[str]:
    """The columns `fn` cannot do without: its parameters without a default."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    return [
        p.name for p in params
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name not in {"prompts", "completions", *CONTEXT_KEYWORDS}
    ]
