"""OpenAI `tools` in `raftlm serve`'s chat completions: the server renders the tools into the
prompt and, when the model writes a call, answers it as `tool_calls` (finish_reason
`tool_calls`), so the client runs the tool and drives the loop itself, as with OpenAI or vLLM.

- `tools`: `[{"type": "function", "function": {"name", "description"?, "parameters"?}}]`, shown
  to the model as raftlm's rollouts show them (the template's own tool support, else the
  default tool prompt with an example call, `raftlm.agents.chat_format`);
- `tool_choice`: `auto` (default), `none` (the tools are not shown), `required`, or
  `{"type": "function", "function": {"name": ...}}`: forced function calling, the answer starts
  with the call's opening, prefilled as `rollout.tool_choice` does (`agents.calls`);
- the conversation sent back: an assistant message's `tool_calls` are written in the model's
  call format (`<tool_call>{...}</tool_call>`), a `tool` message is the tool's result, named
  by its `name` or by the `tool_call_id` of the call it answers;
- a model turn stops at `</tool_call>`; its calls are parsed as rollouts parse them, and a call
  that does not parse is left in `content` (finish_reason `stop`), as vLLM's parsers do.
Streamed (`stream: true`), the text before a call streams as `content` and the call comes whole,
in one `tool_calls` chunk, once the turn ends (`serve_api.streamed_text`).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from raftlm.agents.calls import (
    CALL_CLOSE,
    CALL_OPEN,
    forced_opening,
    format_call,
    parse_tool_calls,
)
from raftlm.agents.chat_format import ChatFormat
from raftlm.agents.tools import Tool

CHOICES = ("auto", "none", "required")  # OpenAI's strings; an object names one function


class ToolRequestError(ValueError):
    """A `tools` / `tool_choice` / message field the server refuses: the field at fault."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def parse_tools(fields: dict[str, Any]) -> tuple[tuple[dict[str, Any], ...], str]:
    """The request's tools as JSON schemas (empty: none shown) and its tool choice: `auto`,
    `required` or a function's name (`none` shows no tools)."""
    tools = fields.get("tools", [])
    if not isinstance(tools, list):
        raise ToolRequestError("'tools' must be a list of {\"type\": \"function\", ...}", "tools")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise ToolRequestError(f"'tools[{i}]': only {{\"type\": \"function\"}} tools are "
                                   "supported", f"tools[{i}]")
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ToolRequestError(f"'tools[{i}].function' must be an object with a 'name'",
                                   f"tools[{i}].function")
    choice = fields.get("tool_choice", "auto")
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get(
            "type") == "function" else None
        if not isinstance(name, str):
            raise ToolRequestError("'tool_choice' object must be {\"type\": \"function\", "
                                   "\"function\": {\"name\": ...}}", "tool_choice")
        choice = name
    elif choice not in CHOICES:
        raise ToolRequestError(f"'tool_choice' must be one of {', '.join(CHOICES)} or an "
                               f"object naming a function, got {choice!r:.60}", "tool_choice")
    if choice == "none" or not tools:
        return (), "auto"
    schemas = tuple({"type": "function", "function": dict(t["function"])} for t in tools)
    try:
        forced_opening(choice, list(schemas))
    except ValueError as err:
        raise ToolRequestError(f"'tool_choice': {err}", "tool_choice") from None
    return schemas, choice


def message_with_calls(message: dict[str, Any], content: str, where: str,
                       names: dict[str, str]) -> dict[str, str]:
    """One message of the conversation as the chat template reads it: an assistant message's
    `tool_calls` folded into its text in the model's call format (their ids remembered in
    `names`), a tool message named after the call it answers."""
    role = message["role"]
    if role == "assistant" and message.get("tool_calls"):
        calls = []
        for j, call in enumerate(message["tool_calls"]):
            function = call.get("function") if isinstance(call, dict) else None
            try:
                arguments = json.loads(function.get("arguments") or "{}")
                name = function["name"]
            except (AttributeError, KeyError, TypeError, ValueError):
                raise ToolRequestError(f"'{where}.tool_calls[{j}]' must be {{\"function\": "
                                       "{\"name\", \"arguments\": JSON text}}",
                                       f"{where}.tool_calls") from None
            names[call.get("id", "")] = name
            calls.append(format_call(name, arguments))
        return {"role": role, "content": content + "".join(calls)}
    if role == "tool":
        name = message.get("name") or names.get(message.get("tool_call_id", ""), "tool")
        return {"role": role, "name": name, "content": content}
    return {"role": role, "content": content}


def tool_prompt(tokenizer: Any, messages: list[dict[str, str]], system_prompt: str | None,
                schemas: tuple[dict[str, Any], ...], choice: str) -> list[int]:
    """The prompt's token ids with the tools shown, and the forced call's opening appended as
    ids (as a rollout prefills it)."""
    tools = [Tool(s["function"]["name"], None, s) for s in schemas]  # type: ignore[arg-type]
    _, ids = ChatFormat(tokenizer, tools).prompt(messages, system_prompt)
    opening = opening_of(schemas, choice)
    return ids + (tokenizer(opening, add_special_tokens=False)["input_ids"] if opening else [])


def opening_of(schemas: tuple[dict[str, Any], ...], choice: str) -> str:
    """The text the answer starts with under `choice` (empty: the model chooses)."""
    return forced_opening(choice, list(schemas)) if schemas else ""


def stop_strings(schemas: tuple[dict[str, Any], ...]) -> tuple[str, ...]:
    """The stop strings tools add: a turn ends at its call's close."""
    return (CALL_CLOSE,) if schemas else ()


def answer_message(text: str, schemas: tuple[dict[str, Any], ...], choice: str
                   ) -> tuple[dict[str, Any], bool]:
    """The assistant message of a sampled `text` (the forced opening put back in front) and
    whether it is a call: `tool_calls` with the text before the first call as `content`."""
    whole = opening_of(schemas, choice) + text
    calls = parse_tool_calls(whole) if schemas else []
    if not calls or any(call.problem for call in calls):
        return {"role": "assistant", "content": whole}, False
    before = whole[:whole.index(CALL_OPEN)].rstrip()  # what a stream sends before the call
    return {"role": "assistant", "content": before or None,
            "tool_calls": [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                            "function": {"name": call.name,
                                         "arguments": json.dumps(call.arguments)}}
                           for call in calls]}, True
