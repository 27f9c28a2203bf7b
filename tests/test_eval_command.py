"""`raftlm eval`: any model (run directory, checkpoint, HF folder, GGUF file) on any sets, a
JSON summary and one JSONL row per prompt; bad input answered in one line."""

import json

import pytest
from tiny import save_tiny_bpe_model

from raftlm import RaftConfig, train
from raftlm.cli import main as cli_main
from raftlm.tools.export import export


@pytest.fixture
def workspace(tmp_path):
    rows = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(4)]
    (tmp_path / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def eval_cli(*args: str) -> int:
    return cli_main(["eval", *map(str, args), "--quiet"])


def test_a_model_folder_on_a_file_set_writes_the_summary_and_one_row_per_prompt(
        workspace, tiny_model_dir, capsys):
    output = workspace / "out/sums.json"
    assert eval_cli(tiny_model_dir, "--file", workspace / "sums.jsonl", "--limit", 3,
                    "--samples", 2, "--max-new-tokens", 4, "--output", output) == 0
    summary = json.loads(output.read_text())
    assert summary["model"] == str(tiny_model_dir) and summary["checkpoint"] is None
    assert summary["eval/sums/prompts"] == 3
    for key in ("accuracy", "avg@2", "maj@2", "pass@1", "pass@2", "response_tokens_mean"):
        assert f"eval/sums/{key}" in summary, key
    rows = [json.loads(line) for line in (workspace / "out/sums.items.jsonl").open()]
    assert [r["prompt"] for r in rows] == [f"What is {i} + 1?" for i in range(3)]
    assert rows[0]["answer"] == "1" and set(rows[0]["correct"]) == {"lenient"}  # auto
    assert len(rows[0]["samples"]) == 2 and "extracted" in rows[0]["samples"][0]
    assert f"written to {output}" in capsys.readouterr().out


def test_the_gsm8k_preset_reports_strict_and_lenient(workspace, tiny_model_dir):
    output = workspace / "gsm8k.json"
    assert eval_cli(tiny_model_dir, "--preset", "gsm8k", "--limit", 2, "--max-new-tokens", 3,
                    "--output", output) == 0
    summary = json.loads(output.read_text())
    assert summary["eval/gsm8k/prompts"] == 2
    assert {"eval/gsm8k/accuracy", "eval/gsm8k/accuracy_lenient"} <= set(summary)
    row = json.loads((workspace / "gsm8k.items.jsonl").open().readline())
    assert row["answer"] == "18" and set(row["extracted"]) == {"strict", "lenient"}


def test_a_gguf_file_is_evaluated_like_any_model(workspace, tmp_path):
    gguf = export(save_tiny_bpe_model(tmp_path / "bpe"), tmp_path / "tiny.gguf", "gguf")
    output = workspace / "gguf.json"
    assert eval_cli(gguf, "--file", workspace / "sums.jsonl", "--limit", 1, "--max-new-tokens",
                    2, "--output", output, "--set", f"model.cache_dir={tmp_path / 'cache'}") == 0
    assert list((tmp_path / "cache").iterdir())  # --set reached the config of a plain model
    assert json.loads(output.read_text())["eval/sums/prompts"] == 1


def write_config(workspace, model_dir):
    config = RaftConfig.from_dict({
        "run": {"output_dir": str(workspace / "run"), "seed": 1},
        "model": {"path": str(model_dir), "dtype": "fp32", "lora": {"r": 4, "alpha": 8}},
        "data": {"train_file": str(workspace / "sums.jsonl"),
                 "eval_file": str(workspace / "sums.jsonl")},
        "raft": {"stages": 1, "prompts_per_stage": 2, "samples_per_prompt": 2},
        "generation": {"max_new_tokens": 4},
        "evaluation": {"sampled": False},
        "tracking": {"report": False},
    })
    path = workspace / "config.yaml"
    path.write_text(config.to_yaml())
    return path


@pytest.fixture
def run_dir(workspace, tiny_model_dir):
    train(RaftConfig.from_yaml(write_config(workspace, tiny_model_dir)))
    return workspace / "run"


def test_a_run_directory_a_stage_and_a_checkpoint_folder(run_dir, capsys):
    checkpoint = run_dir / "checkpoints/stage-001"
    assert eval_cli(run_dir, "--preset", "arithmetic", "--limit", 2) == 0
    newest = json.loads((checkpoint / "eval.json").read_text())
    assert newest["checkpoint"] == str(checkpoint) and "eval/arithmetic/accuracy" in newest
    assert eval_cli(run_dir, "--stage", 0) == 0  # the run's own held-out set, base model
    base = json.loads((run_dir / "eval.json").read_text())
    assert base["checkpoint"] is None and base["eval/prompts"] == 4
    assert eval_cli(checkpoint / "policy", "--output", run_dir / "again.json") == 0
    again = json.loads((run_dir / "again.json").read_text())
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()][1]
    assert again["eval/accuracy"] == pytest.approx(logged["eval/accuracy"])


@pytest.mark.parametrize("args, message", [
    ([], "give RUN_DIR|MODEL or --config FILE"),
    (["MODEL", "--limit", "3"], "--limit applies to --preset / --file sets"),
    (["MODEL", "--stage", "1", "--preset", "gsm8k"], "--stage needs a run directory"),
    (["MODEL"], "no evaluation set: give --preset NAME or --file PATH"),
    (["MODEL", "--file", "SUMS", "--shots", "2"], "--shots applies to --preset sets"),
    (["MODEL", "--preset", "gsm8k", "--samples", "-1"], "set 'gsm8k'.samples: expected >= 0"),
])
def test_bad_input_is_one_line(workspace, tiny_model_dir, capsys, args, message):
    args = [str(tiny_model_dir) if a == "MODEL" else str(workspace / "sums.jsonl")
            if a == "SUMS" else a for a in args]
    assert eval_cli(*args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
