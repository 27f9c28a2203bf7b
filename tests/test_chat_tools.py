"""`raftlm sample` and `raftlm chat` with tools run the tool loop of training: the model's
call runs, its result comes back, the model answers (tiny model, scripted turns)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import test_agents_rollout
from test_agents_rollout import CALL
from tiny import save_tiny_model

from raftlm.cli import main as cli_main
from raftlm.config import ConfigError
from raftlm.tools.args import with_tools
from raftlm.tools.chat import chat, sample_responses
from raftlm.tools.target import load_target

scripted = test_agents_rollout.scripted  # the fixture: the sampler replaced by a script


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("chat_tools") / "model")


def tool_target(model_dir, tools=("calculator",), tool_choice=None):
    target = load_target(model_dir)
    args = argparse.Namespace(tools=list(tools), tool_choice=tool_choice)
    return dataclasses.replace(target, config=with_tools(target.config, args))


def room(target):
    """Turns long enough for the scripted call (the tiny tokenizer: a token a character)."""
    return dataclasses.replace(target.config.generation, max_new_tokens=200)


def test_sample_with_a_tool_gives_trajectories_with_the_call_and_its_result(model_dir,
                                                                          scripted):
    scripted[:] = [CALL, "It is 408."]
    target = tool_target(model_dir)
    results, _ = sample_responses(target, "What is 12 * 34?", 2, room(target))
    assert [[t["role"] for t in r.turns] for r in results] == [["assistant", "tool",
                                                                "assistant"]] * 2
    assert results[0].turns[1]["content"] == "408"


def test_chat_with_a_tool_shows_the_call_its_result_and_the_answer(model_dir, scripted):
    scripted[:] = [CALL, "It is 408."]
    lines = iter(["What is 12 * 34?", "/exit"])
    shown: list[str] = []
    target = tool_target(model_dir)
    messages = chat(target, room(target), read_line=lambda _: next(lines), write=shown.append)
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert "  [calculator] 408\n" in shown and "assistant> It is 408.\n" in shown


def test_cli_sample_prints_each_trajectory_turn_by_turn(model_dir, scripted, capsys):
    scripted[:] = [CALL, "It is 408."]
    assert cli_main(["sample", str(model_dir), "--prompt", "What is 12 * 34?", "--n", "1",
                     "--tool", "calculator", "--max-new-tokens", "200", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"assistant> {CALL}\n  [calculator] 408\nassistant> It is 408." in out


def test_a_forced_call_is_prefilled_in_chat_too(model_dir, scripted):
    opening = '<tool_call>{"name": "calculator", "arguments": {"expression": "'
    scripted[:] = [CALL.removeprefix(opening), "It is 408."]
    target = tool_target(model_dir, tool_choice="calculator")
    results, _ = sample_responses(target, "What is 12 * 34?", 1, room(target))
    assert results[0].turns[0]["content"] == CALL and results[0].turns[1]["content"] == "408"


def test_a_tool_choice_without_tools_is_refused_naming_the_option(model_dir):
    with pytest.raises(ConfigError, match=r"^--tool: set `tools`"):
        tool_target(model_dir, tools=(), tool_choice="required")
