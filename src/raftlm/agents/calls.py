"""Tool calls as the model writes them: the Hermes/Qwen format TRL parses,

    <tool_call>{"name": "calculator", "arguments": {"expression": "12 * 34"}}</tool_call>

and the default system prompt that teaches it to chat templates without tool support (the
embedded SmolLM2's ChatML). Small models need to see the format: the prompt lists the tools'
JSON schemas and carries one call built from the first tool's schema.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.DOTALL)
# A placeholder value per JSON type, for an example call whose tool gives no better one.
_PLACEHOLDER = {"string": "text", "integer": 1, "number": 1.5, "boolean": True, "array": [],
                "object": {}}


@dataclass(frozen=True)
class ToolCall:
    """One call the model wrote: the tool's name and its arguments, or why it did not parse
    (`problem`: the model sees it as an error observation)."""

    name: str | None
    arguments: dict[str, Any]
    problem: str | None = None  # set: the call did not parse


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every `<tool_call>{...}</tool_call>` of a model turn, in order. A call whose body is not a
    JSON object with a string `name` and an object `arguments` (or a JSON string holding one,
    as OpenAI's API writes it), and a `<tool_call>` never closed, come back with a `problem`."""
    calls = [_parse_one(body) for body in _CALL.findall(text)]
    tail = text[text.rfind(CALL_CLOSE) + len(CALL_CLOSE):] if CALL_CLOSE in text else text
    if CALL_OPEN in tail:
        calls.append(ToolCall(None, {}, f"{CALL_OPEN} without {CALL_CLOSE}"))
    return calls


def _parse_one(body: str) -> ToolCall:
    try:
        value = json.loads(body.strip())
    except ValueError as err:
        return ToolCall(None, {}, f"not JSON ({err})")
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return ToolCall(None, {}, 'expected {"name": "...", "arguments": {...}}')
    arguments = value.get("arguments", {})
    if isinstance(arguments, str):  # OpenAI's function.arguments is a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    if not isinstance(arguments, dict):
        return ToolCall(value["name"], {}, '"arguments" must be a JSON object')
    return ToolCall(value["name"], arguments)


def format_call(name: str, arguments: dict[str, Any]) -> str:
    """The text of one call, as the model should write it."""
    return f"{CALL_OPEN}{json.dumps({'name': name, 'arguments': arguments})}{CALL_CLOSE}"


@dataclass(frozen=True)
class ToolChoice:
    """A `rollout.tool_choice` (OpenAI's and vLLM's): what a first model turn starts with,
    written for the model (prefilled) rather than by it."""

    opening: str


# `auto`: nothing, the model chooses. `required`: a call's opening up to the tool's name. A
# tool's name (not a key here) forces that tool: its call as far as its schema decides the bytes
# (`forced_opening`). The bytes are format_call's, the default prompt's example call.
TOOL_CHOICES: dict[str, ToolChoice] = {
    "auto": ToolChoice(""),
    "required": ToolChoice(format_call("", {}).partition('""')[0] + '"'),  # <tool_call>{"name": "
}


def forced_opening(tool_choice: str, schemas: list[dict[str, Any]]) -> str:
    """The text a first turn starts with under `tool_choice` (a key of TOOL_CHOICES or the name
    of one of the tools, given by their JSON `schemas`); ValueError naming the tools for
    anything else, and for a forced call without tools (a step-shaped environment has none)."""
    names = [schema["function"]["name"] for schema in schemas]
    choice = TOOL_CHOICES.get(tool_choice)
    opening = None if choice is None else choice.opening
    if opening is None and tool_choice in names:
        opening = _forced_call(schemas[names.index(tool_choice)])
    if opening is None or (opening and not names):
        raise ValueError(f"expected {', '.join(TOOL_CHOICES)} or a tool's name "
                         f"({', '.join(names) or 'no tools'}), got {tool_choice!r}")
    return opening


def _forced_call(schema: dict[str, Any]) -> str:
    """A forced tool's call up to where the model's choice begins, as decoding constrained to
    the schema would force it: through `"arguments": {`, and for a tool of one required
    parameter through that parameter's name (and a string's opening quote), so the model writes
    only the value: `<tool_call>{"name": "calculator", "arguments": {"expression": "`."""
    name = schema["function"]["name"]
    parameters = schema["function"].get("parameters", {})
    properties = parameters.get("properties", {})
    if len(properties) != 1 or list(properties) != parameters.get("required", []):
        return format_call(name, {}).removesuffix("}}" + CALL_CLOSE)
    (key,) = properties
    text = format_call(name, {key: "\x01"})  # the value's place: json writes "\u0001"
    value = text.index('"\\u0001"')
    return text[:value + (properties[key].get("type") == "string")]


def example_arguments(schema: dict[str, Any], tool: Any = None) -> dict[str, Any]:
    """Arguments for an example call of a tool: its `example_arguments` attribute when it has
    one, else each required parameter's default or a placeholder of its JSON type."""
    given = getattr(tool, "example_arguments", None)
    if isinstance(given, dict):
        return dict(given)
    parameters = schema["function"].get("parameters", {})
    properties = parameters.get("properties", {})
    return {name: _PLACEHOLDER.get(properties.get(name, {}).get("type"), "text")
            for name in parameters.get("required", [])}


def default_system_prompt(schemas: list[dict[str, Any]], example: dict[str, Any]) -> str:
    """The system prompt for chat templates without tool support: the tools' schemas, the call
    format, and one example call (`example`: arguments of the first tool)."""
    listed = "\n".join(json.dumps(schema) for schema in schemas)
    first = schemas[0]["function"]["name"]
    return (
        "You can call tools. The tools, as JSON schemas:\n"
        f"<tools>\n{listed}\n</tools>\n"
        "To call a tool, write the call and stop:\n"
        f'{CALL_OPEN}{{"name": <tool name>, "arguments": {{<arguments>}}}}{CALL_CLOSE}\n'
        "Its result comes back in a tool message. When you know the answer, reply with it "
        "without a tool call.\n"
        f"Example:\n{format_call(first, example)}"
    )
