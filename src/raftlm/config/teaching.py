"""Samples the policy did not draw on its own: STaR's hints (`raft.hints`) and a teacher's
samples (`generation.teacher`), docs/teaching.md. Re-exported by `sections.py`."""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

from raftlm.config.schema import ConfigError, check_values, option


@dataclass
class HintsConfig:
    """raft.hints: STaR's rationalization. Prompts none of whose samples is accepted are
    sampled again with the reference answer in the prompt; responses that reach it without
    quoting the hint are trained on under the original prompt. Absent: no hints."""

    enabled: bool = option(True, "Hint the prompts none of whose samples is accepted.")
    template: str = option(
        "{prompt}\n\nHint: the answer is {answer}.",
        "The hinted prompt: {prompt} (the prompt's text, or its last user message) and "
        "{answer} (the prompt row's answer_field).")
    answer_field: str = option("answer", "The prompt file's column with the reference answer.")
    samples: int = option(0, "Hinted samples per unsolved prompt; 0 = raft.samples_per_prompt.")
    accept_reward: float | None = option(
        None, "A response is accepted (and a hinted one kept) at this reward or above; null: "
        "selection.min_reward.")
    quote_markers: list[str] = option(
        ["hint"], "A hinted response containing one of these (or the hint itself), case and "
        "spacing aside, quotes the hint and is not kept.")

    def check(self, where: str) -> None:
        """Raise ConfigError naming `where.field` for a value types alone do not rule out."""
        if self.samples < 0:
            raise ConfigError(f"{where}.samples: expected >= 0, got {self.samples}")
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(self.template) if name}
        except ValueError as err:
            raise ConfigError(f"{where}.template: not a format string ({err})") from None
        if "answer" not in names or not names <= {"prompt", "answer"}:
            raise ConfigError(f"{where}.template: expected {{prompt}} and {{answer}} (and no "
                              f"other field), got {self.template!r}")


@dataclass
class TeacherConfig:
    """generation.teacher: a share of each prompt's K sampled by another model. Absent: the
    policy samples all K."""

    model: str = option(
        "", "A local model (HF folder, .gguf, embedded:...) with the policy's tokenizer; with "
        "base_url, the model name the server expects.")
    gguf_file: str | None = option(None, "GGUF file name inside `model`, when it is a folder.")
    base_url: str | None = option(
        None, "An OpenAI-compatible API root (http://host:port/v1): the teacher answers "
        "POST base_url/chat/completions; null: `model` is loaded beside the policy.")
    share: float = option(0.25, "Share of each prompt's K the teacher samples (rounded, >= 1).")
    temperature: float | None = option(None, "The teacher's temperature; null: the policy's.")
    api_key_env: str | None = option(None, "base_url: environment variable with the API key.")
    concurrency: int = option(4, "base_url: requests in flight at once.")
    timeout_s: float = option(120.0, "base_url: seconds one request may take.")

    def samples(self, k: int) -> int:
        """How many of a prompt's K samples are the teacher's."""
        return min(k, max(1, round(self.share * k)))

    def check(self, where: str) -> None:
        """Raise ConfigError naming `where.field` for a value types alone do not rule out."""
        check_values(self, where, [
            ("model", bool(self.model), "a model path, or the served model's name"),
            ("share", 0 < self.share <= 1, "in (0, 1]"),
            ("temperature", self.temperature is None or self.temperature > 0, "> 0 or null"),
            ("concurrency", self.concurrency >= 1, ">= 1"),
            ("timeout_s", self.timeout_s > 0, "> 0"),
        ])


def active_hints(config: Any) -> HintsConfig | None:
    """`raft.hints` when present and enabled, else None."""
    hints = config.raft.hints
    return hints if hints is not None and hints.enabled else None
