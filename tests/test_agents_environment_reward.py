"""An environment's own reward is a reward term: the built-in `environment_return` sums the
step rewards a step-shaped environment gave each trajectory (tiny model, scripted environment)."""

import json

import pytest
from tiny import write_digits_task

from raftlm import RaftConfig, train
from raftlm.rewards.reward import Reward, RewardError
from raftlm.rewards.verifiable import BUILTIN_REWARDS

# Every step pays the share of digits in the turn; None on the first step (no score yet).
SCORER = '''
class Scorer:
    """Three steps and done; each step after the first pays the share of digits written."""

    def reset(self, prompt, answer, **row):
        self.steps = 0
        return None

    def step(self, action):
        self.steps += 1
        share = sum(ch.isdigit() for ch in action) / max(len(action), 1)
        return f"step {self.steps}", (None if self.steps == 1 else share), self.steps >= 3
'''

STEPS = [{"role": "assistant", "content": "1"}, {"role": "user", "content": "a", "reward": None},
         {"role": "assistant", "content": "2"}, {"role": "user", "content": "b", "reward": 0.25},
         {"role": "assistant", "content": "3"}, {"role": "user", "content": "c", "reward": 0.5}]


def environment_reward() -> Reward:
    return Reward([("environment_return", 1.0, BUILTIN_REWARDS["environment_return"])])


def test_the_return_is_the_sum_of_the_step_rewards_none_adding_nothing():
    cut_before_its_first_step = [{"role": "assistant", "content": "1"}]
    result = environment_reward()(["p", "p"], ["x", "y"], trajectories=[STEPS,
                                                                         cut_before_its_first_step])
    assert result.scores.tolist() == [0.75, 0.0]


@pytest.mark.parametrize("trajectory, says", [
    (None, "this response is single-turn"),
    ([{"role": "assistant", "content": "<tool_call>"},
      {"role": "tool", "name": "calculator", "content": "4"}], "this trajectory called tools"),
])
def test_a_response_no_environment_scored_is_refused_in_one_line(trajectory, says):
    with pytest.raises(RewardError, match=says) as raised:
        environment_reward()(["p"], ["x"], trajectories=[trajectory])
    assert "\n" not in str(raised.value)


def test_a_step_environment_run_is_ranked_by_its_environments_rewards(tmp_path, tiny_model_dir):
    write_digits_task(tmp_path)
    (tmp_path / "envs.py").write_text(SCORER)
    result = train(RaftConfig.from_dict({
        "run": {"output_dir": str(tmp_path / "run"), "seed": 1},
        "model": {"path": str(tiny_model_dir), "dtype": "fp32", "lora": {"r": 4, "alpha": 8}},
        "data": {"train_file": str(tmp_path / "train.jsonl")},
        "raft": {"stages": 1, "prompts_per_stage": 3, "samples_per_prompt": 2},
        "generation": {"max_new_tokens": 6, "batch_size": 8},
        "reward": {"terms": ["environment_return"]},
        "training": {"learning_rate": 1e-2, "micro_batch_size": 2},
        "evaluation": {"enabled": False},
        "rollout": {"environment": f"{tmp_path / 'envs.py'}:Scorer", "max_turns": 3,
                    "max_trajectory_tokens": 200},
    }))
    rows = [json.loads(line) for line in (result.run_dir / "stages/001/candidates.jsonl").open()]
    assert len(rows) == 3 * 2
    for row in rows:
        steps = [turn for turn in row["turns"] if turn["role"] == "user"]
        assert len(steps) == 3 and steps[0]["reward"] is None
        assert row["reward"] == pytest.approx(sum(turn["reward"] for turn in steps[1:]))
        assert row["rewards"] == {"environment_return": row["reward"]}
    assert len({row["reward"] for row in rows}) > 1, "the scripted rewards differ by trajectory"
    stage = result.metrics[1]
    assert stage["rollout/turns_mean"] == 3.0 and stage["rollout/tool_errors"] == 0
    assert stage["reward/environment_return/mean"] == pytest.approx(
        sum(row["reward"] for row in rows) / len(rows))
