"""Trajectories on 2 processes (gloo, CPU): the same stage as one process samples and keeps."""

from test_agents_train import COUNTER
from test_distributed import _candidates, accelerate_launch
from tiny import save_tiny_model, write_digits_task

from raftlm import RaftConfig, train


def test_two_processes_roll_out_and_select_the_trajectories_one_does(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    write_digits_task(tmp_path)
    (tmp_path / "envs.py").write_text(COUNTER)
    raw = {
        "run": {"output_dir": str(tmp_path / "one"), "seed": 1},
        "model": {"path": str(model_dir), "dtype": "fp32", "lora": {"r": 4, "alpha": 8}},
        "data": {"train_file": str(tmp_path / "train.jsonl")},
        "raft": {"stages": 1, "prompts_per_stage": 5, "samples_per_prompt": 2},
        "generation": {"max_new_tokens": 6, "batch_size": 8},
        "reward": {"terms": [f"{tmp_path / 'rewards.py'}:digits"]},
        "training": {"learning_rate": 1e-2, "micro_batch_size": 2},
        "evaluation": {"enabled": False},
        "tracking": {"report": False},
        "rollout": {"environment": f"{tmp_path / 'envs.py'}:Counter", "max_turns": 3,
                    "max_trajectory_tokens": 200},
    }
    one = train(RaftConfig.from_dict(raw))
    raw["run"]["output_dir"] = str(tmp_path / "two")
    (tmp_path / "two.yaml").write_text(RaftConfig.from_dict(raw).to_yaml())
    accelerate_launch(tmp_path, "--config", str(tmp_path / "two.yaml"))
    assert _candidates(tmp_path / "two", 1) == _candidates(one.run_dir, 1)
