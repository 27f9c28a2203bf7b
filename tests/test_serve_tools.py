"""`raftlm serve` with OpenAI `tools`: a call the model writes comes back as `tool_calls`, and
the client drives the loop (a real server on 127.0.0.1, a free port, the tiny model; its
sampler replaced by a script so the answers are known)."""

from __future__ import annotations

import json

import openai
import pytest
from tiny import save_tiny_model

from raftlm.sampling.completion import Completion
from raftlm.tools import serve_batching
from raftlm.tools.serve import openai_app
from raftlm.tools.serve_reward import serving
from raftlm.tools.target import load_target

NAME = "tiny-tools"
CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "12 * 34"}}</tool_call>'
OPENING = '<tool_call>{"name": "calculator", "arguments": {"expression": "'
CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Exact arithmetic.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                   "required": ["expression"]}}}
QUESTION = [{"role": "user", "content": "What is 12 * 34?"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = save_tiny_model(tmp_path_factory.mktemp("serve_tools") / "model")
    target = load_target(str(folder))
    with serving(openai_app(target, NAME)) as url:
        yield url, target.tokenizer


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


@pytest.fixture
def script(served, monkeypatch):
    """The sampler answers `script[0]` to every request; `prompts` holds what it was asked."""
    tokenizer = served[1]
    script: list = ["", []]

    def fake_generate(model, tok, prompts, counts, settings, *, seeds, on_finish=None,
                      on_token=None, **_):
        script[1] += [tokenizer.decode(p) for p in prompts]
        ids = tokenizer(script[0], add_special_tokens=False)["input_ids"]
        reason = "stop_string" if script[0].endswith("</tool_call>") else "eos"
        rows = [[Completion(script[0], ids, reason)] * n for n in counts]
        for i, row in enumerate(rows):
            for j, completion in enumerate(row):
                for k in range(1, len(ids) + 1):  # a token at a time, as the sampler streams
                    on_token(i, j, ids[:k])
                on_finish(i, j, completion)
        return rows

    monkeypatch.setattr(serve_batching, "generate", fake_generate)
    return script


def test_a_call_the_model_writes_comes_back_as_tool_calls(client, script):
    script[0] = CALL
    answer = client.chat.completions.create(model=NAME, messages=QUESTION, tools=[CALCULATOR])
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "calculator" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"expression": "12 * 34"}
    assert '"name": "calculator"' in script[1][-1]  # the tool's schema was shown


def test_the_client_sends_the_result_back_and_gets_the_answer(client, script):
    script[0] = CALL
    first = client.chat.completions.create(model=NAME, messages=QUESTION, tools=[CALCULATOR])
    [call] = first.choices[0].message.tool_calls
    script[0] = "It is 408."
    conversation = QUESTION + [first.choices[0].message.model_dump(exclude_none=True),
                               {"role": "tool", "tool_call_id": call.id, "content": "408"}]
    answer = client.chat.completions.create(model=NAME, messages=conversation,
                                            tools=[CALCULATOR])
    assert answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.content == "It is 408."
    assert f"<|im_start|>assistant\n{CALL}<|im_end|>\n<|im_start|>tool\n408<|im_end|>\n" \
           "<|im_start|>assistant\n" in script[1][-1]


def test_a_named_tool_choice_prefills_the_call_the_model_completes(client, script):
    script[0] = CALL.removeprefix(OPENING)
    answer = client.chat.completions.create(
        model=NAME, messages=QUESTION, tools=[CALCULATOR],
        tool_choice={"type": "function", "function": {"name": "calculator"}})
    assert script[1][-1].endswith(OPENING)
    [call] = answer.choices[0].message.tool_calls
    assert json.loads(call.function.arguments) == {"expression": "12 * 34"}


def test_an_answer_without_a_call_is_plain_content(client, script):
    script[0] = "408"
    answer = client.chat.completions.create(model=NAME, messages=QUESTION, tools=[CALCULATOR])
    assert answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.content == "408" and not answer.choices[0].message.tool_calls


@pytest.mark.parametrize("settings, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "abacus"}}}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
])
def test_bad_tool_requests_are_refused_with_400_naming_the_field(client, settings, param):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=NAME, messages=QUESTION, tools=[CALCULATOR],
                                       **settings)
    assert refused.value.body["param"] == param


def streamed(client, **settings):
    """The chunks' choices of a streamed answer: its content deltas joined, its tool-call
    deltas and its finish reason."""
    content, calls, reasons = [], [], []
    for piece in client.chat.completions.create(model=NAME, messages=QUESTION,
                                                tools=[CALCULATOR], stream=True, **settings):
        for choice in piece.choices:
            content.append(choice.delta.content or "")
            calls += choice.delta.tool_calls or []
            reasons += [choice.finish_reason] if choice.finish_reason else []
    return content, calls, reasons


@pytest.mark.parametrize("said", ["", "Let me use the calculator.\n"])
def test_a_streamed_call_comes_whole_after_the_text_before_it(client, script, said):
    script[0] = said + CALL
    content, calls, reasons = streamed(client)
    assert reasons == ["tool_calls"]
    [call] = calls
    assert call.index == 0 and call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "calculator"
    assert json.loads(call.function.arguments) == {"expression": "12 * 34"}
    assert not any("<tool" in piece for piece in content), "the call never shows as text"
    whole = client.chat.completions.create(model=NAME, messages=QUESTION, tools=[CALCULATOR])
    assert "".join(content) == (whole.choices[0].message.content or "") == said.rstrip()
    if said:
        assert len([piece for piece in content if piece]) > 1, "the text streams, in pieces"


def test_a_streamed_forced_call_and_a_streamed_answer_are_the_non_streamed_ones(client,
                                                                                script):
    script[0] = CALL.removeprefix(OPENING)
    forced = {"tool_choice": {"type": "function", "function": {"name": "calculator"}}}
    content, [call], reasons = streamed(client, **forced)
    assert reasons == ["tool_calls"] and "".join(content) == ""
    assert json.loads(call.function.arguments) == {"expression": "12 * 34"}
    for answer in ("It is 408.  ", "Use <tool_call>nothing"):  # spaces; a call that never parses
        script[0] = answer
        content, calls, reasons = streamed(client)
        whole = client.chat.completions.create(model=NAME, messages=QUESTION, tools=[CALCULATOR])
        assert "".join(content) == whole.choices[0].message.content == answer
        assert calls == [] and reasons == ["stop"]
