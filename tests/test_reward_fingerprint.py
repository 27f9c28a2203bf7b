"""`reward_fingerprint`: what changes rewards changes it; how they travel (a server's host and
port, timeouts, retries, in-flight limits, request sizes) does not, so the natural fixes after
an outage leave `--resume`, `select` and `finetune` willing to reuse the rewards."""

from __future__ import annotations

import dataclasses

import pytest

from raftlm.config import JudgeConfig, RewardConfig, RewardTerm
from raftlm.rewards.kinds import TERM_KINDS, TermKind, reward_fingerprint

SERVER = RewardTerm(url="http://10.0.0.7:8000/score", label="rm")
JUDGE = RewardTerm(judge=JudgeConfig(base_url="http://10.0.0.8:8001/v1", model="judge-7b"))


def fingerprint(*terms: RewardTerm, on_error: str = "raise") -> str:
    return reward_fingerprint(RewardConfig(terms=list(terms), on_error=on_error))


def changed(term: RewardTerm, **changes) -> RewardTerm:
    return dataclasses.replace(term, **changes)


def judge_changed(**changes) -> RewardTerm:
    return changed(JUDGE, judge=dataclasses.replace(JUDGE.judge, **changes))


@pytest.mark.parametrize("moved", [
    changed(SERVER, url="http://127.0.0.1:9001/score"),  # restarted on another host and port
    changed(SERVER, url="https://rm.example.org/score"),
    changed(SERVER, timeout_s=600.0),
    changed(SERVER, retry_s=900.0),
    changed(SERVER, concurrency=16),
    changed(SERVER, batch_size=4),
])
def test_a_servers_transport_settings_keep_the_fingerprint(moved):
    assert fingerprint(moved) == fingerprint(SERVER)


@pytest.mark.parametrize("moved", [
    judge_changed(base_url="http://127.0.0.1:9002/v1"),
    judge_changed(api_key_env="OTHER_KEY"),
    changed(JUDGE, timeout_s=5.0, retry_s=0.0, concurrency=32),
])
def test_a_judges_transport_settings_keep_the_fingerprint(moved):
    assert fingerprint(moved) == fingerprint(JUDGE)


def test_an_async_functions_time_limit_keeps_the_fingerprint():
    term = RewardTerm(name="rewards.py:judge_api")
    assert fingerprint(changed(term, timeout_s=300.0)) == fingerprint(term)


@pytest.mark.parametrize("other", [
    changed(SERVER, url="http://10.0.0.7:8000/other_reward"),  # another route: another reward
    changed(SERVER, weight=0.5),
    changed(SERVER, label="rm2"),  # the per-term reward's name in the journal
    RewardTerm(name="numeric_answer"),
    judge_changed(model="judge-70b"),
    judge_changed(template="Grade {completion}"),
    judge_changed(parse=r"(\d+)"),
    judge_changed(temperature=0.7),
])
def test_what_changes_rewards_changes_the_fingerprint(other):
    base = JUDGE if other.judge else SERVER
    assert fingerprint(other) != fingerprint(base)


def test_a_reward_models_batch_size_changes_the_fingerprint():
    # Padding a batch to another length moves a model's scores in their last bits.
    term = RewardTerm(model="/models/rm", batch_size=8)
    assert fingerprint(changed(term, batch_size=32)) != fingerprint(term)


def test_the_error_policy_and_the_terms_order_change_the_fingerprint():
    other = RewardTerm(name="numeric_answer")
    assert fingerprint(SERVER, on_error="skip") != fingerprint(SERVER)
    assert fingerprint(SERVER, other) != fingerprint(other, SERVER)


def test_every_kind_is_a_record_naming_its_transport_fields():
    fields = {f.name for f in dataclasses.fields(RewardTerm)}
    judge_fields = {f"judge.{f.name}" for f in dataclasses.fields(JudgeConfig)}
    for kind in TERM_KINDS.values():
        assert isinstance(kind, TermKind)
        assert set(kind.transport) | set(kind.addresses) <= fields | judge_fields
