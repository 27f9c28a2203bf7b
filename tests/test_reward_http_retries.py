"""Reward and judge requests against real local servers: HTTP 408 and 429 are retried like 5xx,
after the `Retry-After` the server asks for (seconds or an HTTP date) and within `retry_s`;
payloads are strict JSON (a missing column value travels as null, never as `NaN`)."""

from __future__ import annotations

import email.utils
import json
import math
import time

import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from raftlm.rewards.http import retry_after
from raftlm.rewards.remote import RemoteReward
from raftlm.rewards.reward import Reward, RewardError
from raftlm.tools.serve_reward import serving


def busy_then_ok(status: int, headers: dict[str, str], busy_times: int = 1):
    """A server answering `status` (with `headers`) `busy_times` times, then the rewards; it
    records when each request came."""
    arrivals: list[float] = []

    async def handle(request):
        body = json.loads(await request.body())
        arrivals.append(time.monotonic())
        if len(arrivals) <= busy_times:
            return JSONResponse({"error": "busy"}, status_code=status, headers=headers)
        return JSONResponse({"rewards": [1.0] * len(body["completions"])})

    return Starlette(routes=[Route("/score", handle, methods=["POST"])]), arrivals


def remote(url: str, retry_s: float = 30.0, on_error: str = "raise") -> Reward:
    term = RemoteReward(url + "/score", batch_size=4, concurrency=1, retry_s=retry_s)
    return Reward([("remote", 1.0, term)], on_error=on_error)


@pytest.mark.parametrize("status", [408, 429, 503])
def test_busy_answers_are_retried_like_5xx(status):
    app, arrivals = busy_then_ok(status, {})
    with serving(app) as url:
        result = remote(url)(["p", "q"], ["a", "b"], {})
    assert result.scores.tolist() == [1.0, 1.0]
    assert len(arrivals) == 2


def test_retry_after_in_seconds_is_waited_instead_of_the_backoff():
    app, arrivals = busy_then_ok(429, {"Retry-After": "2"})
    with serving(app) as url:
        remote(url)(["p"], ["a"], {})
    assert arrivals[1] - arrivals[0] >= 1.9  # the backoff alone would have waited 0.5 s


def test_retry_after_as_an_http_date_is_waited():
    when = email.utils.formatdate(time.time() + 3, usegmt=True)  # whole seconds: 2-3 s away
    app, arrivals = busy_then_ok(429, {"Retry-After": when})
    with serving(app) as url:
        remote(url)(["p"], ["a"], {})
    assert arrivals[1] - arrivals[0] >= 1.5


def test_a_retry_after_past_the_retry_budget_gives_up_at_once_in_one_line():
    app, arrivals = busy_then_ok(429, {"Retry-After": "120"}, busy_times=99)
    began = time.monotonic()
    with serving(app) as url, pytest.raises(RewardError) as raised:
        remote(url, retry_s=5)(["p"], ["a"], {})
    assert time.monotonic() - began < 5
    assert len(arrivals) == 1
    message = str(raised.value)
    assert "\n" not in message
    assert "HTTP 429: '{\"error\":\"busy\"}'" in message
    assert "it asked to wait 120 s, past retry_s=5" in message


def test_a_rate_limit_that_outlasts_retry_s_skips_the_batch_under_skip():
    app, arrivals = busy_then_ok(429, {}, busy_times=99)
    with serving(app) as url:
        result = remote(url, retry_s=1.2, on_error="skip")(["p"], ["a"], {})
    assert np.isnan(result.scores).all() and result.n_invalid == 1
    assert len(arrivals) >= 2  # retried (0.5 s backoff), then given up within the budget


def test_other_4xx_answers_are_not_retried():
    app, arrivals = busy_then_ok(404, {}, busy_times=99)
    with serving(app) as url, pytest.raises(RewardError, match="HTTP 404"):
        remote(url)(["p"], ["a"], {})
    assert len(arrivals) == 1


def test_retry_after_reads_seconds_and_http_dates_and_ignores_the_rest():
    assert retry_after("7") == 7.0
    assert retry_after(None) is None and retry_after("soon") is None
    past = email.utils.formatdate(time.time() - 60, usegmt=True)
    assert retry_after(past) == 0.0
    future = retry_after(email.utils.formatdate(time.time() + 60, usegmt=True))
    assert 58 <= future <= 60


def test_missing_column_values_travel_as_null_not_nan():
    bodies = []

    async def strict(request):
        raw = (await request.body()).decode()
        # Most JSON parsers (Go, JavaScript, Rust's serde) refuse NaN and Infinity.
        bodies.append(json.loads(raw, parse_constant=lambda name: pytest.fail(name)))
        return JSONResponse({"rewards": [0.0] * len(bodies[-1]["completions"])})

    app = Starlette(routes=[Route("/score", strict, methods=["POST"])])
    columns = {"answer": ["3", math.nan, None], "difficulty": np.array([0.5, np.nan, np.inf])}
    with serving(app) as url:
        remote(url)(["p"] * 3, ["a", "b", "c"], columns)
    assert bodies[0]["columns"] == {"answer": ["3", None, None], "difficulty": [0.5, None, None]}
