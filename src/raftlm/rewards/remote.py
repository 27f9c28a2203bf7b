"""The remote term `reward.terms[].url`: POST batches of completions to a reward server.

Protocol (docs/rewards.md has the details and the relation to OpenRLHF's `--remote_rm_url`)::

    POST URL  {"prompts": [...], "completions": [...], "columns": {"answer": [...], ...},
               "query": [...], "stage": 3, "step": 40}
    200       {"rewards": [0.0, 1.0, ...]}          one number per completion, in order

`prompts` are the prompts as in the data (text or chat messages), `query` each prompt as the
model saw it (chat template applied) followed by its completion and the end-of-turn token it
stopped on, as OpenRLHF's reward-model server expects; `stage` and `step` are present when
known; a missing column value is `null`. `raftlm serve-reward` serves any reward term this way
(and OpenRLHF's request shape too).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from raftlm.rewards.http import Endpoint, RequestFailed, quote
from raftlm.rewards.terms import TermFailure, WrongCount, invalid

if TYPE_CHECKING:
    from raftlm.config import RewardTerm

CHUNK_WINDOWS = 4  # a journaled chunk holds this many full windows of requests in flight


class RemoteReward:
    """Scores batches of `batch_size` completions on a server, `concurrency` requests at once."""

    blame_items = False  # a failed request is an outage or a bad answer, not one bad candidate

    def __init__(self, url: str, batch_size: int = 16, concurrency: int = 4,
                 timeout_s: float = 60.0, retry_s: float = 60.0):
        self.url, self.batch_size, self.concurrency = url, batch_size, concurrency
        self.timeout_s, self.retry_s = timeout_s, retry_s
        self.chunk_size = batch_size * concurrency * CHUNK_WINDOWS

    async def __call__(self, prompts: list, completions: list[str], *, stage: int | None = None,
                       step: int | None = None, queries: list[str] | None = None,
                       **columns: list) -> list[float]:
        endpoint = Endpoint(self.url, self.timeout_s, self.retry_s)
        starts = list(range(0, len(completions), self.batch_size))
        limit = asyncio.Semaphore(self.concurrency)

        async def batch(start: int) -> list[Any]:
            end = min(start + self.batch_size, len(completions))
            payload = {
                "prompts": prompts[start:end], "completions": completions[start:end],
                "columns": {key: values[start:end] for key, values in columns.items()},
            }
            if queries is not None:
                payload["query"] = queries[start:end]
            payload.update({k: v for k, v in (("stage", stage), ("step", step)) if v is not None})
            async with limit:
                answer = await endpoint.post(client, payload)
            return rewards_of(answer, end - start, self.url)

        async with endpoint.client(self.concurrency) as client:
            outcomes = await asyncio.gather(*(batch(s) for s in starts), return_exceptions=True)
        scores: list[Any] = [None] * len(completions)
        failures: list[str] = []  # one line each: what failed, for which completions
        follow_ons: list[str] = []  # batches not sent once the server was down: reported last
        for start, outcome in zip(starts, outcomes):
            end = min(start + self.batch_size, len(completions))
            if isinstance(outcome, RequestFailed):
                line = f"{outcome} [completions {start}-{end - 1}]"
                (follow_ons if outcome.follow_on else failures).append(line)
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                for i, value in enumerate(outcome, start):
                    if (problem := invalid(value)) is None:
                        scores[i] = value
                    else:  # only this completion fails; its batch's others keep their scores
                        failures.append(f"POST {self.url}: answered {problem} for completion "
                                        f"{i} ({completions[i][:40]!r})")
        failures += follow_ons
        if failures:
            more = f" ({len(failures) - 1} more failures)" if len(failures) > 1 else ""
            raise TermFailure(failures[0] + more, scores)
        return scores


def rewards_of(answer: Any, expected: int, url: str) -> list[Any]:
    """The `rewards` list of a server's answer; WrongCount when it has another length."""
    rewards = answer.get("rewards") if isinstance(answer, dict) else None
    if not isinstance(rewards, list):
        raise RequestFailed(f"POST {url}: the answer has no 'rewards' list: {quote(answer)}")
    if len(rewards) != expected:
        raise WrongCount(f"POST {url}: answered {len(rewards)} rewards for {expected} "
                         f"completions: {quote(rewards)}")
    return rewards


def build_remote_term(term: RewardTerm) -> RemoteReward:
    """`url:` a reward server."""
    return RemoteReward(term.url, term.batch_size, term.concurrency, term.timeout_s, term.retry_s)


def remote_label(url: str) -> str:
    """A remote term's default name in metrics."""
    return "remote"
