"""Config: YAML loading, overrides, validation that names the field."""

import pytest

from raftlm.config import ConfigError, RaftConfig


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_values_and_overrides_are_applied(tmp_path):
    path = write(tmp_path, "data: {task: arithmetic}\nraft: {stages: 3}\n")
    config = RaftConfig.from_yaml(path, ["raft.stages=5", "generation.stop_strings=[END]"])
    assert config.raft.stages == 5
    assert config.generation.stop_strings == ["END"]
    assert config.training.epochs == 1  # default kept


def test_unknown_key_is_answered_with_the_closest_valid_name(tmp_path):
    path = write(tmp_path, "data: {task: arithmetic, promt_field: q}\n")
    with pytest.raises(ConfigError, match="unknown key 'data.promt_field'.*'data.prompt_field'"):
        RaftConfig.from_yaml(path)


def test_unknown_section_is_answered_with_the_closest_valid_name():
    with pytest.raises(ConfigError, match="did you mean 'training'"):
        RaftConfig.from_dict({"data": {"task": "arithmetic"}, "trainig": {}})


def test_wrong_type_names_the_field():
    with pytest.raises(ConfigError, match="raft.stages must be int"):
        RaftConfig.from_dict({"data": {"task": "arithmetic"}, "raft": {"stages": "many"}})


def test_out_of_range_value_names_the_field():
    with pytest.raises(ConfigError, match="selection.top_fraction"):
        RaftConfig.from_dict({"data": {"task": "arithmetic"}, "selection": {"top_fraction": 2}})


def test_missing_prompt_source_is_reported():
    with pytest.raises(ConfigError, match="train_file"):
        RaftConfig.from_dict({})


def test_reward_terms_accept_names_and_mappings():
    config = RaftConfig.from_dict({
        "data": {"task": "arithmetic"},
        "reward": {"terms": ["numeric_answer", {"model": "rm/", "weight": 0.5}]},
    })
    assert config.reward.terms[0].name == "numeric_answer"
    assert config.reward.terms[1].model == "rm/" and config.reward.terms[1].weight == 0.5


def test_resolved_config_round_trips_through_yaml(tmp_path):
    config = RaftConfig.from_dict({"data": {"task": "arithmetic"}, "raft": {"stages": 2}})
    path = write(tmp_path, config.to_yaml())
    assert RaftConfig.from_yaml(path) == config


def test_shipped_configs_load(tmp_path):
    from pathlib import Path

    for path in sorted(Path(__file__).parents[1].glob("configs/*.yaml")):
        RaftConfig.from_yaml(path)
