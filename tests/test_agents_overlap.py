"""Other rows keep decoding while one waits for its tool: on the raftlm backend a rollout is one
sampler call, a trajectory's next turn joining the running batch when its tool answers. It gives
the trajectories the turn-synchronous loop gives (each turn waiting for every answer of the one
before), which a sampler that never asks `more()` runs (tiny model, fp32)."""

import numpy as np
import pytest
from tiny import scripted_turns, write_digits_task

import raftlm.agents.rollout as rollout_module
import raftlm.sampling.kept_kv as kept_kv_module
from raftlm.agents import roll_out
from raftlm.config import RaftConfig
from raftlm.data.prompts import build_prompt_set

# Steps of different lengths, `async def` and a plain one: their answers come out of order.
SLOW_STEPS = '''
import asyncio
import time


class Slow:
    def reset(self, prompt, answer, **row):
        self.answer, self.steps = int(answer), 0

    async def step(self, action):
        self.steps += 1
        await asyncio.sleep(0.02 * ((self.answer + self.steps) % 3))
        return f"step {self.steps} of {self.answer}", None, self.steps >= 3
'''

# The first trajectory to step waits until another has taken its second step: only a rollout
# that samples other turns while one waits lets that happen before the deadline.
WAITS_FOR_ANOTHER = '''
import threading


class WaitsForAnother:
    first = None
    second_step_taken = threading.Event()

    def reset(self, prompt, answer, **row):
        self.steps = 0

    def step(self, action):
        self.steps += 1
        if WaitsForAnother.first is None:
            WaitsForAnother.first = self
            released = WaitsForAnother.second_step_taken.wait(30)
            return ("released" if released else "never released"), None, False
        if self.steps == 2:
            WaitsForAnother.second_step_taken.set()
        return f"step {self.steps}", None, self.steps >= 3
'''


def turn_synchronous(monkeypatch):
    """The sampler made one that never lets turns join a running call (as hf and vllm)."""
    sample = rollout_module.generate
    monkeypatch.setattr(rollout_module, "generate",
                        lambda *args, more=None, **kwargs: sample(*args, **kwargs))


def records(tok, n):
    rows = [{"prompt": f"What is {i} * 7?", "answer": str(i)} for i in range(n)]
    return build_prompt_set(rows, tok, prompt_field="prompt", max_prompt_tokens=4096,
                            system_prompt=None, source="test").records


def environment_config(tmp_path, name, source, **rollout):
    (tmp_path / "envs.py").write_text(source)
    return RaftConfig.from_dict({
        "data": {"task": "arithmetic"}, "run": {"seed": 3},
        "generation": {"max_new_tokens": 8, "batch_size": 4},
        "rollout": {"environment": f"{tmp_path / 'envs.py'}:{name}", "max_turns": 3,
                    "max_trajectory_tokens": 400, **rollout}})


def assert_same_trajectories(rows_a, rows_b):
    pairs = [(a, b) for row_a, row_b in zip(rows_a, rows_b, strict=True)
             for a, b in zip(row_a, row_b, strict=True)]
    for a, b in pairs:
        assert (a.token_ids, a.loss_mask, a.turns, a.finish_reason) == (
            b.token_ids, b.loss_mask, b.turns, b.finish_reason)
        np.testing.assert_array_equal(a.token_log_probs, b.token_log_probs)
    return pairs


def test_an_overlapped_rollout_gives_the_turn_synchronous_trajectories(tok, model, tmp_path,
                                                                       monkeypatch):
    config = environment_config(tmp_path, "Slow", SLOW_STEPS)
    prompts = records(tok, 3)
    overlapped = roll_out(model, tok, prompts, [3, 3, 3], config, 1).rows
    turn_synchronous(monkeypatch)
    pairs = assert_same_trajectories(overlapped, roll_out(model, tok, prompts, [3, 3, 3],
                                                          config, 1).rows)
    assert all(sum(t["role"] == "assistant" for t in a.turns) == 3 for a, _ in pairs)


def test_a_joining_turn_continues_from_the_kv_its_last_turn_kept(tok, model, tmp_path,
                                                                 monkeypatch):
    continued = []
    continued_kv = kept_kv_module.continued_kv
    monkeypatch.setattr(kept_kv_module, "continued_kv",
                        lambda *args: continued.append(1) or continued_kv(*args))
    config = environment_config(tmp_path, "Slow", SLOW_STEPS)
    rows = roll_out(model, tok, records(tok, 2), [2, 2], config, 1).rows
    later_turns = sum(sum(t["role"] == "assistant" for t in trajectory.turns) - 1
                      for row in rows for trajectory in row)
    assert later_turns == 2 * 2 * 2 and len(continued) == later_turns


@pytest.mark.parametrize("overlap", [True, False])
def test_other_trajectories_take_turns_while_one_waits_for_its_answer(tok, model, tmp_path,
                                                                      monkeypatch, overlap):
    if not overlap:
        turn_synchronous(monkeypatch)
    config = environment_config(tmp_path, "WaitsForAnother", WAITS_FOR_ANOTHER,
                                tool_timeout_s=30 if overlap else 1)
    rows = roll_out(model, tok, records(tok, 1), [3], config, 1).rows
    first_steps = [t.turns[1] for t in rows[0]]
    waited = [step for step in first_steps if step["content"] != "step 1"]
    assert len(waited) == 1
    if overlap:
        assert waited[0]["content"] == "released" and waited[0]["error"] is None
    else:  # its turn waits for every answer: the answer it waits for never comes in time
        assert waited[0]["error"] == "timeout"


SLOW_TOOL = '''
import asyncio

from raftlm.agents.calculator import calculator


async def slow_calculator(expression: str) -> str:
    """The calculator, answering after 0, 50 or 100 ms by the expression's first digit.

    Args:
        expression: What to compute.
    """
    await asyncio.sleep(0.05 * (int(expression[0]) % 3))
    return calculator(expression)
'''


def joining(script):
    """A scripted sampler that lets turns join as raftlm's does: its prompts' samples reported
    as they finish, then those `more()` returns, until it returns none."""
    def generate(policy, tokenizer, contexts, counts, config, *, seeds, on_finish, more,
                 **options):
        rows = script(policy, tokenizer, contexts, counts, config, seeds=seeds, **options)
        for i, row in enumerate(rows):
            for j, completion in enumerate(row):
                on_finish(i, j, completion)
        index = len(rows)
        while joined := more():
            generate.joined += len(joined)
            for context, count, seed in joined:
                [row] = script(policy, tokenizer, [context], [count], config, seeds=[seed],
                               **options)
                for j, completion in enumerate(row):
                    on_finish(index, j, completion)
                index += 1
        return rows

    generate.joined = 0
    return generate


def test_tool_trajectories_are_the_same_overlapped_and_turn_by_turn(tok, tmp_path, monkeypatch):
    write_digits_task(tmp_path)
    (tmp_path / "slow.py").write_text(SLOW_TOOL)
    config = RaftConfig.from_dict({
        "data": {"train_file": str(tmp_path / "train.jsonl")},
        "generation": {"max_new_tokens": 60},
        "rollout": {"tools": [f"{tmp_path / 'slow.py'}:slow_calculator"], "max_turns": 3}})
    rows = [{"prompt": f"Say {i} digits", "answer": str(i)} for i in range(1, 5)]
    prompts = build_prompt_set(rows, tok, prompt_field="prompt", max_prompt_tokens=4096,
                               system_prompt=None, source="test").records
    script = scripted_turns(tok, "slow_calculator")
    overlapped = joining(script)
    monkeypatch.setattr(rollout_module, "generate", overlapped)
    first = roll_out(None, tok, prompts, [3] * 4, config, 1).rows
    assert overlapped.joined > 0
    monkeypatch.setattr(rollout_module, "generate", script)
    pairs = assert_same_trajectories(first, roll_out(None, tok, prompts, [3] * 4, config, 1).rows)
    answers = [turn for a, _ in pairs for turn in a.turns if turn["role"] == "tool"]
    assert answers and all(turn["error"] is None for turn in answers)
    assert {turn["content"] for turn in answers} == {"1", "2", "3", "4"}
