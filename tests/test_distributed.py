"""Several processes: sharding, and 2-process CPU runs (gloo) that match a 1-process run."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import save_tiny_model, write_digits_task

from raftlm import RaftConfig, train
from raftlm.models.distributed import gather, shard, shard_bounds


def test_shards_cover_the_items_in_order_and_differ_by_at_most_one():
    for n in range(0, 12):
        for world in (1, 2, 3, 5):
            bounds = [shard_bounds(n, rank, world) for rank in range(world)]
            assert [i for start, end in bounds for i in range(start, end)] == list(range(n))
            sizes = [end - start for start, end in bounds]
            assert max(sizes) - min(sizes) <= 1


def test_a_single_process_shard_is_everything_and_gather_returns_it():
    items = list(range(7))
    assert shard(items) == items
    assert gather(shard(items)) == items


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """A workspace, its config (as a dict) and a 2-stage 1-process run to compare with."""
    workspace = tmp_path_factory.mktemp("distributed")
    model_dir = save_tiny_model(workspace / "model")
    write_digits_task(workspace)
    raw = {
        "run": {"output_dir": str(workspace / "one"), "seed": 1},
        "model": {"path": str(model_dir), "dtype": "fp32", "lora": {"r": 4, "alpha": 8}},
        "data": {"train_file": str(workspace / "train.jsonl"),
                 "eval_file": str(workspace / "eval.jsonl")},
        # 5 prompts split 3 + 2; 5 selected, 4 per optimizer step: the last step (1 example)
        # leaves one process without examples.
        "raft": {"stages": 2, "prompts_per_stage": 5, "samples_per_prompt": 3},
        "generation": {"max_new_tokens": 6, "batch_size": 8},
        "reward": {"terms": [f"{workspace / 'rewards.py'}:digits"]},
        "selection": {"strategy": "top_fraction", "top_fraction": 0.34},
        "training": {"learning_rate": 1e-2, "micro_batch_size": 2,
                     "gradient_accumulation_steps": 2},
        "tracking": {"report": False},
    }
    return workspace, raw, train(RaftConfig.from_dict(raw))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run(workspace, command) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(workspace / "hf")}
    done = subprocess.run(command, cwd=workspace, env=env, capture_output=True, text=True,
                          timeout=150)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def accelerate_launch(workspace, *args) -> str:
    """`accelerate launch` 2 processes on this CPU-only machine, as a user would."""
    return _run(workspace, [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), "-m", "raftlm", "train", *args,
    ])


def fsdp2_launch(workspace, *args) -> str:
    """2 processes with accelerate forced into FSDP2 on CPU (see tests/fsdp2_on_cpu.py)."""
    shim = Path(__file__).with_name("fsdp2_on_cpu.py")
    return _run(workspace, [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(_free_port()), str(shim), "train", *args,
    ])


def _candidates(run_dir, stage):
    path = Path(run_dir) / "stages" / f"{stage:03d}" / "candidates.jsonl"
    return [(r["prompt_id"], r["sample"], r["response"], r["selected"])
            for r in map(json.loads, path.read_text().splitlines())]


def _run_in_two_steps(launch, one_process, name):
    """Stage 1 in one 2-process launch, stage 2 in a 2-process resume: DDP/FSDP-trained
    weights, optimizer state and the prompt cursor all have to survive the checkpoint."""
    workspace, raw, _ = one_process
    raw = {**raw, "run": {**raw["run"], "output_dir": str(workspace / name)},
           "raft": {**raw["raft"], "stages": 1}}
    config_path = workspace / f"{name}.yaml"
    config_path.write_text(RaftConfig.from_dict(raw).to_yaml())
    out = launch(workspace, "--config", str(config_path))
    launch(workspace, "--config", str(config_path), "--resume", str(workspace / name),
           "--set", "raft.stages=2")
    return workspace / name, out


def _assert_same_run(two, one):
    for stage in (1, 2):
        assert _candidates(two, stage) == _candidates(one.run_dir, stage)
    metrics = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [m["stage"] for m in metrics] == [0, 1, 2]  # written once, by the main process
    for key in ("train/loss", "train/sft_loss", "train/grad_norm", "eval/kl_to_initial"):
        assert metrics[2][key] == pytest.approx(one.metrics[2][key], rel=1e-4, abs=1e-6), key
    for key in ("train/optimizer_steps", "tokens/trained", "train/n_selected"):
        assert metrics[2][key] == one.metrics[2][key], key


def test_two_ddp_processes_select_train_and_resume_like_one(one_process):
    two, out = _run_in_two_steps(accelerate_launch, one_process, "ddp")
    assert out.count("run directory:") == 1  # only the main process speaks
    _assert_same_run(two, one_process[2])


def test_two_fsdp2_processes_select_train_and_resume_like_one(one_process):
    two, _ = _run_in_two_steps(fsdp2_launch, one_process, "fsdp2")
    assert (two / "checkpoints/stage-002/policy/adapter_model.safetensors").is_file()
    _assert_same_run(two, one_process[2])
