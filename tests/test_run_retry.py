"""Running `raftlm train` again where a run failed: what nothing kept is started over (said in
a line); what a resume would reuse is named, with the command that resumes it."""

from __future__ import annotations

import json

import pytest
import yaml
from tiny import write_digits_task

from raftlm.cli import main as cli_main
from raftlm.run.rundir import RunDir, atomic_write_text

FAILING_REWARD = """
def digits(prompts, completions, **columns):
    raise RuntimeError("the reward is broken")
"""


def failed_run(root):
    """What a run that failed in its baseline evaluation leaves: config and no checkpoint."""
    atomic_write_text(root / "config.yaml", "run: {}\n")
    atomic_write_text(root / "metrics.jsonl", "")
    (root / "stages" / "001").mkdir(parents=True)
    return root


def test_a_run_that_kept_nothing_is_started_over_in_one_said_line(tmp_path):
    said = []
    RunDir.create(failed_run(tmp_path / "run"), overwrite=False, say=said.append)
    assert len(said) == 1 and "starting it over" in said[0]
    assert list((tmp_path / "run").iterdir()) == []


def test_a_stage_journal_with_samples_is_kept_and_the_resume_command_named(tmp_path):
    root = failed_run(tmp_path / "run")
    journal = root / "stages" / "001" / "journal.rank0.jsonl"
    journal.write_text(json.dumps({"journal": 2}) + "\n" + json.dumps({"prompt_id": 0}) + "\n")
    with pytest.raises(FileExistsError, match=f"samples of stage 1 in its journal.*raftlm train "
                                              f"--resume {root}"):
        RunDir.create(root, overwrite=False)
    assert journal.is_file()


def test_a_run_with_a_checkpoint_names_it_and_the_resume_command(tmp_path):
    root = failed_run(tmp_path / "run")
    (root / "checkpoints" / "stage-002").mkdir(parents=True)
    (root / "checkpoints" / "stage-002" / "state.json").write_text("{}")
    with pytest.raises(FileExistsError, match=f"the checkpoint of stage 2.*--resume {root}"):
        RunDir.create(root, overwrite=False)


def test_a_folder_without_a_run_is_not_deleted(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no run"):
        RunDir.create(tmp_path, overwrite=False)
    assert (tmp_path / "notes.txt").is_file()


def test_train_again_after_a_failed_baseline_needs_no_overwrite(tmp_path, tiny_model_dir,
                                                               capsys):
    task = write_digits_task(tmp_path, FAILING_REWARD)
    config = {
        "run": {"output_dir": str(tmp_path / "run")},
        "model": {"path": str(tiny_model_dir), "dtype": "fp32", "lora": {"r": 4, "alpha": 8}},
        "data": {"train_file": str(task / "train.jsonl"), "eval_file": str(task / "eval.jsonl")},
        "raft": {"stages": 1, "prompts_per_stage": 2, "samples_per_prompt": 2},
        "generation": {"max_new_tokens": 4},
        "reward": {"terms": [f"{task / 'rewards.py'}:digits"]},
        "tracking": {"report": False},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    train = ["train", "--config", str(tmp_path / "config.yaml"), "--quiet"]
    assert cli_main(train) != 0
    write_digits_task(tmp_path)  # the reward fixed
    capsys.readouterr()
    assert cli_main(train) == 0
    assert "starting it over" in capsys.readouterr().out
    assert RunDir(tmp_path / "run").checkpoints()
