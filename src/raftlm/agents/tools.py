"""Tools: plain typed Python functions with a docstring (TRL's `tools=` shape), their JSON
schemas, and running the calls a turn made.

A tool's schema comes from its signature and docstring (transformers' `get_json_schema`, which
chat templates with tool support also take). Every failure of a call (it did not parse, names
an unknown tool, has bad arguments, raised, timed out) becomes an error observation the model
sees, and is counted; none stops the run.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from raftlm.agents.calculator import calculator
from raftlm.agents.calls import ToolCall
from raftlm.config import ConfigError
from raftlm.config.registry import load_object

BUILTIN_TOOLS: dict[str, Callable[..., Any]] = {"calculator": calculator}

# The error kinds a call's outcome may carry (`Outcome.error`); "parse" is counted apart too.
ERRORS = ("parse", "unknown_tool", "bad_arguments", "raised", "timeout")
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    "array": (list, tuple), "object": (dict,), "null": (type(None),)}


@dataclass(frozen=True)
class Tool:
    """A function the model may call, and the JSON schema it is shown."""

    name: str
    fn: Callable[..., Any]
    schema: dict[str, Any]


def tool_of(fn: Callable[..., Any], where: str = "rollout.tools") -> Tool:
    """The Tool of a typed function (or bound method) with a docstring; ConfigError naming
    `where` when transformers cannot build its schema (no docstring, an untyped parameter)."""
    from transformers.utils import get_json_schema  # transformers loads slowly: only here

    try:
        schema = get_json_schema(fn)
    except Exception as err:  # DocstringParsingException, TypeHintParsingException
        raise ConfigError(f"{where}: tool {getattr(fn, '__name__', fn)!r} needs type hints and "
                          f"a Google-style docstring (Args: ...): {err}") from None
    return Tool(schema["function"]["name"], fn, schema)


def load_tools(specs: Sequence[str]) -> list[Tool]:
    """`rollout.tools`: built-in names or `pkg.mod:fn` / `file.py:fn`, as Tools."""
    tools = []
    for i, spec in enumerate(specs):
        where = f"rollout.tools[{i}]"
        if spec in BUILTIN_TOOLS:
            fn = BUILTIN_TOOLS[spec]
        elif ":" in spec:
            fn = load_object(spec, where)
        else:
            raise ConfigError(f"{where}: unknown tool {spec!r}: use a built-in "
                              f"({', '.join(BUILTIN_TOOLS)}), 'pkg.mod:fn' or 'file.py:fn'")
        if not callable(fn):
            raise ConfigError(f"{where}: {spec!r} is not callable")
        tools.append(tool_of(fn, where))
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise ConfigError(f"rollout.tools: two tools share a name: {names}")
    return tools


@dataclass(frozen=True)
class Outcome:
    """What a call gave: the text the model sees, and the error kind when it failed."""

    text: str
    error: str | None = None  # one of ERRORS, None when the call succeeded


def run_calls(jobs: Sequence[tuple[ToolCall, dict[str, Tool]]], timeout_s: float
              ) -> list[Outcome]:
    """The calls of a turn (`jobs` pairs each call with the tools of its trajectory), run at
    once (`run_at_once`). A call that cannot run, raises or is still running at the deadline
    is an error observation."""
    outcomes = [_problem(call, tools) for call, tools in jobs]
    runnable = [(i, call, tools[call.name]) for i, ((call, tools), outcome)
                in enumerate(zip(jobs, outcomes)) if outcome is None]
    finished = run_at_once([partial(tool.fn, **call.arguments) for _, call, tool in runnable],
                           timeout_s)
    for (i, _, tool), (value, error) in zip(runnable, finished):
        if error is None:
            outcomes[i] = Outcome(as_text(value))
        elif isinstance(error, TimeoutError):
            outcomes[i] = Outcome(f"Error: tool '{tool.name}' timed out after {timeout_s:g} s",
                                  "timeout")
        else:
            outcomes[i] = Outcome(f"Error: tool '{tool.name}' raised {describe(error)}",
                                  "raised")
    return [o for o in outcomes if o is not None]


def run_at_once(calls: Sequence[Callable[[], Any]], timeout_s: float
                ) -> list[tuple[Any, BaseException | None]]:
    """Each call in a thread of its own (an `async def` one in its own event loop there), all
    at once under one deadline `timeout_s` away: (value, None), or (None, what it raised), or
    (None, TimeoutError) for a call still running then. A timed-out call's thread cannot be
    killed: it is left to finish (a daemon, so it never holds the process up at exit)."""
    results: list[tuple[Any, BaseException | None] | None] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            results[i] = (_await(calls[i]()), None)
        except Exception as err:  # the caller's to report
            results[i] = (None, err)

    threads = [threading.Thread(target=run, args=(i,), daemon=True, name="raftlm-tool")
               for i in range(len(calls))]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    # Read once: a late thread may still write its slot after this.
    return [result if result is not None and not thread.is_alive() else
            (None, TimeoutError(f"took longer than {timeout_s:g} s"))
            for result, thread in zip(list(results), threads)]


def describe(error: BaseException) -> str:
    """`KeyError: 'x'`: an exception in one line, as the model reads it."""
    message = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}{': ' + message if message else ''}"


def as_text(value: Any) -> str:
    """A tool's return value as the text the model sees (JSON for structured values)."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


def _problem(call: ToolCall, tools: dict[str, Tool]) -> Outcome | None:
    """The error outcome of a call that cannot run: unparsed, unknown tool, bad arguments."""
    if call.problem is not None:
        return Outcome(f"Error: could not read the tool call: {call.problem}. Write "
                       '<tool_call>{"name": ..., "arguments": {...}}</tool_call>', "parse")
    if call.name not in tools:
        return Outcome(f"Error: unknown tool '{call.name}'; the tools are "
                       f"{', '.join(tools) or 'none'}", "unknown_tool")
    tool = tools[call.name]
    try:
        inspect.signature(tool.fn).bind(**call.arguments)
    except TypeError as err:
        return Outcome(f"Error: bad arguments for '{tool.name}': {err}", "bad_arguments")
    properties = tool.schema["function"].get("parameters", {}).get("properties", {})
    for name, value in call.arguments.items():
        expected = properties.get(name, {}).get("type")
        kinds = [expected] if isinstance(expected, str) else list(expected or [])
        allowed = tuple(t for kind in kinds for t in _JSON_TYPES.get(kind, (object,)))
        wrong_bool = isinstance(value, bool) and "boolean" not in kinds
        if allowed and (not isinstance(value, allowed) or wrong_bool):
            return Outcome(f"Error: bad arguments for '{tool.name}': '{name}' must be "
                           f"{' or '.join(kinds)}, got {json.dumps(value)}", "bad_arguments")
    return None


def _await(value: Any) -> Any:
    """A coroutine's result (an `async def` tool), run in this thread's own event loop."""
    return asyncio.run(value) if inspect.iscoroutine(value) else value
