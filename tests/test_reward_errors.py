"""What a failing reward tells the user, and when it stops the run: a wrong count always stops
it (servers and item-by-item calls too), a user function's error names its file and line, and
plain and `async def` terms follow one policy."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from raftlm.config import RewardConfig, RewardTerm, field_choices
from raftlm.rewards.remote import RemoteReward
from raftlm.rewards.reward import Reward, RewardError, build_reward
from raftlm.rewards.terms import ERROR_POLICIES
from raftlm.tools.serve_reward import serving

COMPLETIONS = ["good one", "bad one", "good two"]


def run(fn, on_error: str = "raise"):
    return Reward([("x", 1.0, fn)], on_error=on_error)(["p"] * 3, COMPLETIONS, {})


# --- a wrong count stops the run, whatever on_error says -----------------------------------


def test_a_server_answering_a_wrong_count_stops_the_run_under_skip():
    async def one_short(request):
        body = json.loads(await request.body())
        return JSONResponse({"rewards": [1.0] * (len(body["completions"]) - 1)})

    app = Starlette(routes=[Route("/score", one_short, methods=["POST"])])
    with serving(app) as url:
        term = RemoteReward(url + "/score", batch_size=2, concurrency=1)
        with pytest.raises(RewardError, match=r"^reward 'remote' POST .*: answered 1 rewards "
                                              r"for 2 completions"):
            Reward([("remote", 1.0, term)], on_error="skip")(["p"] * 3, COMPLETIONS, {})


def test_an_item_call_returning_a_wrong_count_stops_the_run_under_skip():
    def two_per_item(completions, **columns):
        if len(completions) > 1:
            raise ValueError("batch failed")  # so that the term is called item by item
        return [1.0, 1.0]

    with pytest.raises(RewardError, match=r"reward 'x' returned 2 scores for 1 completion "
                                          r"for item 0"):
        run(two_per_item, "skip")


# --- a user function's error names its file and line -------------------------------------

USER_REWARD = textwrap.dedent("""\
    def helper(text):
        return 1 / len(text)


    def brevity(completions, **columns):
        return [helper(c.replace("bad one", "")) for c in completions]
""")


@pytest.fixture
def user_reward(tmp_path, monkeypatch) -> Reward:
    """`my_rewards.py:brevity` from the working folder, as a config names it."""
    (tmp_path / "my_rewards.py").write_text(USER_REWARD)
    monkeypatch.chdir(tmp_path)
    return build_reward(RewardConfig(terms=[RewardTerm(name="my_rewards.py:brevity")]))


def test_a_user_functions_error_names_its_file_line_and_the_traceback_switch(user_reward):
    with pytest.raises(RewardError) as raised:
        user_reward(["p"] * 3, COMPLETIONS, {})
    assert str(raised.value) == (
        "reward 'brevity' raised ZeroDivisionError: division by zero (my_rewards.py:2 in "
        "helper) for item 1 (completion: 'bad one'); RAFTLM_TRACEBACK=1 prints the traceback")


def test_the_users_exception_is_kept_for_raftlm_traceback(user_reward):
    # RAFTLM_TRACEBACK=1 makes the CLI re-raise: the chained traceback then shows the user's line.
    with pytest.raises(RewardError) as raised:
        user_reward(["p"], ["bad one"], {})
    assert isinstance(raised.value.__cause__, ZeroDivisionError)


# --- one policy for plain and async terms ---------------------------------------------------


class Unreachable:
    """A plain term whose failure is an outage (a socket timing out), not one bad candidate."""

    def __init__(self):
        self.calls = 0

    def __call__(self, prompts, completions, **columns):
        self.calls += 1
        raise TimeoutError("no answer")


def test_a_plain_terms_timeout_is_an_outage_as_an_async_terms_is():
    term = Unreachable()
    result = run(term, "skip")
    assert term.calls == 1  # not once more per item: each would time out again
    assert np.isnan(result.scores).all()
    with pytest.raises(RewardError, match="^reward 'x' timed out$"):
        run(Unreachable(), "raise")


def test_plain_and_async_terms_fail_alike():
    def plain(completions, **columns):
        if any("bad" in c for c in completions):
            raise ValueError("cannot score")
        return [1.0] * len(completions)

    async def concurrent(completions, **columns):
        return plain(completions)

    skipped = [run(fn, "skip").per_term["x"] for fn in (plain, concurrent)]
    np.testing.assert_array_equal(skipped[0], skipped[1])
    messages = []
    for fn in (plain, concurrent):
        with pytest.raises(RewardError) as raised:
            run(fn, "raise")
        messages.append(str(raised.value))
    assert messages[0] == messages[1]


def test_the_configs_error_policies_are_the_registrys():
    assert set(ERROR_POLICIES) == set(field_choices(RewardConfig, "on_error"))
