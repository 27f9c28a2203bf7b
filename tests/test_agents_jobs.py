"""`raftlm generate | score | select | finetune` on a tool run: a stage as four jobs equals the
stage of `raftlm train`, trajectories, turns and loss masks included (tiny model, scripted
turns: the tiny model cannot write a call)."""

import json

import torch
import yaml
from safetensors.torch import load_file
from tiny import scripted_turns, write_digits_task

import raftlm.agents.rollout as rollout_module
from raftlm.cli import main as cli_main


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_tool_runs_stage_as_jobs_equals_raftlm_train(tmp_path, tiny_model_dir, tok,
                                                       monkeypatch):
    write_digits_task(tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"output_dir": str(tmp_path / "run"), "seed": 1},
        "model": {"path": str(tiny_model_dir), "dtype": "fp32", "lora": {"r": 4, "alpha": 8}},
        "data": {"train_file": str(tmp_path / "train.jsonl")},
        "raft": {"stages": 1, "prompts_per_stage": 3, "samples_per_prompt": 2},
        "generation": {"max_new_tokens": 120, "batch_size": 8},
        "reward": {"terms": [f"{tmp_path / 'rewards.py'}:digits"]},
        "training": {"learning_rate": 1e-2, "micro_batch_size": 2},
        "evaluation": {"enabled": False},
        "rollout": {"tools": ["calculator"], "max_turns": 3}}))
    monkeypatch.setattr(rollout_module, "generate", scripted_turns(tok))
    assert cli_main(["train", "--config", str(config)]) == 0
    work, jobs = str(tmp_path / "work"), str(tmp_path / "jobs")
    for shard in ("1/2", "2/2"):
        assert cli_main(["generate", "--config", str(config), "--out", work,
                         "--shard", shard]) == 0
    assert cli_main(["score", work, "--config", str(config)]) == 0
    assert cli_main(["select", work, "--config", str(config)]) == 0
    assert cli_main(["finetune", "--config", str(config), "--data", work, "--out", jobs]) == 0

    reference = rows(tmp_path / "run/stages/001/candidates.jsonl")
    assert rows(tmp_path / "jobs/stages/001/candidates.jsonl") == reference
    called = [r for r in reference if '"name": "calculator"' in json.dumps(r)]
    assert called and any(r["selected"] for r in called)  # a trajectory with a call trained on
    # Trained on the model's tokens alone, as raftlm train: the same adapter, bit for bit.
    adapter = "checkpoints/stage-001/policy/adapter_model.safetensors"
    ours, theirs = load_file(str(tmp_path / "jobs" / adapter)), load_file(
        str(tmp_path / "run" / adapter))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
