"""POSTing JSON to a reward or judge server: bounded retries, one-line errors, fail-fast outages.

Connection errors, HTTP 5xx, 408 (request timeout) and 429 (rate limited) are retried with
exponential backoff (0.5 s, doubling, at most 8 s apart), or after the `Retry-After` the server
asks for (seconds or an HTTP date), until `retry_s` seconds have passed since the first attempt;
then the endpoint counts as down for the rest of the call, so the other requests of a stage fail
at once instead of each waiting out its own retries (an outage must not become b*K timed-out
calls). A wait that would end past `retry_s` is not begun. A request that gets no answer within
`timeout_s` is not retried and marks the endpoint down too. Other HTTP 4xx and an answer that is
not JSON are not retried: asking again would give the same.

Payloads are strict JSON: a NaN or infinity (a missing value in a parquet column) is sent as
`null`, since most servers refuse JSON's `NaN` extension.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import functools
import json
import math
import ssl
import time
from typing import Any

import httpx

from raftlm.rewards.terms import one_line

FIRST_DELAY_S, MAX_DELAY_S = 0.5, 8.0
RETRIED_4XX = (408, 429)  # request timeout, too many requests: busy, not wrong
BODY_BYTES = 120  # how much of an unexpected answer an error message quotes


class RequestFailed(Exception):
    """A request got no usable answer; the message is one line naming URL, status and body.
    `follow_on`: not sent because another request already found the server down, so the
    other request's failure is the one to report."""

    def __init__(self, message: str, follow_on: bool = False):
        super().__init__(message)
        self.follow_on = follow_on


class Endpoint:
    """One URL to POST JSON to, shared by the concurrent requests of one scoring call."""

    def __init__(self, url: str, timeout_s: float, retry_s: float,
                 headers: dict[str, str] | None = None):
        self.url, self.timeout_s, self.retry_s = url, timeout_s, retry_s
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.down: str | None = None  # why the endpoint gave up, once it has

    def client(self, concurrency: int) -> httpx.AsyncClient:
        """An HTTP client for one call (an event loop), with `concurrency` connections."""
        return httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s), verify=_tls_context(),
                                 limits=httpx.Limits(max_connections=concurrency))

    async def post(self, client: httpx.AsyncClient, payload: dict[str, Any]) -> Any:
        """POST `payload` as JSON and return the decoded answer, or raise RequestFailed."""
        content = json.dumps(_finite(payload), default=_jsonable, allow_nan=False).encode()
        started, delay, attempts = time.monotonic(), FIRST_DELAY_S, 0
        while True:
            if self.down is not None:
                raise RequestFailed(f"POST {self.url}: not sent, the server is down ({self.down})",
                                    follow_on=True)
            attempts += 1
            problem = await self._attempt(client, content)
            if not isinstance(problem, _Retry):
                return problem
            waited = time.monotonic() - started
            wait = delay if problem.retry_after is None else problem.retry_after
            if waited + wait > self.retry_s:
                tries = f"{attempts} attempt{'s' if attempts > 1 else ''} in {waited:.0f} s"
                asked = "" if problem.retry_after is None else (
                    f"; it asked to wait {problem.retry_after:g} s, past retry_s={self.retry_s:g}")
                self.down = f"{problem} after {tries}{asked}"
                raise RequestFailed(f"POST {self.url}: {problem} (gave up after {tries}{asked})")
            await asyncio.sleep(wait)
            delay = min(2 * delay, MAX_DELAY_S)

    async def _attempt(self, client: httpx.AsyncClient, content: bytes) -> Any:
        """The decoded answer, a _Retry saying what went wrong, or RequestFailed."""
        try:
            response = await client.post(self.url, content=content, headers=self.headers)
        except httpx.ConnectTimeout as err:
            return _Retry(f"{type(err).__name__}: cannot connect")
        except httpx.TimeoutException:
            self.down = f"no answer within timeout_s={self.timeout_s:g} s"
            raise RequestFailed(f"POST {self.url}: {self.down}") from None
        except httpx.TransportError as err:  # refused, reset, the server died mid-answer
            return _Retry(f"{type(err).__name__}: {one_line(err, 80) or 'connection lost'}")
        status = response.status_code
        if status >= 500 or status in RETRIED_4XX:
            return _Retry(f"HTTP {status}: {_body(response)}",
                          retry_after(response.headers.get("Retry-After")))
        if status >= 400:
            raise RequestFailed(f"POST {self.url}: HTTP {status}: {_body(response)}")
        try:
            return json.loads(response.content)
        except ValueError:
            raise RequestFailed(f"POST {self.url}: HTTP {status} but the answer is not JSON: "
                                f"{_body(response)}") from None


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """httpx's default TLS settings, built once: building them (loading the CA bundle) takes
    ~50 ms, which a client per scoring call would pay every stage and every evaluation."""
    return httpx.create_ssl_context()


class _Retry(str):
    """What a retryable attempt ran into, and how long the server asked to wait (None: not)."""

    retry_after: float | None

    def __new__(cls, problem: str, retry_after: float | None = None) -> _Retry:
        retry = super().__new__(cls, problem)
        retry.retry_after = retry_after
        return retry


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delay-seconds or an HTTP date); None when
    absent or unreadable (then the backoff decides)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000": HTTP dates are GMT anyway
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - time.time())


def _body(response: httpx.Response) -> str:
    text = response.content[:BODY_BYTES].decode("utf-8", errors="replace")
    return repr(one_line(text, BODY_BYTES)) if text.strip() else "(empty body)"


def _finite(value: Any) -> Any:
    """`value` with every non-finite float (numpy's too) replaced by None, so it is strict JSON."""
    if isinstance(value, float) or (hasattr(value, "dtype") and hasattr(value, "item")
                                    and getattr(value, "shape", None) == ()):
        number = value.item() if hasattr(value, "item") else value
        return number if not isinstance(number, float) or math.isfinite(number) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _finite(value.tolist())
    return value


def _jsonable(value: Any) -> Any:
    """numpy scalars and arrays (e.g. from parquet columns) as plain JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def quote(answer: Any) -> str:
    """The first bytes of an answer, for an error message."""
    return repr(one_line(json.dumps(answer, allow_nan=True) if not isinstance(answer, str)
                         else answer, BODY_BYTES))

