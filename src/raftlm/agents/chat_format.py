"""How a trajectory is written in the chat template: the prompt (with the tools), and each
observation's tokens, appended after the model's own.

Token-in, token-out: a trajectory is never re-tokenized. The model's tokens are the sampler's;
an observation is rendered as the template's tool (or user) message, tokenized once and
appended. That is the conversation the template would write only when the template is
prefix-preserving (rendering one more message appends text and changes none before it), which
`ChatFormat` checks once and refuses, in one line, when it is not (raftlm does not patch
templates, as TRL does for a few).
"""

from __future__ import annotations

from typing import Any

from raftlm.agents.calls import default_system_prompt, example_arguments
from raftlm.agents.tools import Tool
from raftlm.errors import UserError
from raftlm.sampling.shared_prefix import rendered_prefix

_PROBE_USER, _PROBE_MODEL = "raftlm probe question", "raftlm probe answer"
_PROBE_TOOL = [{"role": "tool", "name": "probe", "content": "raftlm probe result"}]


class TemplateError(UserError, ValueError):
    """The chat template cannot hold a token-in, token-out trajectory."""


class ChatFormat:
    """The chat template of one run's tokenizer, with its tools: prompts and observations as
    token ids. Templates with tool support (`apply_chat_template(tools=...)`: Qwen2.5, Qwen3,
    Llama 3.1) render the tools themselves; others (ChatML) get `default_system_prompt`."""

    def __init__(self, tokenizer: Any, tools: list[Tool]):
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError("rollout: multi-turn rollouts need a tokenizer with a chat "
                                "template (the tool and model turns are its messages)")
        self.tokenizer = tokenizer
        self.schemas = [tool.schema for tool in tools]
        probe = [{"role": "user", "content": _PROBE_USER}]
        self.native_tools = bool(tools) and self._render(probe, True) != self._render(
            probe, True, with_tools=False)
        self.system_prompt = None if self.native_tools or not tools else default_system_prompt(
            self.schemas, example_arguments(tools[0].schema, tools[0].fn))
        self._check_prefix_preserving(probe)

    def prompt_ids(self, prompt: str | list[dict], system_prompt: str | None = None,
                   extra: str | None = None) -> list[int]:
        """`prompt`'s token ids."""
        return self.prompt(prompt, system_prompt, extra)[1]

    def prompt(self, prompt: str | list[dict], system_prompt: str | None = None,
               extra: str | None = None) -> tuple[str, list[int]]:
        """The text and token ids of a prompt (text or chat messages) as the model sees it:
        with the run's system prompt (`data.system_prompt`), the tools, and `extra` (an
        environment's `reset` text) appended to the last user message."""
        messages = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
                    else [dict(m) for m in prompt])
        if extra:
            last = max(i for i, m in enumerate(messages) if m["role"] == "user")
            messages[last]["content"] += f"\n\n{extra}"
        if system_prompt is not None and messages[0]["role"] != "system":  # as data/ does
            messages.insert(0, {"role": "system", "content": system_prompt})
        if self.system_prompt and messages[0]["role"] == "system":
            messages[0]["content"] += f"\n\n{self.system_prompt}"
        elif self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        text = self._render(messages, True)
        return text, self._ids(text)

    def shared_prefix(self, system_prompt: str | None = None) -> list[int]:
        """The token ids every text prompt of the run starts with (its system prompt, the
        tools, the user header): what the sampler prefills once per call."""
        return rendered_prefix(lambda text: self.prompt_ids(text, system_prompt))

    def observation_ids(self, messages: list[dict], after: list[int]) -> list[int]:
        """The token ids that follow a model turn `after` (its token ids) when `messages` (tool
        or user messages) answer it: what the template closes the turn with, less the
        end-of-turn token the model already wrote, then the messages and the next turn's
        opening."""
        turn = [{"role": "user", "content": _PROBE_USER},
                {"role": "assistant", "content": _PROBE_MODEL}]
        closed = self._render(turn, False)
        full = self._render(turn + messages, True)
        if not full.startswith(closed):
            raise TemplateError(self._not_prefix_preserving("a tool or user message"))
        tail = closed[closed.rindex(_PROBE_MODEL) + len(_PROBE_MODEL):]
        ended = self.tokenizer.decode(after[-1:], skip_special_tokens=False) if after else ""
        if ended and tail.startswith(ended):
            tail = tail[len(ended):]
        return self._ids(tail + full[len(closed):])

    def _check_prefix_preserving(self, probe: list[dict]) -> None:
        """The model's turn follows the prompt as the template writes it, and a tool message
        after it only appends: else a trajectory's tokens would not be the conversation's."""
        asked = self._render(probe, True)
        answered = self._render(probe + [{"role": "assistant", "content": _PROBE_MODEL}], False)
        if not answered.startswith(asked + _PROBE_MODEL):
            raise TemplateError(self._not_prefix_preserving("the model's turn"))
        self.observation_ids(_PROBE_TOOL, [])

    def _not_prefix_preserving(self, what: str) -> str:
        name = getattr(self.tokenizer, "name_or_path", "") or "the tokenizer"
        return (f"rollout: {name}'s chat template is not prefix-preserving: rendering {what} "
                "changes the text before it, and raftlm never re-tokenizes a conversation "
                "(docs/agents.md); use a template whose messages only append")

    def _render(self, messages: list[dict], generation_prompt: bool, with_tools: bool = True
                ) -> str:
        tools = self.schemas if with_tools and self.schemas else None
        return self.tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)

    def _ids(self, text: str) -> list[int]:
        # The template holds the special tokens it wants: no second BOS (as data/prompts does).
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]
