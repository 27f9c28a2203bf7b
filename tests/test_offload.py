"""`offload: phases`: the policy and the reward models take turns on the accelerator."""

import json

import pytest
from tiny import save_tiny_model, tiny_reward_model, tiny_tokenizer

from raftlm import RaftConfig, train
from raftlm.models.offload import OffloadedReward, PhaseOffload

ACCELERATOR = "cuda:0"  # only a name here: nothing is allocated on it


class Placed:
    """Stands in for a model: remembers where `.to()` last put it."""

    def __init__(self, device="cpu"):
        self.device = str(device)
        self.moves = []

    def to(self, device):
        self.device = str(device)
        self.moves.append(self.device)
        return self


class FakeOptimizer:
    state: dict = {}


def test_the_policy_is_off_the_accelerator_while_reward_models_score():
    policy, reward_model = Placed(ACCELERATOR), Placed()
    offload = PhaseOffload(ACCELERATOR, policy, FakeOptimizer(), [reward_model], enabled=True)
    seen = {}

    def reward(prompts, completions):
        seen.update(policy=policy.device, reward_model=reward_model.device)
        return [0.0] * len(completions)

    assert reward_model.device == "cpu"  # starts out of the way
    OffloadedReward(reward, offload)(["p"], ["c"])
    assert seen == {"policy": "cpu", "reward_model": ACCELERATOR}
    assert (policy.device, reward_model.device) == (ACCELERATOR, "cpu")  # back for sampling


def test_the_policy_comes_back_when_the_reward_fails():
    policy, reward_model = Placed(ACCELERATOR), Placed()
    offload = PhaseOffload(ACCELERATOR, policy, FakeOptimizer(), [reward_model], enabled=True)

    def reward(prompts, completions):
        raise ValueError("broken reward")

    with pytest.raises(ValueError):
        OffloadedReward(reward, offload)(["p"], ["c"])
    assert (policy.device, reward_model.device) == (ACCELERATOR, "cpu")


def test_without_offload_reward_models_live_on_the_accelerator():
    policy, reward_model = Placed(ACCELERATOR), Placed()
    offload = PhaseOffload(ACCELERATOR, policy, FakeOptimizer(), [reward_model], enabled=False)
    with offload.scoring():
        assert (policy.device, reward_model.device) == (ACCELERATOR, ACCELERATOR)
    assert policy.moves == []


def test_offload_moves_nothing_on_a_cpu_only_machine():
    policy, reward_model = Placed(), Placed()
    offload = PhaseOffload("cpu", policy, FakeOptimizer(), [reward_model], enabled=True)
    assert not offload.enabled
    with offload.scoring():
        pass
    assert policy.moves == []


def test_a_run_with_offload_phases_and_a_reward_model_completes(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    reward_dir = tmp_path / "reward_model"
    tokenizer = tiny_tokenizer()
    tiny_reward_model(seed=0, vocab_size=len(tokenizer)).save_pretrained(reward_dir)
    tokenizer.save_pretrained(reward_dir)
    rows = [{"prompt": f"Say {i}"} for i in range(6)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = RaftConfig.from_dict({
        "run": {"output_dir": str(tmp_path / "run")},
        "model": {"path": str(model_dir), "dtype": "fp32", "lora": {"r": 4, "alpha": 8}},
        "data": {"train_file": str(tmp_path / "train.jsonl")},
        "raft": {"stages": 1, "prompts_per_stage": 2, "samples_per_prompt": 2},
        "generation": {"max_new_tokens": 4},
        "reward": {"terms": [{"model": str(reward_dir)}]},
        "tracking": {"report": False},
        "offload": "phases",
    })
    result = train(config)
    assert result.metrics[1]["train/n_selected"] == 2
