"""The reward-term kinds (`TERM_KINDS`): how a config term builds its callable, and what
callers may ask about a kind without comparing its name; `reward_fingerprint` of a reward config.

A term's kind is the one config key it sets: ``name`` (a built-in or a function), ``model`` (a
reward-model folder), ``url`` (a reward server), ``judge`` (an LLM judge).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from raftlm.rewards.functions import build_function_term, function_label
from raftlm.rewards.judge import build_judge_term, judge_label
from raftlm.rewards.model import build_model_term, model_label
from raftlm.rewards.remote import build_remote_term, remote_label

if TYPE_CHECKING:
    from raftlm.config import RewardConfig, RewardTerm

# Settings of every kind that never change a score: retries, in-flight limits, time limits.
_DELIVERY = ("concurrency", "timeout_s", "retry_s")


@dataclass(frozen=True)
class TermKind:
    """One kind of reward term, keyed in `TERM_KINDS` by the config key that names it."""

    build: Callable[[RewardTerm], Callable]  # the term's callable from its config
    label: Callable[[Any], str]  # its default name in metrics, from the kind key's value
    # `timeout_s` bounds one whole call of the callable (async functions); servers and judges
    # time each request themselves.
    times_whole_call: bool
    # RewardTerm fields (dotted for sub-sections) that say how scores travel, not what they
    # are: the fingerprint leaves them out, so a longer timeout after an outage resumes.
    transport: tuple[str, ...]
    # Fields holding a URL: its scheme, host and port are transport (a server restarted
    # elsewhere), its path and query name what is served and stay in the fingerprint.
    addresses: tuple[str, ...] = ()


TERM_KINDS: dict[str, TermKind] = {
    # A reward model's batch_size stays: padding to another length moves its scores' last bits.
    "name": TermKind(build_function_term, function_label, times_whole_call=True,
                     transport=(*_DELIVERY, "batch_size")),
    "model": TermKind(build_model_term, model_label, times_whole_call=False,
                      transport=_DELIVERY),
    "url": TermKind(build_remote_term, remote_label, times_whole_call=False,
                    transport=(*_DELIVERY, "batch_size"), addresses=("url",)),
    "judge": TermKind(build_judge_term, judge_label, times_whole_call=False,
                      transport=(*_DELIVERY, "batch_size", "judge.api_key_env"),
                      addresses=("judge.base_url",)),
}


def term_kind(term: RewardTerm) -> str:
    """The term's kind: the one kind key its config sets (the config validates there is one)."""
    kinds = [kind for kind in TERM_KINDS if getattr(term, kind)]
    if len(kinds) != 1:
        raise ValueError(f"a reward term sets exactly one of {', '.join(TERM_KINDS)}; "
                         f"got {kinds or 'none'}")
    return kinds[0]


def reward_fingerprint(config: RewardConfig) -> str:
    """A short hash of what turns samples into rewards: terms, weights, labels, `on_error`,
    but not how the scores travel (`TermKind.transport`, a server's host and port). Rewards
    recorded under one fingerprint are reused under the same fingerprint only."""
    terms = [_scoring_settings(term) for term in config.terms]
    text = json.dumps({"terms": terms, "on_error": config.on_error}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _scoring_settings(term: RewardTerm) -> dict[str, Any]:
    kind = TERM_KINDS[term_kind(term)]
    settings = dataclasses.asdict(term)
    for path in kind.transport:
        *parents, key = path.split(".")
        _section(settings, parents).pop(key, None)
    for path in kind.addresses:
        *parents, key = path.split(".")
        section = _section(settings, parents)
        parts = urlsplit(section[key])
        section[key] = parts.path + (f"?{parts.query}" if parts.query else "")
    return settings


def _section(settings: dict[str, Any], parents: list[str]) -> dict[str, Any]:
    for parent in parents:
        settings = settings[parent]
    return settings
