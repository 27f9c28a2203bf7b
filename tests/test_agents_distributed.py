"""Trajectories on 2 processes (gloo, CPU): the same stage as one process samples and keeps."""

from test_agents_train import COUNTER, make_config
from test_distributed import _candidates, accelerate_launch
from tiny import save_tiny_model, write_digits_task

from raftlm import train


def test_two_processes_roll_out_and_select_the_trajectories_one_does(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    write_digits_task(tmp_path)
    (tmp_path / "envs.py").write_text(COUNTER)
    sections = {"raft": {"stages": 1, "prompts_per_stage": 5},  # split 3 + 2
                "tracking": {"report": False},
                "rollout": {"environment": f"{tmp_path / 'envs.py'}:Counter", "max_turns": 3,
                            "max_trajectory_tokens": 200}}
    one = train(make_config(tmp_path, model_dir, **sections))
    two = make_config(tmp_path, model_dir, run={"output_dir": str(tmp_path / "two")}, **sections)
    (tmp_path / "two.yaml").write_text(two.to_yaml())
    accelerate_launch(tmp_path, "--config", str(tmp_path / "two.yaml"))
    assert _candidates(tmp_path / "two", 1) == _candidates(one.run_dir, 1)
