"""benchmarks/gpu_check.py: its --tiny run on CPU, its reporting, and its CUDA-only checks."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def load_script():
    """benchmarks/gpu_check.py as a module (it is a script, not part of the package)."""
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["gpu_check"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One `--tiny` run of all six sections, as a user would start it (PYTHONPATH=src)."""
    out = tmp_path_factory.mktemp("gpu_check") / "result.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--json", str(out)], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    rows = json.loads(out.read_text())["rows"] if out.is_file() else []
    return done, rows


def rows_of(rows: list[dict], section: int) -> list[dict]:
    return [r for r in rows if r["section"] == section]


def test_tiny_run_passes_and_prints_all_six_sections(tiny_run):
    done, _ = tiny_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for number in range(1, 7):
        assert f"== {number}. " in done.stdout
    assert "all checks passed" in done.stdout


def test_greedy_raftlm_sampler_matches_hf_generate_token_for_token(tiny_run):
    _, rows = tiny_run
    greedy = [r for r in rows_of(rows, 1) if r["check"].endswith("greedy raftlm == HF")]
    assert [r["check"] for r in greedy] == ["tiny fp32 greedy raftlm == HF",
                                            "tiny bf16 greedy raftlm == HF"]
    assert all(r["status"] == "ok" for r in greedy)
    assert greedy[0]["value"].startswith("4/4 identical")


def test_every_greedy_raftlm_token_is_the_argmax_of_a_full_forward(tiny_run):
    _, rows = tiny_run
    argmax = [r for r in rows_of(rows, 1) if r["check"].endswith("== forward argmax")]
    assert len(argmax) == 2 and all(r["status"] == "ok" for r in argmax)
    assert argmax[0]["value"].startswith("100.0% of 64 tokens exact")


def test_raft_runs_resume_from_stage_two_to_three(tiny_run):
    _, rows = tiny_run
    runs = rows_of(rows, 3)
    assert [r["check"].split()[0] for r in runs] == ["LoRA", "full"]
    for row in runs:
        assert row["status"] == "ok"
        assert "stages [0, 1, 2, 3], optimizer steps [1, 2, 3]" in row["value"]


def test_the_rounds_stage_paths_run_and_report_the_sampler_training_gap(tiny_run):
    _, rows = tiny_run
    round_rows = rows_of(rows, 6)
    assert [r["status"] for r in round_rows] == ["ok"] * 3
    assert all("|log pi_sampler - log pi_train|" in r["value"] for r in round_rows[:2])


def test_throughput_and_memory_sections_report_numbers(tiny_run):
    _, rows = tiny_run
    assert all("tok/s" in r["value"] for r in rows_of(rows, 2)) and len(rows_of(rows, 2)) == 2
    offload = rows_of(rows, 4)
    assert [r["check"].split(":")[0] for r in offload] == ["offload none", "offload phases"]
    assert all(r["value"].count(" MB") == 3 for r in offload)  # generate, reward, train
    assert len(rows_of(rows, 5)) == 4 and all(" MB" in r["value"] for r in rows_of(rows, 5))


def test_only_runs_the_selected_sections(monkeypatch, capsys):
    script = load_script()
    for number in script.SECTION_FUNCTIONS:
        monkeypatch.setitem(script.SECTION_FUNCTIONS, number,
                            lambda ctx, n=number: [script.Row(n, f"check {n}", "value", "ok")])
    assert script.main(["--tiny", "--only", "1,3"]) == 0
    out = capsys.readouterr().out
    assert "== 1. " in out and "== 3. " in out
    assert "== 2. " not in out and "check 2" not in out


def test_a_failing_section_is_reported_the_rest_runs_and_the_exit_code_is_one(
        monkeypatch, capsys):
    script = load_script()

    def broken(ctx):
        raise RuntimeError("CUDA error: an illegal memory access")

    monkeypatch.setitem(script.SECTION_FUNCTIONS, 1, broken)
    monkeypatch.setitem(script.SECTION_FUNCTIONS, 2,
                        lambda ctx: [script.Row(2, "after the failure", "ran", "ok")])
    assert script.main(["--tiny", "--only", "1,2"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "RuntimeError: CUDA error: an illegal memory access" in out
    assert "after the failure" in out and "1 failed check(s)" in out


def test_a_sampler_that_misses_the_argmax_fails_the_greedy_checks(monkeypatch, capsys):
    script = load_script()
    import raftlm.sampling.generate as generate_module

    def off_by_one(*args, **kwargs):  # each token replaced by the next id in the vocabulary
        rows = sample(*args, **kwargs)
        return [[([(t + 1) % 100 for t in ids], reason, lp) for ids, reason, lp in row]
                for row in rows]

    sample = generate_module.sample
    monkeypatch.setattr(generate_module, "sample", off_by_one)
    assert script.main(["--tiny", "--only", "1"]) == 1
    failed = [ln for ln in capsys.readouterr().out.splitlines() if " FAIL " in ln]
    assert any("fp32 greedy raftlm == HF" in ln for ln in failed)
    assert any("fp32 greedy raftlm == forward argmax" in ln for ln in failed)


def test_recorded_log_probs_that_disagree_with_the_model_fail(monkeypatch, capsys):
    script = load_script()
    import raftlm.sampling.generate as generate_module

    def certain(tokenizer, ids, reason, stops):
        completion = to_completion(tokenizer, ids, reason, stops)
        completion.token_log_probs = [0.0] * len(ids)  # "probability 1" for every token
        return completion

    to_completion = generate_module.to_completion
    monkeypatch.setattr(generate_module, "to_completion", certain)
    assert script.main(["--tiny", "--only", "1"]) == 1
    out = capsys.readouterr().out
    assert "not recorded" not in out
    assert all(" FAIL " in ln for ln in out.splitlines() if "log-probs vs teacher-forced" in ln)


def test_bandwidth_is_looked_up_from_the_gpu_name():
    script = load_script()
    assert script.bandwidth_for("NVIDIA H100 80GB HBM3") == 3350
    assert script.bandwidth_for("NVIDIA H200") == 4800
    assert script.bandwidth_for("Some Future GPU") is None


def test_bandwidth_limit_reads_the_weights_and_the_kv_cache_once_per_step():
    script = load_script()
    from _gpu_models import BuiltModels, llama_config

    config = llama_config("1.5b", 151_936)  # 28 layers, 2 kv heads of 128: 28 KiB/token bf16
    built = BuiltModels("1.5b", Path("p"), Path("r"), config, n_params=1_500_000_000)
    assert script.bandwidth_limit(built, 1, 0, 3000) == pytest.approx(1000.0)
    kv_bytes = 256 * 28 * 2 * 2 * 128 * 2 * 300
    assert script.bandwidth_limit(built, 256, 300, 3000) == pytest.approx(
        256 * 3000e9 / (3e9 + kv_bytes))


def test_synthetic_tokenizer_round_trips_every_token():
    load_script()  # puts benchmarks/ on sys.path
    from _gpu_models import build_tokenizer

    tokenizer = build_tokenizer(5000)
    ids = random.Random(0).choices(range(len(tokenizer)), k=400)
    text = tokenizer.decode(ids)
    assert len(tokenizer) == 5000
    assert tokenizer(text, add_special_tokens=False).input_ids == ids


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_offload_phases_lowers_the_cuda_peak_while_scoring(capsys):
    script = load_script()
    assert script.main(["--tiny", "--only", "4"]) == 0
    assert "phases lowers the reward-phase peak" in capsys.readouterr().out
