"""The reward section: its terms (a function, a reward model, a server or an LLM judge) and
what a failed term does. Re-exported by `sections.py`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from raftlm.config.schema import ConfigError, check_values, option


@dataclass
class JudgeConfig:
    """An LLM judge behind an OpenAI-compatible chat-completions API (docs/rewards.md)."""

    base_url: str = option("", "API root, e.g. http://127.0.0.1:8000/v1 (the judge POSTs to "
                           "BASE_URL/chat/completions).")
    model: str = option("", "The model name the server expects.")
    template: str = option(
        "Rate the response from 0 to 10.\n\nPrompt: {prompt}\n\nResponse: {completion}\n\n"
        "Answer with the number only.",
        "The user message; {prompt}, {completion} and prompt-file columns are filled in.")
    parse: str = option(
        r"(?i)^\s*(?:(?:score|rating|grade)\s*[:=]?\s*)?"
        r"(-?\d+(?:\.\d+)?)\s*(?:/\s*10)?\s*\.?\s*$",
        "Regex; its first match in the answer (its first group, if it has one) is the score. "
        "The default takes a whole answer that is one grade ('7', '7/10', 'Score: 7.5'), never "
        "a number inside other text ('98 + 94 = ').")
    grade_range: list[float] | None = option(
        [0.0, 10.0], "[low, high]: a grade outside it is that item's failure (reward.on_error); "
        "null: any number.")
    max_tokens: int = option(16, "Longest judge answer.")
    temperature: float = option(0.0, "The judge's sampling temperature.")
    system: str | None = option(None, "A system message before the template's.")
    api_key_env: str | None = option(None, "Environment variable with the API key (Bearer).")


@dataclass
class RewardTerm:
    # A list item written as a plain string fills this field: `- numeric_answer`.
    string_form: ClassVar[str] = "name"
    # The keys that say what kind of term this is; a term sets exactly one of them
    # (`raftlm.rewards.reward.TERM_KINDS` builds each kind).
    kinds: ClassVar[tuple[str, ...]] = ("name", "model", "url", "judge")

    name: str = option("", "Built-in (numeric_answer, math_answer, environment_return), "
                       "`pkg.mod:fn` or `file.py:fn`.")
    model: str | None = option(None, "Local HF sequence-classification reward model folder.")
    url: str | None = option(None, "A reward server: http://HOST:PORT/PATH (docs/rewards.md).")
    judge: JudgeConfig | None = option(None, "An LLM judge (OpenAI-compatible API).")
    weight: float = option(1.0, "Weight in the summed reward.")
    batch_size: int = option(16, "Reward model: sequences per forward pass; url: completions "
                             "per request.")
    label: str | None = option(None, "The term's name in metrics (reward/<label>/mean) and "
                               "candidates.jsonl; default: the function's or folder's name.")
    concurrency: int = option(4, "url, judge: requests in flight at once.")
    timeout_s: float = option(60.0, "url, judge: seconds one request may take; async function: "
                              "one call.")
    retry_s: float = option(60.0, "url, judge: retry connection errors and HTTP 5xx with "
                            "backoff for up to this long; 0 = never.")

    def check(self, where: str) -> None:
        """Raise ConfigError naming `where.field` for a value types alone do not rule out."""
        kinds = [kind for kind in self.kinds if getattr(self, kind)]
        if len(kinds) != 1:
            raise ConfigError(f"{where}: expected exactly one of "
                              f"{', '.join(f'`{k}`' for k in self.kinds)}, got {kinds or 'none'}")
        check_values(self, where, [
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("concurrency", self.concurrency >= 1, ">= 1"),
            ("timeout_s", self.timeout_s > 0, "> 0"),
            ("retry_s", self.retry_s >= 0, ">= 0"),
            ("url", not self.url or self.url.startswith(("http://", "https://")),
             "an http:// or https:// URL"),
            ("judge.base_url", not self.judge or self.judge.base_url.startswith(
                ("http://", "https://")), "an http:// or https:// URL"),
            ("judge.model", not self.judge or bool(self.judge.model), "a model name"),
            ("judge.max_tokens", not self.judge or self.judge.max_tokens >= 1, ">= 1"),
            ("judge.grade_range", not self.judge or self.judge.grade_range is None or (
                len(self.judge.grade_range) == 2
                and self.judge.grade_range[0] < self.judge.grade_range[1]),
             "[low, high] with low < high, or null"),
        ])


@dataclass
class RewardConfig:
    terms: list[RewardTerm] = field(
        default_factory=lambda: [RewardTerm(name="numeric_answer")],
        metadata={"help": "Reward terms; the reward is their weighted sum."},
    )
    on_error: str = option("raise", "raise: stop the run; skip: drop the candidate and count it.",
                           choices=("raise", "skip"))

