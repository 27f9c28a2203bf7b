"""What `raftlm serve` reads and writes: OpenAI chat-completions requests, checked, and the
answers (`chat.completion`, the `chat.completion.chunk`s of a stream, `{"error": ...}`).

Pure functions with no server in them, so the API's rules are readable in one place:

- a field sent as `null` means "not given" (clients send `null` for unset optional fields);
- `content` is text or a list of content parts, of which only `{"type": "text"}` is supported;
- `max_completion_tokens` (OpenAI's current name) wins over `max_tokens` (its old one);
- values outside OpenAI's ranges (`max_tokens: -1`, `temperature: 3`) answer 400 naming the
  field; settings raftlm's sampler cannot honour (`logprobs`, penalties, `functions`) answer
  400 too, instead of being silently ignored;
- `tools` and `tool_choice` as OpenAI's: a call the model writes is answered as `tool_calls`
  (`serve_tools.py`), streamed too (the call whole, in one chunk, once the turn ends);
- the stop string that ended a response is not part of `content` (as OpenAI and vLLM).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from raftlm.agents.calls import CALL_OPEN
from raftlm.sampling.completion import Completion
from raftlm.tools.serve_tools import (
    ToolRequestError,
    answer_message,
    message_with_calls,
    opening_of,
    parse_tools,
    stop_strings,
)

FINISH_REASONS = {"eos": "stop", "stop_string": "stop", "length": "length"}
ROLES = {"system", "developer", "user", "assistant", "tool"}
MAX_N = 128  # OpenAI's limit on `n`

# Settings the sampler cannot honour, with the value that means "off": any other value is
# refused rather than ignored, since ignoring it would change what the client samples.
UNSUPPORTED = {"logprobs": False, "top_logprobs": 0, "frequency_penalty": 0,
               "presence_penalty": 0, "logit_bias": {}, "functions": [],
               "function_call": "none"}


class RequestError(ValueError):
    """A request the server refuses: its HTTP status, OpenAI's error type, the field at fault."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.param, self.status, self.code, self.kind = param, status, code, kind

    def body(self) -> dict[str, Any]:
        """OpenAI's error shape."""
        return error_body(str(self), self.param, self.code, self.kind)


def error_body(message: str, param: str | None = None, code: str | None = None,
               kind: str = "invalid_request_error") -> dict[str, Any]:
    """`{"error": {message, type, param, code}}`, the shape OpenAI's clients parse."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class ChatRequest:
    """One checked chat-completions request."""

    model: str | None  # None: the served model
    messages: list[dict[str, str]]  # text content only, roles as the chat template expects
    max_tokens: int | None  # None: the target's generation.max_new_tokens
    temperature: float  # 0: greedy
    top_p: float
    n: int
    seed: int | None  # None: a fresh seed per request
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage
    tools: tuple[dict[str, Any], ...] = ()  # JSON schemas shown to the model; () none
    tool_choice: str = "auto"  # auto, required or a function's name (serve_tools.py)

    def sampling_key(self) -> tuple[Any, ...]:
        """Requests with equal keys can share one sampler call (one generation config)."""
        return (self.temperature, self.top_p, self.max_tokens, self.stop)


def parse_chat_request(body: Any) -> ChatRequest:
    """Check a decoded JSON body; RequestError (400) names the first field at fault."""
    if not isinstance(body, dict):
        raise RequestError(f"expected a JSON object, got {type(body).__name__}")
    fields = {key: value for key, value in body.items() if value is not None}
    for name, off in UNSUPPORTED.items():
        if name in fields and fields[name] != off:
            raise RequestError(f"'{name}' is not supported by raftlm serve (got "
                               f"{fields[name]!r:.60})", name)
    response_format = fields.get("response_format", {"type": "text"})
    if not isinstance(response_format, dict) or response_format.get("type") != "text":
        raise RequestError("'response_format': only {\"type\": \"text\"} is supported",
                           "response_format")
    model = fields.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(f"'model' must be a string, got {model!r:.60}", "model")
    max_tokens = fields.get("max_completion_tokens", fields.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in fields else "max_tokens"
    stream_options = fields.get("stream_options", {})
    if not isinstance(stream_options, dict):
        raise RequestError("'stream_options' must be an object", "stream_options")
    try:
        tools, tool_choice = parse_tools(fields)
        messages = _messages(fields.get("messages"))
    except ToolRequestError as err:
        raise RequestError(str(err), err.param) from None
    stream = _boolean(fields.get("stream", False), "stream")
    return ChatRequest(
        model=model,
        messages=messages,
        max_tokens=None if max_tokens is None else _integer(max_tokens, name, low=1),
        temperature=_number(fields.get("temperature", 1.0), "temperature", 0.0, 2.0),
        top_p=_number(fields.get("top_p", 1.0), "top_p", 0.0, 1.0, low_open=True),
        n=_integer(fields.get("n", 1), "n", low=1, high=MAX_N),
        seed=None if "seed" not in fields else _integer(fields["seed"], "seed"),
        stop=_stops(fields.get("stop", [])) + stop_strings(tools),
        stream=stream,
        include_usage=_boolean(stream_options.get("include_usage") or False,
                               "stream_options.include_usage"),
        tools=tools, tool_choice=tool_choice,
    )


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise RequestError("'messages' must be a non-empty list of {role, content}", "messages")
    messages = []
    names: dict[str, str] = {}  # tool call ids -> their functions' names
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise RequestError(f"'{where}' must be an object with a 'role' in "
                               f"{sorted(ROLES)}, got {message!r:.80}", where)
        # OpenAI's `developer` messages are what chat templates call `system`.
        role = "system" if message["role"] == "developer" else message["role"]
        messages.append(message_with_calls({**message, "role": role},
                                           _text(message.get("content"), where), where, names))
    return messages


def _text(content: Any, where: str) -> str:
    """A message's content as text: a string, null (an assistant turn with no text) or a
    list of text parts, joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RequestError(f"'{where}.content[{j}]': only text parts "
                                   f"{{\"type\": \"text\", \"text\": ...}} are supported, got "
                                   f"{kind!r}", f"{where}.content")
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError(f"'{where}.content' must be a string or a list of text parts, got "
                       f"{type(content).__name__}", f"{where}.content")


def _integer(value: Any, name: str, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"'{name}' must be an integer, got {value!r:.60}", name)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise RequestError(f"'{name}' must be {bounds}, got {value}", name)
    return value


def _number(value: Any, name: str, low: float, high: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"'{name}' must be a number, got {value!r:.60}", name)
    if value > high or value < low or (low_open and value == low):
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise RequestError(f"'{name}' must be in {bounds}, got {value}", name)
    return float(value)


def _boolean(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise RequestError(f"'{name}' must be true or false, got {value!r:.60}", name)
    return value


def _stops(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError(f"'stop' must be a non-empty string or a list of them, got "
                           f"{value!r:.60}", "stop")
    return tuple(stops)


def without_stop(text: str, stops: tuple[str, ...]) -> str:
    """The text before the first stop string (the sampler's text ends with the stop)."""
    starts = [text.find(s) for s in stops if s in text]
    return text[: min(starts)] if starts else text


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def completion_body(request: ChatRequest, model: str, completions: list[Completion],
                    prompt_tokens: int) -> dict[str, Any]:
    """The `chat.completion` answering a non-streamed request."""
    choices = []
    for i, c in enumerate(completions):
        message, called = answer_message(c.text, request.tools, request.tool_choice)
        if not called:
            message["content"] = without_stop(message["content"], request.stop)
        choices.append({"index": i, "logprobs": None, "message": message, "finish_reason":
                        "tool_calls" if called else FINISH_REASONS[c.finish_reason]})
    return {"id": new_id(), "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": choices,
            "usage": usage(prompt_tokens, completions)}


def usage(prompt_tokens: int, completions: list[Completion]) -> dict[str, int]:
    tokens = sum(len(c.token_ids) for c in completions)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": tokens,
            "total_tokens": prompt_tokens + tokens}


def chunk(chunk_id: str, model: str, created: int, choices: list[dict[str, Any]],
          **extra: Any) -> dict[str, Any]:
    """One `chat.completion.chunk` of a stream."""
    return {"id": chunk_id, "object": "chat.completion.chunk", "created": created,
            "model": model, "choices": choices, **extra}


def delta(index: int, content: str | None = None, role: str | None = None,
          finish_reason: str | None = None, tool_calls: list[dict[str, Any]] | None = None
          ) -> dict[str, Any]:
    """A chunk's choice: the new text of choice `index` (and its finish reason at the end)."""
    change = {key: value for key, value in (("role", role), ("content", content),
                                            ("tool_calls", tool_calls)) if value is not None}
    return {"index": index, "delta": change, "logprobs": None, "finish_reason": finish_reason}


def streamed_text(tokenizer: Any, request: ChatRequest) -> StreamedText:
    """A streamed choice's text. With tools, what follows a call's opening is held back (the
    forced opening too): a call is sent whole as `tool_calls` once the turn ends, as vLLM's
    streaming tool parsers do, and the text before it streams as `content`."""
    if not request.tools:
        return StreamedText(tokenizer, request.stop)
    return StreamedText(tokenizer, (*request.stop, CALL_OPEN),
                        opening_of(request.tools, request.tool_choice), hold_space=True)


def last_deltas(index: int, text: StreamedText, completion: Completion,
                request: ChatRequest) -> list[dict[str, Any]]:
    """A streamed choice's last chunks once it finished: the rest of its content, its calls
    (with tools) and its finish reason; together the same answer as the non-streamed one."""
    if not request.tools:
        rest, calls = text.finish(completion), None
    else:
        message, called = answer_message(completion.text, request.tools, request.tool_choice)
        content = message["content"] or ""
        rest = text.release(content if called else without_stop(content, request.stop))
        calls = ([{"index": k, **call} for k, call in enumerate(message["tool_calls"])]
                 if called else None)
    reason = "tool_calls" if calls else FINISH_REASONS[completion.finish_reason]
    return ([delta(index, content=rest)] if rest else []) + (
        [delta(index, tool_calls=calls)] if calls else []) + [delta(index, finish_reason=reason)]


class StreamedText:
    """The text of one streamed choice, released as it becomes final.

    Holds back what could still change: a trailing partial multi-byte character (decoded as
    U+FFFD) and a tail that could be the start of a stop string (which must not reach the
    client if the stop completes).
    """

    def __init__(self, tokenizer: Any, stops: tuple[str, ...], opening: str = "",
                 hold_space: bool = False):
        self.tokenizer, self.stops, self.sent = tokenizer, stops, ""
        self.opening = opening  # prefilled text the sampled ids continue (a forced call's)
        # with tools: trailing spaces wait, a call's `content` being the text before it rstripped
        self.hold_space = hold_space

    def update(self, ids: list[int]) -> str:
        """The new text after the sampler produced `ids` so far (may be empty)."""
        text = self.opening + self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = without_stop(text, self.stops)
        if cut == text:  # no stop yet: keep back what a stop or a character could still take
            cut = text.rstrip("\ufffd")
            cut = cut[: len(cut) - self._stop_prefix(cut)]
        return self.release(cut.rstrip() if self.hold_space else cut)

    def finish(self, completion: Completion) -> str:
        """The rest of the text once the choice finished."""
        return self.release(without_stop(completion.text, self.stops))

    def _stop_prefix(self, text: str) -> int:
        """Length of the longest tail of `text` that begins a stop string."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def release(self, text: str) -> str:
        """What of `text` (the choice's text so far) was not sent yet: its new tail."""
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        new, self.sent = text[len(self.sent):], text
        return new
