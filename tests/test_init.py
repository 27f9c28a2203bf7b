"""`raftlm init DIR`: a task folder that loads, trains as written, and whose mistakes are named."""

from __future__ import annotations

import importlib.util
import json

import pytest
from tiny import save_tiny_model

from raftlm.cli import main as cli_main
from raftlm.config import RaftConfig
from raftlm.errors import InvalidInput
from raftlm.tools.init import REWARD_KINDS, init_task


@pytest.fixture
def task(tmp_path, monkeypatch):
    """`raftlm init mytask` run in an empty folder, as a user would."""
    monkeypatch.chdir(tmp_path)
    assert cli_main(["init", "mytask"]) == 0
    return tmp_path / "mytask"


def test_init_writes_a_config_prompts_and_a_reward(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["init", "mytask"]) == 0
    task = tmp_path / "mytask"
    assert sorted(p.name for p in task.iterdir()) == [
        "README.md", "config.yaml", "heldout.jsonl", "prompts.jsonl", "reward.py"]
    config = RaftConfig.from_yaml(task / "config.yaml")
    assert config.data.train_file == str(task / "prompts.jsonl")  # relative to the config
    monkeypatch.chdir(task)  # 34.7: from inside the task's folder the same files load
    assert RaftConfig.from_yaml("config.yaml").data.train_file == str(task / "prompts.jsonl")
    monkeypatch.chdir(tmp_path)
    assert config.reward.terms[0].name == "numeric_answer"
    rows = [json.loads(line) for line in (task / "prompts.jsonl").read_text().splitlines()]
    held_out = [json.loads(line) for line in (task / "heldout.jsonl").read_text().splitlines()]
    assert all(set(row) == {"prompt", "answer"} for row in rows + held_out)
    assert not {r["prompt"] for r in rows} & {r["prompt"] for r in held_out}
    assert "raftlm train --config mytask/config.yaml" in capsys.readouterr().out


def test_init_points_to_what_a_pip_install_has_not_to_docs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["init", "mytask"]) == 0
    out = capsys.readouterr().out
    readme = (tmp_path / "mytask" / "README.md").read_text()
    assert "docs/" not in out and "docs/" not in readme
    assert "mytask/README.md" in out
    for command in ["raftlm train --config mytask/config.yaml", "raftlm report mytask/run",
                    "raftlm eval", "raftlm sample mytask/run", "raftlm chat mytask/run",
                    "raftlm export mytask/run", "--help"]:
        assert command in readme


def test_the_reward_stub_scores_in_trls_signature(task):
    spec = importlib.util.spec_from_file_location("stub", task / "reward.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    scores = module.reward(prompts=["What is 2 + 3?"] * 3,
                           completions=["2 + 3 = 5", "It is 6.", "five"], answer=["5"] * 3)
    assert scores == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("reward", REWARD_KINDS)
@pytest.mark.parametrize("objective", ["sft", "grpo"])
def test_every_reward_kind_and_objective_writes_a_config_that_loads(tmp_path, reward, objective):
    init_task(tmp_path / "t", reward=reward, objective=objective)
    config = RaftConfig.from_yaml(tmp_path / "t" / "config.yaml")
    assert config.training.objective == objective
    term = config.reward.terms[0]
    assert {"numeric": term.name == "numeric_answer", "model": bool(term.model),
            "file": term.name.endswith("reward.py:reward"), "url": bool(term.url)}[reward]


def test_init_refuses_a_folder_that_has_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InvalidInput, match="exists and is not an empty folder"):
        init_task(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_the_written_config_trains_as_written(task, tmp_path):
    """The file as init wrote it, on a tiny model instead of the embedded one (speed)."""
    save_tiny_model(tmp_path / "tiny")
    assert cli_main(["train", "--config", "mytask/config.yaml", "--quiet",
                     "--set", "model.path=tiny", "--set", "raft.stages=1",
                     "--set", "raft.prompts_per_stage=2", "--set", "raft.samples_per_prompt=2",
                     "--set", "generation.max_new_tokens=4",
                     "--set", "data.max_eval_prompts=2"]) == 0
    metrics = [json.loads(line) for line in (task / "run" / "metrics.jsonl").read_text()
               .splitlines()]
    assert [m["stage"] for m in metrics if "eval/accuracy" in m] == [0, 1]


@pytest.mark.parametrize("old, new, message", [
    ("  stages: 2", "  stage: 2", "unknown key 'raft.stage'; did you mean 'raft.stages'?"),
    ("  stages: 2", "  stages: two", "raft.stages must be int, got 'two'"),
    ("  objective: sft", "  objective: rafft", "training.objective: expected sft, "
                                                "reward_weighted, raft++, reinforce_rej, grpo, dpo "
                                                "or rpo, "
                                                "got 'rafft'; did you mean 'raft++'?"),
    ("  min_reward: 1.0", "  min_reward: high", "selection.min_reward must be float, a list "
                                                "of float or a ramp {start, end}, got 'high'"),
])
def test_a_mistake_in_the_config_is_named_with_its_fix(task, capsys, old, new, message):
    config = task / "config.yaml"
    assert old in config.read_text()
    config.write_text(config.read_text().replace(old, new, 1))
    assert cli_main(["train", "--config", "mytask/config.yaml"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("raftlm train: error: mytask/config.yaml: ")
    assert message in error and "Traceback" not in error
