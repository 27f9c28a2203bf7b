"""Agents' parts: the <tool_call> format, tools and their failures, the chat format, config."""

import asyncio
import time

import pytest
from tiny import CHATML, tiny_tokenizer

from raftlm.agents import Trajectory, check_rollout, messages, rollout_metrics
from raftlm.agents.calculator import calculator
from raftlm.agents.calls import default_system_prompt, example_arguments, parse_tool_calls
from raftlm.agents.chat_format import ChatFormat, TemplateError
from raftlm.agents.tools import ERRORS, load_tools, run_calls, tool_of
from raftlm.agents.trajectory import final_text
from raftlm.config import ConfigError, RaftConfig
from raftlm.sampling.completion import Completion


def add(a: int, b: int) -> int:
    """Add two whole numbers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


def fails(x: str) -> str:
    """Always raises.

    Args:
        x: Anything.
    """
    raise RuntimeError("broken tool")


def slow(x: str) -> str:
    """Takes too long.

    Args:
        x: Anything.
    """
    time.sleep(5)
    return x


async def shout(text: str) -> str:
    """An async tool.

    Args:
        text: What to shout.
    """
    await asyncio.sleep(0)
    return text.upper()


TOOLS = {t.name: t for t in map(tool_of, (add, fails, slow, shout))}


# ------------------------------------------------------------------ the <tool_call> format

def test_a_hermes_call_parses_to_name_and_arguments():
    [call] = parse_tool_calls('I will add. <tool_call>{"name": "add", "arguments": '
                              '{"a": 2, "b": 3}}</tool_call>')
    assert (call.name, call.arguments, call.problem) == ("add", {"a": 2, "b": 3}, None)


def test_arguments_given_as_a_json_string_parse_as_openai_writes_them():
    [call] = parse_tool_calls('<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}'
                              "</tool_call>")
    assert call.arguments == {"a": 1, "b": 2} and call.problem is None


def test_text_without_a_call_has_no_calls():
    assert parse_tool_calls("The answer is 408.") == []


@pytest.mark.parametrize("text", [
    "<tool_call>add(2, 3)</tool_call>",                        # not JSON
    '<tool_call>{"arguments": {"a": 1}}</tool_call>',           # no name
    '<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>',  # arguments not an object
    '<tool_call>{"name": "add", "arguments": {"a": 1',          # never closed
])
def test_a_malformed_call_comes_back_with_its_problem(text):
    [call] = parse_tool_calls(text)
    assert call.problem


def test_default_prompt_lists_the_schemas_and_an_example_call_that_parses():
    [tool] = load_tools(["calculator"])
    prompt = default_system_prompt([tool.schema], example_arguments(tool.schema, tool.fn))
    assert '"name": "calculator"' in prompt and "<tools>" in prompt
    example = prompt.rpartition("Example:\n")[2]
    [call] = parse_tool_calls(example)
    assert (call.name, call.arguments) == ("calculator", {"expression": "12 * 34"})
    assert calculator(**call.arguments) == "408"


def test_an_example_call_without_given_arguments_uses_placeholders_of_each_type():
    assert example_arguments(TOOLS["add"].schema) == {"a": 1, "b": 1}


# ------------------------------------------------------------------ tools and their failures

def test_calculator_is_exact_and_refuses_what_is_not_arithmetic():
    assert calculator("12 * 34") == "408"
    assert calculator("1/3*3") == "1"
    assert calculator("(2 + 3) ** 2 - 7 // 2") == "22"
    for bad in ("__import__('os')", "2 ** 1000", "x + 1", "1 +"):
        with pytest.raises(ValueError):
            calculator(bad)


def test_a_tool_without_docstring_or_types_is_a_config_error():
    def untyped(x):
        return x

    with pytest.raises(ConfigError, match="rollout.tools"):
        tool_of(untyped)
    with pytest.raises(ConfigError, match="unknown tool 'nope'"):
        load_tools(["nope"])


def test_tools_load_by_file_path(tmp_path):
    (tmp_path / "mytools.py").write_text(
        'def double(n: int) -> int:\n    """Double it.\n\n    Args:\n        n: A number.\n'
        '    """\n    return 2 * n\n')
    [tool] = load_tools([f"{tmp_path / 'mytools.py'}:double"])
    assert tool.name == "double" and tool.schema["function"]["parameters"]["required"] == ["n"]


def _outcome(text):
    [call] = parse_tool_calls(text)
    [outcome] = run_calls([(call, TOOLS)], timeout_s=0.5)
    return outcome


def test_a_good_call_returns_the_tools_output_as_text():
    assert _outcome('<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
                    ).text == "5"


def test_an_async_tool_runs_in_its_own_event_loop():
    outcome = _outcome('<tool_call>{"name": "shout", "arguments": {"text": "hi"}}</tool_call>')
    assert (outcome.text, outcome.error) == ("HI", None)


@pytest.mark.parametrize("text, error, says", [
    ("<tool_call>not json</tool_call>", "parse", "could not read the tool call"),
    ('<tool_call>{"name": "sub", "arguments": {}}</tool_call>', "unknown_tool", "unknown tool"),
    ('<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>', "bad_arguments", "'b'"),
    ('<tool_call>{"name": "add", "arguments": {"a": "1", "b": 2}}</tool_call>', "bad_arguments",
     "'a' must be integer"),
    ('<tool_call>{"name": "fails", "arguments": {"x": "y"}}</tool_call>', "raised",
     "RuntimeError: broken tool"),
    ('<tool_call>{"name": "slow", "arguments": {"x": "y"}}</tool_call>', "timeout",
     "timed out"),
])
def test_every_failure_is_an_error_observation_of_its_kind(text, error, says):
    outcome = _outcome(text)
    assert outcome.error == error and error in ERRORS
    assert outcome.text.startswith("Error:") and says in outcome.text


def test_calls_of_many_trajectories_run_at_once_within_one_timeout():
    [call] = parse_tool_calls('<tool_call>{"name": "slow", "arguments": {"x": "y"}}</tool_call>')
    start = time.monotonic()
    outcomes = run_calls([(call, TOOLS)] * 4, timeout_s=0.3)
    assert [o.error for o in outcomes] == ["timeout"] * 4
    assert time.monotonic() - start < 1.0  # one deadline for all, not 4 x 0.3 s in a row


# ------------------------------------------------------------------ the chat format

def test_the_prompt_is_the_templates_rendering_with_the_default_tool_prompt(tok):
    chat = ChatFormat(tok, load_tools(["calculator"]))
    assert not chat.native_tools and "calculator" in chat.system_prompt
    ids = chat.prompt_ids("What is 12 * 34?", system_prompt="Be brief.")
    expected = tok.apply_chat_template(
        [{"role": "system", "content": f"Be brief.\n\n{chat.system_prompt}"},
         {"role": "user", "content": "What is 12 * 34?"}], tokenize=False,
        add_generation_prompt=True)
    assert ids == tok(expected, add_special_tokens=False)["input_ids"]


def test_an_observation_continues_the_conversation_exactly_as_the_template_writes_it(tok):
    """Token continuity: prompt + model turn + observation ids == the template's rendering of
    the whole conversation, ready for the next model turn."""
    chat = ChatFormat(tok, load_tools(["calculator"]))
    prompt = chat.prompt_ids("What is 12 * 34?")
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "12 * 34"}}</tool_call>'
    for ended_on_eos in (True, False):  # eos written by the model, or cut at </tool_call>
        turn = tok(call + ("<|im_end|>" if ended_on_eos else ""),
                   add_special_tokens=False)["input_ids"]
        tool = [{"role": "tool", "name": "calculator", "content": "408"}]
        observation = chat.observation_ids(tool, turn)
        conversation = [{"role": "system", "content": chat.system_prompt},
                        {"role": "user", "content": "What is 12 * 34?"},
                        {"role": "assistant", "content": call}, *tool]
        expected = tok.apply_chat_template(conversation, tokenize=False,
                                           add_generation_prompt=True)
        assert prompt + turn + observation == tok(expected, add_special_tokens=False)["input_ids"]


def test_a_template_with_tool_support_renders_the_tools_itself():
    copy = tiny_tokenizer()
    copy.chat_template = ("{% if tools %}<|im_start|>system\nTOOLS {{ tools | tojson }}"
                          "<|im_end|>\n{% endif %}" + CHATML)
    chat = ChatFormat(copy, load_tools(["calculator"]))
    assert chat.native_tools and chat.system_prompt is None
    assert "TOOLS" in copy.decode(chat.prompt_ids("hi"))


def test_a_template_that_rewrites_earlier_turns_is_refused_in_one_line():
    copy = tiny_tokenizer()
    # Renders earlier assistant turns shortened once a later message follows (as templates
    # that drop reasoning from past turns do).
    copy.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}...{% else %}{{ m['content'] }}"
        "{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(TemplateError, match="not prefix-preserving") as err:
        ChatFormat(copy, load_tools(["calculator"]))
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------ config

def _config(**rollout):
    return RaftConfig.from_dict({"data": {"task": "multiplication"}, "rollout": rollout})


def test_no_rollout_section_means_single_turn():
    config = RaftConfig.from_dict({"data": {"task": "multiplication"}})
    assert config.rollout is None and config.to_dict()["rollout"] is None


def test_a_rollout_section_loads_its_knobs():
    config = _config(tools=["calculator"], max_turns=3)
    assert config.rollout.tools == ["calculator"] and config.rollout.max_turns == 3


@pytest.mark.parametrize("rollout, field", [
    ({}, "rollout: set `tools` or `environment`"),
    ({"tools": ["calculator"], "max_turns": 0}, "rollout.max_turns"),
    ({"tools": ["calculator"], "tool_timeout_s": 0}, "rollout.tool_timeout_s"),
    ({"tools": ["calculator"], "max_trajectory_tokens": 0}, "rollout.max_trajectory_tokens"),
])
def test_a_bad_rollout_section_names_its_field(rollout, field):
    with pytest.raises(ConfigError, match=field):
        _config(**rollout)


# ------------------------------------------------------------------ trajectories as records

def test_a_trajectorys_messages_and_final_text_leave_the_tools_numbers_out():
    turns = [{"role": "assistant", "content": "<tool_call>...</tool_call>",
              "finish_reason": "stop_string"},
             {"role": "tool", "name": "calculator", "content": "408", "arguments": {},
              "error": None},
             {"role": "assistant", "content": "Done.", "finish_reason": "eos"}]
    trajectory = Trajectory("...408...Done.", [1, 2, 3], "eos", None, [1, 0, 1], turns)
    assert final_text(trajectory) == "Done."  # not the tool's 408
    assert messages(trajectory)[1] == {"role": "tool", "name": "calculator", "content": "408"}
    single = Completion("It is 408.", [1], "eos")
    assert final_text(single) == "It is 408." and messages(single) is None


def test_single_turn_responses_have_no_rollout_metrics():
    assert rollout_metrics([Completion("a", [1], "eos")]) == {}


def test_a_run_can_check_its_tools_and_template_before_its_first_stage(tok):
    check_rollout(RaftConfig.from_dict({"data": {"task": "multiplication"}}), tok)  # one turn
    check_rollout(_config(tools=["calculator"]), tok)
    with pytest.raises(ConfigError, match=r"rollout.tools\[0\]: unknown tool 'abacus'"):
        check_rollout(_config(tools=["abacus"]), tok)
    with pytest.raises(ConfigError, match="rollout.environment"):
        check_rollout(_config(environment="nowhere.py:Env"), tok)


def test_numeric_answer_reads_a_trajectorys_last_model_turn_not_a_tools_output():
    from raftlm.rewards.verifiable import numeric_answer

    turns = [{"role": "assistant", "content": "<tool_call>...</tool_call>"},
             {"role": "tool", "name": "calculator", "content": "408"},
             {"role": "assistant", "content": "Done."}]
    texts = ["<tool_call>...</tool_call>408Done.", "It is 408."]
    assert numeric_answer([""] * 2, texts, ["408"] * 2, trajectories=[turns, None]) == [0.0, 1.0]
    turns[-1]["content"] = "It is 408."
    assert numeric_answer([""], texts[:1], ["408"], trajectories=[turns]) == [1.0]
