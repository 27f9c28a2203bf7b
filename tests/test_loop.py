"""The RAFT loop end to end on a tiny random model: run directory, resume, bad input."""

import json
import shutil

import numpy as np
import pytest
from tiny import write_digits_task

from raftlm import RaftConfig, train
from raftlm.cli import main as cli_main
from raftlm.rewards.reward import RewardError
from raftlm.stage.loop import summary_line

REWARD_FILE = """
def digits(prompts, completions, answer, **columns):
    # Reward the share of digits; `answer` proves extra columns reach the reward.
    assert len(answer) == len(completions)
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]

def nan_on_third(prompts, completions, **columns):
    return [float("nan") if i == 2 else 0.0 for i in range(len(completions))]

def too_few(prompts, completions, **columns):
    return [0.0] * (len(completions) - 1)
"""


@pytest.fixture
def workspace(tmp_path, tiny_model_dir):
    write_digits_task(tmp_path, REWARD_FILE)
    return tmp_path


def make_config(workspace, model_dir, **sections) -> RaftConfig:
    raw = {
        "run": {"output_dir": str(workspace / "run"), "seed": 1},
        "model": {"path": str(model_dir), "dtype": "fp32", "lora": {"r": 4, "alpha": 8}},
        "data": {"train_file": str(workspace / "train.jsonl"),
                 "eval_file": str(workspace / "eval.jsonl")},
        "raft": {"stages": 2, "prompts_per_stage": 4, "samples_per_prompt": 3},
        "generation": {"max_new_tokens": 6, "batch_size": 8},
        "reward": {"terms": [f"{workspace / 'rewards.py'}:digits"]},
        "training": {"learning_rate": 1e-2, "micro_batch_size": 2},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return RaftConfig.from_dict(raw)


def test_one_run_writes_a_readable_run_directory(workspace, tiny_model_dir):
    result = train(make_config(workspace, tiny_model_dir))
    run = result.run_dir
    assert (run / "config.yaml").is_file()
    assert [m["stage"] for m in result.metrics] == [0, 1, 2]
    stage1 = result.metrics[1]
    for key in ("train/reward_mean", "train/reward_selected_mean", "train/n_selected",
                "train/sft_loss", "eval/reward_mean", "eval/accuracy", "time/generate_s",
                "time/reward_s", "time/train_s", "tokens/generated"):
        assert key in stage1, key
    candidates = [json.loads(line) for line in (run / "stages/001/candidates.jsonl").open()]
    assert len(candidates) == 4 * 3
    assert sum(c["selected"] for c in candidates) == stage1["train/n_selected"] == 4
    for prompt_id in {c["prompt_id"] for c in candidates}:
        group = [c for c in candidates if c["prompt_id"] == prompt_id]
        best = max(group, key=lambda c: c["reward"])
        assert [c for c in group if c["selected"]][0]["reward"] == best["reward"]
    assert (run / "checkpoints/stage-002/policy/adapter_model.safetensors").is_file()
    assert (run / "checkpoints/stage-002/trainer_state.safetensors").is_file()
    # 34.8: the held-out answers of every evaluation are kept, one row per prompt
    for stage in (0, 1, 2):
        held_out = [json.loads(line) for line in (run / f"stages/{stage:03d}/eval.jsonl").open()]
        assert len(held_out) == 3 and all("response" in row for row in held_out)


def test_existing_run_is_not_replaced_without_overwrite(workspace, tiny_model_dir):
    train(make_config(workspace, tiny_model_dir, raft={"stages": 1}))
    with pytest.raises(FileExistsError, match="overwrite"):
        train(make_config(workspace, tiny_model_dir, raft={"stages": 1}))


def test_resume_gives_the_same_next_stage_as_an_uninterrupted_run(workspace, tiny_model_dir):
    full = train(make_config(workspace, tiny_model_dir, raft={"stages": 3}))
    reference = (full.run_dir / "stages/003/candidates.jsonl").read_text()
    shutil.rmtree(full.run_dir)

    first = train(make_config(workspace, tiny_model_dir, raft={"stages": 2}))
    resumed = train(make_config(workspace, tiny_model_dir, raft={"stages": 3}), resume=True)
    assert resumed.run_dir == first.run_dir
    assert (resumed.run_dir / "stages/003/candidates.jsonl").read_text() == reference
    assert [m["stage"] for m in resumed.metrics] == [0, 1, 2, 3]
    assert resumed.metrics[-1]["train/sft_loss"] == pytest.approx(
        full.metrics[-1]["train/sft_loss"], rel=1e-4)


def test_full_fine_tuning_resumes_from_its_model_checkpoint(workspace, tiny_model_dir):
    lora_off = {"lora": {"enabled": False}}
    full = train(make_config(workspace, tiny_model_dir, model=lora_off, raft={"stages": 2}))
    reference = (full.run_dir / "stages/002/candidates.jsonl").read_text()
    shutil.rmtree(full.run_dir)
    train(make_config(workspace, tiny_model_dir, model=lora_off, raft={"stages": 1}))
    resumed = train(make_config(workspace, tiny_model_dir, model=lora_off, raft={"stages": 2}),
                    resume=True)
    assert (resumed.run_dir / "stages/002/candidates.jsonl").read_text() == reference


def test_reward_returning_nan_stops_the_run_naming_reward_and_item(workspace, tiny_model_dir):
    spec = f"{workspace / 'rewards.py'}:nan_on_third"
    with pytest.raises(RewardError, match=r"nan_on_third.*item 2"):
        train(make_config(workspace, tiny_model_dir, reward={"terms": [spec]}))


def test_reward_returning_the_wrong_count_stops_the_run(workspace, tiny_model_dir):
    spec = f"{workspace / 'rewards.py'}:too_few"
    with pytest.raises(RewardError, match=r"too_few.* returned 2 scores for 3 completions"):
        train(make_config(workspace, tiny_model_dir, reward={"terms": [spec]}))


def test_skip_mode_drops_and_counts_invalid_candidates(workspace, tiny_model_dir):
    spec = f"{workspace / 'rewards.py'}:nan_on_third"
    config = make_config(workspace, tiny_model_dir, raft={"stages": 1},
                         reward={"terms": [spec], "on_error": "skip"},
                         evaluation={"enabled": False})
    result = train(config)
    assert result.metrics[1]["train/n_invalid_reward"] == 1
    rows = [json.loads(line) for line in (result.run_dir / "stages/001/candidates.jsonl").open()]
    assert [r["reward"] for r in rows].count(None) == 1
    assert not any(r["selected"] for r in rows if r["reward"] is None)


def test_cli_train_runs_from_a_yaml_file(workspace, tiny_model_dir, capsys):
    config = make_config(workspace, tiny_model_dir, raft={"stages": 1})
    path = workspace / "config.yaml"
    path.write_text(config.to_yaml())
    assert cli_main(["train", "--config", str(path), "--set", "raft.prompts_per_stage=2"]) == 0
    out = capsys.readouterr().out
    assert "stage 1/1" in out and "eval/reward_mean" in out
    metrics = [json.loads(line) for line in (workspace / "run/metrics.jsonl").open()]
    assert metrics[1]["train/n_selected"] == 2


def test_cli_reports_config_errors_with_the_field_name(workspace, tiny_model_dir, capsys):
    path = workspace / "bad.yaml"
    path.write_text("data: {task: arithmetic}\nraft: {stags: 2}\n")
    assert cli_main(["train", "--config", str(path)]) == 2
    assert "did you mean 'raft.stages'" in capsys.readouterr().err


def test_cli_help_explains_every_config_field(capsys):
    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    out = capsys.readouterr().out
    for field in ("raft.samples_per_prompt", "selection.strategy", "training.lr_scheduler"):
        assert field in out


def test_sample_seeds_do_not_depend_on_batch_composition():
    from raftlm.sampling.generate import sample_seeds

    together = sample_seeds(0, 3, [5, 9, 2])
    assert sample_seeds(0, 3, [2]) == [together[2]]
    assert len(set(together)) == 3
    assert sample_seeds(0, 4, [5]) != [together[0]]
    assert np.all(np.array(together) >= 0)


def test_cli_reports_a_malformed_prompt_line_with_its_line_number(workspace, tiny_model_dir,
                                                                  capsys):
    (workspace / "train.jsonl").write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b",\n')
    config = make_config(workspace, tiny_model_dir, raft={"stages": 1})
    path = workspace / "config.yaml"
    path.write_text(config.to_yaml())
    assert cli_main(["train", "--config", str(path)]) == 2
    assert "train.jsonl:2" in capsys.readouterr().err


def test_cli_reports_a_failing_reward_without_a_traceback(workspace, tiny_model_dir, capsys):
    spec = f"{workspace / 'rewards.py'}:too_few"
    config = make_config(workspace, tiny_model_dir, raft={"stages": 1}, reward={"terms": [spec]})
    path = workspace / "config.yaml"
    path.write_text(config.to_yaml())
    assert cli_main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "too_few" in err and "Traceback" not in err


def test_summary_line_names_the_sampling_rounds_only_when_there_were_several():
    fixed = {"train/reward_mean": 0.25, "train/reward_selected_mean": 1.0, "train/n_selected": 3,
             "train/sft_loss": 0.5, "sampling/rounds": 1, "sampling/samples": 32,
             "sampling/useful_prompts": 3, "sampling/prompts_drawn": 4, "time/generate_s": 2.0}
    assert summary_line(1, 2, fixed) == (
        "stage 1/2 | reward 0.250 -> selected 1.000 (n=3) | sft_loss 0.5000 | generate 2s")
    dynamic = {**fixed, "sampling/rounds": 3, "sampling/samples": 72,
               "sampling/useful_prompts": 4, "sampling/prompts_drawn": 9}
    assert summary_line(1, 2, dynamic).split(" | ")[2] == (
        "72 samples in 3 rounds, 4/9 prompts useful")
