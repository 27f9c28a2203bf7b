"""rollout.tool_choice: forced function calling. The first model turn starts with a call's
opening written for the model (prefilled: token ids appended, loss mask 0), so the model writes
only the rest of the call (tiny tokenizer, scripted turns)."""

import pytest
import test_agents_rollout
from test_agents_rollout import CALL, config_with, prompts, run

from raftlm.agents import roll_out
from raftlm.agents.calls import TOOL_CHOICES, forced_opening
from raftlm.agents.chat_format import ChatFormat
from raftlm.agents.rollout import check_rollout
from raftlm.agents.tools import load_tools
from raftlm.config import ConfigError

scripted = test_agents_rollout.scripted  # the fixture: the sampler replaced by a script
OPENING = '<tool_call>{"name": "calculator", "arguments": {"expression": "'


def schema(name, **parameters):
    return {"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": {k: {"type": v} for k, v in parameters.items()},
        "required": list(parameters)}}}


def test_a_named_tool_of_one_string_parameter_opens_the_call_up_to_its_value():
    assert forced_opening("calculator", [t.schema for t in load_tools(["calculator"])]) == OPENING
    assert CALL.startswith(OPENING)  # the bytes of the prompt's example call


def test_a_named_tool_opens_as_far_as_its_schema_decides_the_bytes():
    assert forced_opening("square", [schema("square", x="integer")]) == (
        '<tool_call>{"name": "square", "arguments": {"x": ')
    assert forced_opening("add", [schema("add", a="integer", b="integer")]) == (
        '<tool_call>{"name": "add", "arguments": {')


def test_required_opens_the_call_up_to_the_tools_name_and_auto_opens_nothing():
    assert forced_opening("required", [schema("add", a="integer")]) == '<tool_call>{"name": "'
    assert TOOL_CHOICES["auto"].opening == ""


def test_the_prefilled_opening_is_in_the_trajectory_with_no_loss_and_the_call_runs(
        tok, scripted, tmp_path):
    scripted[:] = [CALL.removeprefix(OPENING), "It is 408."]
    config = config_with(tmp_path, tools=["calculator"], tool_choice="calculator")
    [[trajectory], _], _ = run(tok, config)
    opening = tok(OPENING, add_special_tokens=False)["input_ids"]
    record = prompts(tok)[0]
    chat = ChatFormat(tok, load_tools(["calculator"]))
    assert scripted.contexts[0] == chat.prompt_ids(record.prompt) + opening  # ids, as given
    assert trajectory.token_ids[:len(opening)] == opening
    assert trajectory.loss_mask[:len(opening)] == [0] * len(opening)
    assert trajectory.loss_mask[len(opening)] == 1  # the model's own arguments
    assert trajectory.token_log_probs[:len(opening)] == [0.0] * len(opening)
    assert trajectory.turns[0]["content"] == CALL and trajectory.turns[0]["prefilled"] == OPENING
    assert trajectory.turns[1]["content"] == "408"
    # Token continuity: the prompt and the trajectory are the template's whole conversation.
    conversation = [{"role": "system", "content": chat.system_prompt},
                    {"role": "user", "content": record.prompt},
                    {"role": "assistant", "content": CALL},
                    {"role": "tool", "name": "calculator", "content": "408"},
                    {"role": "assistant", "content": "It is 408."}]
    rendered = tok.apply_chat_template(conversation, tokenize=False).removesuffix("\n")
    assert chat.prompt_ids(record.prompt) + trajectory.token_ids == tok(
        rendered, add_special_tokens=False)["input_ids"]


def test_only_the_first_turn_is_forced(tok, scripted, tmp_path):
    scripted[:] = [CALL.removeprefix(OPENING), "It is 408."]
    config = config_with(tmp_path, tools=["calculator"], tool_choice="calculator")
    [[trajectory], _], _ = run(tok, config)
    assert "prefilled" not in trajectory.turns[2]
    assert set(trajectory.loss_mask[-len("It is 408."):]) == {1}


def test_auto_prefills_nothing(tok, scripted, tmp_path):
    scripted[:] = ["It is 408."]
    rolled = roll_out(None, tok, prompts(tok), [1, 1],
                      config_with(tmp_path, tools=["calculator"]), 0)
    assert set(rolled.rows[0][0].loss_mask) == {1}
    assert scripted.contexts[0] == rolled.prompts[0].token_ids


@pytest.mark.parametrize("rollout", [{"tools": ["calculator"], "tool_choice": "abacus"},
                                     {"environment": "envs.py:Counter",
                                      "tool_choice": "required"}])
def test_a_tool_choice_that_names_no_tool_is_refused_naming_the_field(tok, tmp_path, rollout):
    with pytest.raises(ConfigError, match=r"^rollout\.tool_choice: expected auto, required or a "
                                          r"tool's name \((calculator|no tools)\), got"):
        check_rollout(config_with(tmp_path, **rollout), tok)
