"""`raftlm generate | score | select | finetune`: a stage as four jobs equals the stage of
`raftlm train`; jobs shard, resume and refuse another config's work (tiny random model)."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny import write_digits_task

from raftlm.cli import main as cli_main
from raftlm.config import RaftConfig
from raftlm.jobs.steps import finetune_stage, generate_stage, score_stage, select_stage
from raftlm.jobs.workdir import WorkMismatch
from raftlm.run.journal import StageJournal

REWARD_FILE = """
def digits(prompts, completions, answer, **columns):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]
"""
# The fields of raftlm train's candidates.jsonl rows.
ROW_FIELDS = ("prompt_id", "prompt", "sample", "response", "original_prompt", "reward",
              "rewards", "selected", "finish_reason", "n_tokens")


class Killed(Exception):
    pass


@pytest.fixture
def workspace(tmp_path, tiny_model_dir):
    write_digits_task(tmp_path, REWARD_FILE)
    raw = {
        "run": {"output_dir": str(tmp_path / "run"), "seed": 1},
        "model": {"path": str(tiny_model_dir), "dtype": "fp32", "lora": {"r": 4, "alpha": 8}},
        "data": {"train_file": str(tmp_path / "train.jsonl"),
                 "eval_file": str(tmp_path / "eval.jsonl")},
        "raft": {"stages": 2, "prompts_per_stage": 4, "samples_per_prompt": 3},
        "generation": {"max_new_tokens": 6, "batch_size": 8},
        "reward": {"terms": [f"{tmp_path / 'rewards.py'}:digits"]},
        "training": {"learning_rate": 1e-2, "micro_batch_size": 2},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path


def load(workspace, *overrides):
    return RaftConfig.from_yaml(workspace / "config.yaml", list(overrides))


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def tensors(path):
    return {k: v for k, v in load_file(str(path)).items()}


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("objective", ["sft", "grpo"])  # grpo: advantages and pi_old ratios
def test_two_stages_as_jobs_equal_raftlm_train(workspace, objective):
    config, obj = str(workspace / "config.yaml"), f"training.objective={objective}"
    assert cli_main(["train", "--config", config, "--set", obj]) == 0
    run, jobs = workspace / "run", workspace / "jobs"
    for stage in (1, 2):
        work = str(workspace / f"work{stage}")
        start = [] if stage == 1 else ["--from", str(jobs)]
        for shard in ("1/3", "2/3", "3/3"):  # 4 prompts in shards of 1, 1 and 2
            assert cli_main(["generate", "--config", config, "--set", obj, "--out", work,
                             "--shard", shard, *start]) == 0
        assert cli_main(["score", work, "--config", config, "--set", obj]) == 0
        assert cli_main(["select", work, "--config", config, "--set", obj]) == 0
        assert cli_main(["finetune", "--config", config, "--set", obj, "--data", work,
                         "--out", str(jobs), *start]) == 0

        reference = rows(run / f"stages/00{stage}/candidates.jsonl")
        scored = rows(workspace / f"work{stage}/stages/00{stage}/candidates.jsonl")
        assert [{k: r[k] for k in ROW_FIELDS} for r in scored] == reference
        assert rows(jobs / f"stages/00{stage}/candidates.jsonl") == reference
        ours, theirs = jobs / f"checkpoints/stage-00{stage}", run / f"checkpoints/stage-00{stage}"
        assert same_tensors(tensors(ours / "policy/adapter_model.safetensors"),
                            tensors(theirs / "policy/adapter_model.safetensors"))
        assert same_tensors(tensors(ours / "trainer_state.safetensors"),
                            tensors(theirs / "trainer_state.safetensors"))  # AdamW, schedule
        assert (json.loads((ours / "state.json").read_text())
                == json.loads((theirs / "state.json").read_text()))  # the prompt order
        if stage == 1 and objective == "sft":  # finetune's run directory is raftlm train's
            shutil.copytree(jobs, workspace / "resumed")
            assert cli_main(["train", "--resume", str(workspace / "resumed")]) == 0
            adapter = "checkpoints/stage-002/policy/adapter_model.safetensors"
            assert same_tensors(tensors(workspace / "resumed" / adapter), tensors(run / adapter))
    for ours, theirs in zip(rows(jobs / "metrics.jsonl"), rows(run / "metrics.jsonl")[1:]):
        numbers = {k: v for k, v in theirs.items() if not k.startswith(("time/", "eval/"))}
        assert {k: ours[k] for k in numbers} == numbers


def test_the_kept_set_is_written_as_prompt_completion_rows_and_a_datasets_folder(workspace):
    datasets = pytest.importorskip("datasets")
    config = load(workspace, "data.system_prompt=Be brief.")
    generate_stage(config, workspace / "work")
    score_stage(config, workspace / "work")
    out = select_stage(config, workspace / "work", out=workspace / "kept.jsonl",
                       datasets_out=workspace / "kept")
    kept = rows(out)
    candidates = rows(workspace / "work/stages/001/candidates.jsonl")
    selected = [r for r in candidates if r["selected"]]
    assert len(kept) == len(selected) == 4  # best_per_prompt: one per prompt
    for row, chosen in zip(kept, selected):
        assert row["prompt"] == [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": chosen["original_prompt"]}]
        assert row["completion"] == [{"role": "assistant", "content": chosen["response"]}]
        assert (row["reward"], row["weight"]) == (chosen["reward"], 1.0)
    assert datasets.load_from_disk(str(workspace / "kept")).to_list() == kept
    assert cli_main(["report", str(workspace / "work")]) == 0  # a work folder is a run directory
    assert (workspace / "work/report.html").is_file()


def test_a_killed_generate_continues_with_the_samples_it_finished(workspace, monkeypatch):
    config = load(workspace)
    reference = rows(generate_stage(config, workspace / "whole"))
    original, calls = StageJournal.add_sample, {"n": 0}

    def die_at_the_5th_sample(self, *args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise Killed
        original(self, *args)

    monkeypatch.setattr(StageJournal, "add_sample", die_at_the_5th_sample)
    with pytest.raises(Killed):
        generate_stage(config, workspace / "work")
    sampled = []
    monkeypatch.setattr(StageJournal, "add_sample",
                        lambda self, *args: (sampled.append(args[:2]), original(self, *args)))
    assert rows(generate_stage(config, workspace / "work"))[1:] == reference[1:]
    assert len(sampled) == 12 - 4  # only the samples the killed job had not finished
    assert not (workspace / "work/stages/001/shards/001-of-001").exists()  # journal removed


def test_a_killed_score_continues_without_scoring_again(workspace, monkeypatch):
    config = load(workspace)
    generate_stage(config, workspace / "ref")
    reference = rows(score_stage(config, workspace / "ref"))
    generate_stage(config, workspace / "work")
    original, journaled = StageJournal.add_rewards, []

    def die_at_the_3rd_prompt(self, prompt_id, *args):
        if len(journaled) == 2:
            raise Killed
        journaled.append(prompt_id)
        original(self, prompt_id, *args)

    monkeypatch.setattr(StageJournal, "add_rewards", die_at_the_3rd_prompt)
    with pytest.raises(Killed):
        score_stage(config, workspace / "work")
    scored = []
    monkeypatch.setattr(StageJournal, "add_rewards",
                        lambda self, pid, *args: (scored.append(pid), original(self, pid, *args)))
    assert rows(score_stage(config, workspace / "work")) == reference
    assert len(scored) == 4 - 2 and not set(scored) & set(journaled)


def test_score_refuses_samples_of_another_config_in_one_line(workspace, capsys):
    config = str(workspace / "config.yaml")
    assert cli_main(["generate", "--config", config, "--out", str(workspace / "work")]) == 0
    capsys.readouterr()
    assert cli_main(["score", str(workspace / "work"), "--config", config,
                     "--set", "generation.temperature=0.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sampled under another config (generation differ" in err


def test_select_and_finetune_refuse_a_paired_objective_in_one_line(workspace, capsys):
    """dpo trains on (chosen, rejected) pairs; a work folder records one weight per response."""
    config, work = str(workspace / "config.yaml"), str(workspace / "work")
    assert cli_main(["generate", "--config", config, "--out", work]) == 0
    assert cli_main(["score", work, "--config", config]) == 0
    capsys.readouterr()
    dpo = ["--set", "training.objective=dpo"]
    assert cli_main(["select", work, "--config", config, *dpo]) == 2
    assert cli_main(["finetune", "--config", config, *dpo, "--data", work,
                     "--out", str(workspace / "out")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all("use raftlm train for it" in line for line in err)
    assert "raftlm select" in err[0] and "raftlm finetune" in err[1]


def test_shards_of_another_config_or_count_and_missing_shards_are_refused(workspace):
    config = load(workspace)
    generate_stage(config, workspace / "work", shard=(1, 2))
    with pytest.raises(WorkMismatch, match=r"run\.seed"):
        generate_stage(load(workspace, "run.seed=2"), workspace / "work", shard=(2, 2))
    with pytest.raises(WorkMismatch, match="split into 2 shards"):
        generate_stage(config, workspace / "work", shard=(2, 3))
    with pytest.raises(WorkMismatch, match="shard 2/2 not generated"):
        score_stage(config, workspace / "work")


def test_finetune_refuses_another_policy_selection_or_a_taken_out_folder(workspace):
    config = load(workspace)
    work = workspace / "work"
    generate_stage(config, work)
    score_stage(config, work)
    select_stage(config, work)
    with pytest.raises(WorkMismatch, match="selected under other selection"):
        finetune_stage(load(workspace, "selection.strategy=top_k_per_prompt",
                            "selection.top_k=2"), work, workspace / "out")
    finetune_stage(config, work, workspace / "out")
    with pytest.raises(WorkMismatch, match="already holds a run with checkpoints"):
        finetune_stage(config, work, workspace / "out")
    with pytest.raises(WorkMismatch, match="holds no stage 2 \\(already fine-tuned"):
        finetune_stage(config, work, workspace / "out", from_dir=workspace / "out")
    generate_stage(config, work, stage=2)  # sampled by the base model, not by out's stage 1
    score_stage(config, work, stage=2)
    with pytest.raises(WorkMismatch, match=r"policy \(--from\) differ"):
        finetune_stage(config, work, workspace / "out", from_dir=workspace / "out")
    with pytest.raises(WorkMismatch, match="last checkpoint is stage 1, whose policy samples "
                                           "stage 2"):
        finetune_stage(config, work, workspace / "out", from_dir=workspace / "out", stage=1)


def test_trl_sft_trainer_trains_on_the_datasets_folder(workspace, tiny_model_dir):
    pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = load(workspace)
    generate_stage(config, workspace / "work")
    score_stage(config, workspace / "work")
    select_stage(config, workspace / "work", datasets_out=workspace / "kept")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    trainer = trl.SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=trl.SFTConfig(output_dir=str(workspace / "trl"), max_steps=1, report_to=[],
                           per_device_train_batch_size=2, use_cpu=True, save_strategy="no"),
        train_dataset=load_from_disk(str(workspace / "kept")), processing_class=tokenizer)
    first = rows(workspace / "work/stages/001/candidates.jsonl")
    chosen = next(r for r in first if r["selected"])
    example = trainer.train_dataset[0]
    text = tokenizer.decode(example["input_ids"])
    assert text.startswith(chosen["prompt"] + chosen["response"])  # raftlm's own rendering
    # 31.23: TRL trains on the completion only, as raftlm does, never on the prompt's tokens
    trained = [t for t, label in zip(example["input_ids"], example["labels"]) if label != -100]
    assert tokenizer.decode(trained).startswith(chosen["response"])
    assert len(trained) < len(example["input_ids"])
    assert trainer.train().training_loss > 0


@pytest.mark.slow  # a 2-process launch (~20 s)
def test_finetune_under_accelerate_launch_trains_like_one_process(workspace):
    config = load(workspace)
    generate_stage(config, workspace / "work")
    score_stage(config, workspace / "work")
    one = finetune_stage(config, workspace / "work", workspace / "one")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    done = subprocess.run([
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", port, "-m", "raftlm", "finetune", "--data",
        str(workspace / "work"), "--out", str(workspace / "two")],
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(workspace / "hf")},
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("stage 1: trained on") == 1  # only the main process speaks
    two = workspace / "two/checkpoints/stage-001"
    a = tensors(one / "policy/adapter_model.safetensors")
    b = tensors(two / "policy/adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)  # DDP sums in another order
    [ours], [theirs] = rows(workspace / "one/metrics.jsonl"), rows(workspace / "two/metrics.jsonl")
    for key in ("train/optimizer_steps", "tokens/trained", "train/n_selected"):
        assert ours[key] == theirs[key], key


@pytest.mark.parametrize("collector", ["dynamic", "gvm"])
def test_generate_says_why_a_collector_that_decides_from_rewards_cannot_be_split(
        workspace, collector):
    """dynamic and gvm choose their later rounds from the rewards of earlier ones: sampling and
    scoring in separate jobs cannot run them, and generate says so before loading anything."""
    config = load(workspace, f"raft.collector={collector}", "selection.min_reward=0.5")
    with pytest.raises(WorkMismatch, match=f"raft.collector={collector} decides how many more "
                                           "samples to draw from the rewards"):
        generate_stage(config, workspace / "work")
    assert not (workspace / "work").exists()
