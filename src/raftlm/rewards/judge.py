"""The LLM-judge term `reward.terms[].judge`: an OpenAI-compatible chat model grades each
completion, and a regex reads the grade from its answer.

One request per completion, `concurrency` in flight::

    POST BASE_URL/chat/completions
    {"model": MODEL, "messages": [{"role": "user", "content": TEMPLATE.format(...)}],
     "max_tokens": ..., "temperature": ...}

The template is filled with `{prompt}` (a chat prompt's messages, their contents one per line),
`{completion}` and any prompt-file column (`{answer}`). The first match of `parse` in the
answer's content (its first group, if it has one) is the score; an answer it does not match, or
a grade outside `grade_range`, is that item's failure, which `reward.on_error` decides about.
The default template asks for a grade from 0 to 10 and the number only, so `GRADE_PARSE` takes
an answer that is the grade alone ("7", "7/10", "Score: 7.5"), never a number inside a sentence
or a sum ("98 + 94 = ").
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import string
from typing import TYPE_CHECKING, Any

from raftlm.config import ConfigError
from raftlm.rewards.http import Endpoint, RequestFailed, quote
from raftlm.rewards.terms import TermFailure

if TYPE_CHECKING:
    from raftlm.config import JudgeConfig, RewardTerm

CHUNK_WINDOWS = 4  # a journaled chunk holds this many full windows of requests in flight
# What the config's defaults (`judge.parse`, `judge.grade_range`) must equal: the whole answer
# is one grade, optionally labelled or out of 10, within the default template's 0-10 scale.
GRADE_PARSE = (r"(?i)^\s*(?:(?:score|rating|grade)\s*[:=]?\s*)?"
               r"(-?\d+(?:\.\d+)?)\s*(?:/\s*10)?\s*\.?\s*$")
GRADE_RANGE = (0.0, 10.0)


class JudgeReward:
    """Grades each completion with a chat model behind an OpenAI-compatible API."""

    blame_items = False  # each item is its own request already; retrying would only repeat it

    def __init__(self, config: JudgeConfig, concurrency: int = 4, timeout_s: float = 60.0,
                 retry_s: float = 60.0, grade_range: tuple[float, float] | None = None):
        self.config, self.concurrency = config, concurrency
        self.grade_range = grade_range
        self.timeout_s, self.retry_s = timeout_s, retry_s
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        try:
            self.pattern = re.compile(config.parse)
        except re.error as err:
            raise ConfigError(f"judge.parse: not a regex ({err}): {config.parse!r}") from None
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(config.template) if name}
        except ValueError as err:
            raise ConfigError(f"judge.template: {err}: {config.template[:60]!r}") from None
        self.columns_needed = sorted(fields - {"prompt", "completion"})
        self.chunk_size = concurrency * CHUNK_WINDOWS
        self.headers = {}
        if config.api_key_env:
            key = os.environ.get(config.api_key_env)
            if not key:
                raise ConfigError(f"judge.api_key_env: ${config.api_key_env} is not set")
            self.headers["Authorization"] = f"Bearer {key}"

    def messages(self, prompt: Any, completion: str, columns: dict[str, Any]) -> list[dict]:
        """The judge's chat messages for one completion."""
        text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
        content = self.config.template.format(**{**columns, "prompt": text,
                                                 "completion": completion})
        system = [{"role": "system", "content": self.config.system}] if self.config.system else []
        return [*system, {"role": "user", "content": content}]

    def grade(self, answer: str) -> float:
        """The number `parse` reads from the judge's answer, within `grade_range`; ValueError
        when it reads none or one outside."""
        match = self.pattern.search(answer)
        text = None if match is None else (match.group(1) if self.pattern.groups else match[0])
        try:
            grade = float(text)
        except (TypeError, ValueError):
            raise ValueError(f"the judge's answer does not parse with {self.config.parse!r}: "
                             f"{quote(answer)}") from None
        low, high = self.grade_range or (-math.inf, math.inf)
        if not low <= grade <= high:
            raise ValueError(f"the judge's grade {grade:g} is outside grade_range "
                             f"[{low:g}, {high:g}]: {quote(answer)}")
        return grade

    async def __call__(self, prompts: list, completions: list[str], **columns: list
                       ) -> list[float]:
        endpoint = Endpoint(self.url, self.timeout_s, self.retry_s, self.headers)
        limit = asyncio.Semaphore(self.concurrency)

        async def one(i: int) -> float:
            request = {
                "model": self.config.model, "max_tokens": self.config.max_tokens,
                "temperature": self.config.temperature,
                "messages": self.messages(prompts[i], completions[i],
                                          {k: v[i] for k, v in columns.items()}),
            }
            async with limit:
                answer = await endpoint.post(client, request)
            return self.grade(answer_text(answer, self.url))

        async with endpoint.client(self.concurrency) as client:
            outcomes = await asyncio.gather(*(one(i) for i in range(len(completions))),
                                            return_exceptions=True)
        scores: list[Any] = [None] * len(completions)
        failures = []
        for i, outcome in enumerate(outcomes):
            if isinstance(outcome, (RequestFailed, ValueError)):
                failures.append((i, outcome))
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                scores[i] = outcome
        if failures:
            i, first = failures[0]
            more = f" ({len(failures) - 1} more of {len(outcomes)} failed)" if len(failures) > 1 \
                else ""
            raise TermFailure(f"{first} [item {i}]{more}", scores)
        return scores


def answer_text(answer: Any, url: str) -> str:
    """choices[0].message.content of a chat-completions answer."""
    try:
        content = answer["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        content = None
    if not isinstance(content, str):
        raise RequestFailed(f"POST {url}: not a chat completion (no choices[0].message.content): "
                            f"{quote(answer)}")
    return content


def build_judge_term(term: RewardTerm) -> JudgeReward:
    """`judge:` an LLM judge."""
    grade_range = term.judge.grade_range
    return JudgeReward(term.judge, term.concurrency, term.timeout_s, term.retry_s,
                       tuple(grade_range) if grade_range else None)


def judge_label(config: JudgeConfig) -> str:
    """A judge term's default name in metrics."""
    return "judge"
