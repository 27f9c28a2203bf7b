"""The tokens every templated prompt starts with, which raftlm's sampler prefills once per call.

A chat template puts the same turns before each prompt's own text: SmolLM2's default system
turn and the user header are 24 of an arithmetic prompt's 40 tokens. `PromptKV` computes their
KV once per call and prefills each prompt that starts with them from there on.

The prefix comes from the tokenizer's template alone, not from the call's prompts: a prompt's
samples must not depend on which prompts share its call (`raftlm.sampling.fast`), and the
longest prefix a call's prompts have in common moves with sharding and batching, and each
prompt's split point with it. The template's prefix is the same in every call of a run, so a
prompt is split at the same place wherever it is sampled. Prompts that do not start with it (a
configured `data.system_prompt`, text without a template) are prefilled whole, as before. A
multi-turn run passes its own prefix (`rendered_prefix`: the tool system prompt and the user
header, hundreds of tokens), the same in every call of the run too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from raftlm.data.prompts import render_chat

# Two user messages that differ from their first character on.
_SENTINELS = ("0", "x")


def template_prefix(tokenizer: Any) -> list[int]:
    """The token ids the chat template renders before a user message's text (none without a
    template), as `raftlm.data.prompts` renders prompts without a system prompt."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    return rendered_prefix(lambda text: render_chat(text, tokenizer)[1])


def rendered_prefix(render: Callable[[str], list[int]]) -> list[int]:
    """The token ids `render(user_text)` puts before any user text: a run's fixed turns before
    it (a multi-turn run's tools and system prompt, `agents.chat_format`), from the run's
    settings alone, as `template_prefix`."""
    first, second = (render(text) for text in _SENTINELS)
    # The renderings agree up to the user's text; a token that merged the template's last
    # characters with the text differs between them, so it is left out too.
    same = 0
    while same < min(len(first), len(second)) and first[same] == second[same]:
        same += 1
    return first[:same]
