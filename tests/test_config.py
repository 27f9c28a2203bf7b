"""Config: YAML loading, overrides, validation that names the field."""

from dataclasses import dataclass, field
from typing import ClassVar

import pytest

from raftlm.config import (
    ConfigError,
    GenerationConfig,
    RaftConfig,
    field_choices,
    field_help,
    option,
)
from raftlm.config.schema import build, check_choices
from raftlm.config.sections import OBJECTIVES


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


# Typed loading: nested sections, lists of sections, choices -------------------------------------

@dataclass
class Judge:
    model: str = option("judge/", "Model folder.")
    retries: int = option(2, "Attempts per call.")
    mode: str = option("score", "How the judge answers.", choices=("score", "compare"))


@dataclass
class Term:
    string_form: ClassVar[str] = "name"
    name: str = option("", "Term name.")
    judge: Judge | None = option(None, "An optional nested section.")


@dataclass
class Section:
    b: list[Term] = option([], "A list of sections.")
    weights: dict[str, float] = option({}, "Named numbers.")


@dataclass
class Root:
    a: Section = field(default_factory=Section)


def test_optional_nested_section_loads_as_its_dataclass():
    root = build(Root, {"a": {"b": [{"name": "x", "judge": {"retries": 5}}, "y"]}}, "c.yaml")
    assert root.a.b[0].judge == Judge(retries=5)
    assert root.a.b[1] == Term(name="y", judge=None)  # the string form fills `name`


def test_list_of_sections_and_mapping_of_numbers_load_typed():
    root = build(Root, {"a": {"b": [{"name": "x"}], "weights": {"x": 1, "y": "0.5"}}}, "c.yaml")
    assert root.a.b == [Term(name="x")]
    assert root.a.weights == {"x": 1.0, "y": 0.5} and isinstance(root.a.weights["x"], float)


def test_wrong_type_inside_a_list_names_its_place():
    with pytest.raises(ConfigError, match=r"c.yaml: a.b\[1\].judge.retries must be int, got 'x'"):
        build(Root, {"a": {"b": ["ok", {"judge": {"retries": "x"}}]}}, "c.yaml")


def test_unknown_key_inside_a_list_item_names_its_place():
    with pytest.raises(ConfigError, match=r"unknown key 'a.b\[0\].judge.retry'; "
                                          r"did you mean 'a.b\[0\].judge.retries'"):
        build(Root, {"a": {"b": [{"judge": {"retry": 1}}]}}, "c.yaml")


def test_a_mapping_where_text_belongs_is_an_error_not_its_string():
    with pytest.raises(ConfigError, match=r"a.b\[0\].name must be str, got \{'x': 1\}"):
        build(Root, {"a": {"b": [{"name": {"x": 1}}]}}, "c.yaml")
    with pytest.raises(ConfigError, match="model.path must be str"):
        RaftConfig.from_dict({"data": {"task": "arithmetic"}, "model": {"path": {"x": 1}}})


def test_a_choice_in_a_nested_section_is_checked_with_a_suggestion():
    root = build(Root, {"a": {"b": [{"judge": {"mode": "compar"}}]}}, "c.yaml")
    with pytest.raises(ConfigError, match=r"a.b\[0\].judge.mode: expected score or compare, got "
                                          r"'compar'; did you mean 'compare'\?"):
        check_choices(root)


def test_bad_choice_names_the_field_the_choices_and_the_closest():
    with pytest.raises(ConfigError, match="generation.backend: expected raftlm, hf or vllm, got "
                                          "'vlm'; did you mean 'vllm'"):
        RaftConfig.from_dict({"data": {"task": "arithmetic"}}, ["generation.backend=vlm"])


def test_field_choices_are_the_ones_help_lists():
    assert field_choices(GenerationConfig, "backend") == ("raftlm", "hf", "vllm")
    assert field_choices(RaftConfig, "training.objective") == OBJECTIVES
    assert field_choices(Root, "a.b.judge.mode") == ("score", "compare")
    assert field_choices(RaftConfig, "raft.stages") == ()
    rows = {name: text for name, text, _ in field_help()}
    assert rows["selection.strategy"].endswith(
        "One of: best_per_prompt, top_fraction, top_k_per_prompt.")


def test_help_lists_the_fields_of_optional_and_listed_sections():
    names = [name for name, _, _ in field_help(Root)]
    assert names == ["a.b", "a.b[].name", "a.b[].judge", "a.b[].judge.model",
                     "a.b[].judge.retries", "a.b[].judge.mode", "a.weights"]


@pytest.mark.parametrize("override, message", [
    ("raft.stagess=3", r"--set raft.stagess=3: unknown key 'raft.stagess'; did you mean "
                       r"'raft.stages'\?"),
    ("raft.stages=abc", "--set: raft.stages must be int, got 'abc'"),
    ("raft.stages.x=1", "--set raft.stages.x=1: raft.stages is not a section"),
])
def test_a_typo_in_set_is_blamed_on_the_command_line_not_the_file(tmp_path, override, message):
    """34.12: the file was fine; the error must point at what the user typed."""
    path = write(tmp_path, "data:\n  task: arithmetic\n")
    with pytest.raises(ConfigError, match=message) as caught:
        RaftConfig.from_yaml(path, [override])
    assert str(path) not in str(caught.value)


def test_a_moved_name_works_in_set_too(tmp_path, capsys):
    path = write(tmp_path, "data:\n  task: arithmetic\n")
    config = RaftConfig.from_yaml(path, ["raft.max_sampling_rounds=2"])
    assert config.raft.dynamic.max_rounds == 2
    note = capsys.readouterr().err
    assert "--set raft.max_sampling_rounds is now raft.dynamic.max_rounds" in note


def test_relative_paths_in_a_config_are_relative_to_its_folder(tmp_path, monkeypatch, capsys):
    """34.7: `cd task && raftlm train --config config.yaml` and `raftlm train --config
    task/config.yaml` read the same files; names that are not paths stay names."""
    task = tmp_path / "task"
    task.mkdir()
    (task / "prompts.jsonl").write_text('{"prompt": "q", "answer": "1"}\n')
    (task / "rewards.py").write_text("def r(prompts, completions, **kw):\n    return [0.0]\n")
    path = task / "config.yaml"
    path.write_text("data:\n  train_file: prompts.jsonl\nreward:\n  terms:\n"
                    "  - rewards.py:r\n  - numeric_answer\n  - raftlm.rewards:math_answer\n"
                    "model:\n  path: embedded:smollm2-135m-instruct\n")
    for cwd in (tmp_path, task):
        monkeypatch.chdir(cwd)
        config = RaftConfig.from_yaml(path.relative_to(cwd))
        assert config.data.train_file == str(task / "prompts.jsonl")
        assert [t.name for t in config.reward.terms] == [
            f"{task / 'rewards.py'}:r", "numeric_answer", "raftlm.rewards:math_answer"]
        assert config.model.path == "embedded:smollm2-135m-instruct"
    monkeypatch.chdir(tmp_path)
    set_here = RaftConfig.from_yaml(path, ["data.train_file=task/prompts.jsonl"])
    assert set_here.data.train_file == "task/prompts.jsonl"  # --set: relative to the shell's


def test_a_path_found_only_from_the_working_folder_still_loads_with_a_note(tmp_path,
                                                                            monkeypatch, capsys):
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "prompts.jsonl").write_text('{"prompt": "q"}\n')
    path = tmp_path / "task" / "config.yaml"
    path.write_text("data:\n  train_file: task/prompts.jsonl\n")
    monkeypatch.chdir(tmp_path)
    assert RaftConfig.from_yaml(path).data.train_file == "task/prompts.jsonl"
    assert "relative paths in a config are relative to its folder" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["train"], ["generate", "--out", "w"], ["score", "w"],
                                     ["select", "w"], ["finetune", "--data", "w", "--out", "o"]])
def test_a_config_error_is_told_before_torch_is_imported(tmp_path, command):
    """34.2: config errors took 35-57 s on a busy machine, torch and transformers first."""
    import subprocess
    import sys

    path = write(tmp_path, "raft:\n  stagess: 3\ndata:\n  task: arithmetic\n")
    probe = ("import sys; from raftlm.cli import main; "
             f"code = main({[*command, '--config', str(path)]!r}); "
             "print(code, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert done.stdout.split() == ["2", "False"], done.stderr[-2000:]
    assert "unknown key 'raft.stagess'" in done.stderr
