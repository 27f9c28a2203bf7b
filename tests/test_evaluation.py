"""Held-out evaluation: metric definitions, KL to the initial policy, `raftlm eval`, trackers."""

import json

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from hypothesis import given
from hypothesis import strategies as st

from raftlm import RaftConfig, train
from raftlm.cli import main as cli_main
from raftlm.config import TrackingConfig, TrainingConfig
from raftlm.data.prompts import load_prompt_sets
from raftlm.evaluation.evaluate import kl_to_initial
from raftlm.evaluation.metrics import best_of_k, distinct_n, reward_distribution, sequence_kl
from raftlm.models.loading import load_policy
from raftlm.run.rundir import RunDir
from raftlm.run.tracking import Tracker
from raftlm.sampling.generate import generate
from raftlm.training.batches import Example
from raftlm.training.trainer import PolicyTrainer

CPU = torch.device("cpu")
SAMPLED_KEYS = ("eval/sampled_reward_mean", "eval/best_of_k_reward", "eval/sampled_accuracy",
                "eval/pass_at_k", "eval/distinct_1", "eval/distinct_2",
                "eval/sampled_tokens_mean", "eval/kl_to_initial")


# Metric definitions ---------------------------------------------------------------------------

def test_distinct_n_is_unique_over_total_word_ngrams_pooled_over_responses():
    texts = ["a b a", "a  b"]  # words: a b a | a b
    assert distinct_n(texts, 1) == pytest.approx(2 / 5)
    assert distinct_n(texts, 2) == pytest.approx(2 / 3)  # (a b) (b a) (a b)
    assert distinct_n(["x y", "y x"], 2) == 1.0


def test_distinct_n_is_undefined_without_any_ngram():
    assert distinct_n(["", "one"], 2) is None


@given(st.lists(st.lists(st.floats(-1e6, 1e6) | st.just(float("nan")), min_size=3, max_size=3),
                min_size=1, max_size=6))
def test_best_of_k_is_at_least_the_mean_reward(rows):
    rewards = np.array(rows)
    best = best_of_k(rewards)
    valid = rewards[~np.all(np.isnan(rewards), axis=1)]
    if valid.size == 0:
        assert best is None
    else:
        assert best >= np.mean(np.nanmean(valid, axis=1)) - 1e-9  # vs the mean per prompt


def test_reward_distribution_spans_all_and_selected_candidates():
    rewards = np.array([[0.0, 1.0, np.nan], [2.0, 3.0, 4.0]])
    mask = np.array([[False, True, False], [False, False, True]])
    assert reward_distribution(rewards, mask) == {
        "train/reward_all_min": 0.0, "train/reward_all_median": 2.0, "train/reward_all_max": 4.0,
        "train/reward_selected_min": 1.0, "train/reward_selected_median": 2.5,
        "train/reward_selected_max": 4.0,
    }
    empty = reward_distribution(rewards, np.zeros_like(mask))
    assert empty["train/reward_selected_median"] is None


def test_sequence_kl_averages_summed_per_token_k3_estimates_over_responses():
    policy = [np.log([0.5, 0.5]), np.log([0.25])]
    initial = [np.log([0.25, 0.5]), np.log([0.25])]
    # r = log 0.25 - log 0.5 = -log 2 on one token: exp(r) - r - 1 = log 2 - 0.5; 0 elsewhere.
    assert sequence_kl(policy, initial) == pytest.approx((np.log(2) - 0.5) / 2)


def test_sequence_kl_is_not_negative_where_the_plain_log_ratio_mean_is():
    policy = [np.log([0.25, 0.5])]
    initial = [np.log([0.5, 0.5])]  # the sampled token is likelier under pi_0: log-ratio < 0
    assert np.sum(policy[0] - initial[0]) < 0
    assert sequence_kl(policy, initial) > 0


# KL to the initial policy on a tiny model ------------------------------------------------------

@pytest.fixture
def workspace(tmp_path):
    rows = [{"prompt": f"Say {i} digits", "answer": str(i)} for i in range(8)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "rewards.py").write_text(
        "def digits(prompts, completions, **columns):\n"
        "    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]\n"
    )
    return tmp_path


def make_config(workspace, model_dir, lora=True, **sections) -> RaftConfig:
    raw = {
        "run": {"output_dir": str(workspace / "run"), "seed": 3},
        "model": {"path": str(model_dir), "dtype": "fp32",
                  "lora": {"enabled": lora, "r": 4, "alpha": 8}},
        "data": {"train_file": str(workspace / "prompts.jsonl"),
                 "eval_file": str(workspace / "prompts.jsonl"), "max_eval_prompts": 4},
        "raft": {"stages": 1, "prompts_per_stage": 4, "samples_per_prompt": 3},
        "generation": {"max_new_tokens": 6, "batch_size": 16},
        "reward": {"terms": [f"{workspace / 'rewards.py'}:digits"]},
        "training": {"learning_rate": 1e-2, "micro_batch_size": 4},
        "evaluation": {"samples_per_prompt": 3},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return RaftConfig.from_dict(raw)


def sampled_kl(policy, tokenizer, config) -> float:
    _, prompts = load_prompt_sets(config, tokenizer)
    completions = generate(policy, tokenizer, [r.token_ids for r in prompts.records], 3,
                           config.generation, seeds=[7] * len(prompts))
    return kl_to_initial(policy, tokenizer, prompts.records, completions, config)


@pytest.mark.parametrize("lora, temperature", [(True, 1.0), (False, 1.0), (True, 0.5)],
                         ids=["lora", "full", "lora-T0.5"])
def test_kl_is_zero_for_the_unchanged_policy(workspace, tiny_model_dir, lora, temperature):
    config = make_config(workspace, tiny_model_dir, lora=lora,
                         generation={"temperature": temperature})
    policy, tokenizer = load_policy(config.model, CPU, torch.float32)
    # pi_t's log-probs are recorded while sampling (at T), pi_0's by a forward pass at the
    # same T: equal up to rounding.
    assert sampled_kl(policy, tokenizer, config) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_kl_is_positive_after_a_training_step(workspace, tiny_model_dir, lora):
    config = make_config(workspace, tiny_model_dir, lora=lora)
    policy, tokenizer = load_policy(config.model, CPU, torch.float32)
    _, prompts = load_prompt_sets(config, tokenizer)
    trainer = PolicyTrainer(policy, TrainingConfig(learning_rate=5e-2, micro_batch_size=4), 4,
                         Accelerator(cpu=True), tokenizer.pad_token_id, seed=0)
    examples = [Example(r.token_ids, tokenizer.encode("7777")) for r in prompts.records]
    trainer.train(examples * 4, stage=1)  # 4 optimizer steps towards answering "7777"
    assert sampled_kl(policy, tokenizer, config) > 0.01


# Metrics every stage ---------------------------------------------------------------------------

def test_every_stage_records_sampled_metrics_and_the_reward_spread(workspace, tiny_model_dir):
    config = make_config(workspace, tiny_model_dir, raft={"stages": 2},
                         evaluation={"samples_per_prompt": 3, "sampled_every": 1},
                         tracking={"report": False})
    metrics = train(config).metrics
    for record in metrics:
        for key in SAMPLED_KEYS + ("eval/reward_mean", "eval/accuracy"):
            assert key in record, (record["stage"], key)
        assert record["eval/best_of_k_reward"] >= record["eval/sampled_reward_mean"]
    assert metrics[0]["eval/kl_to_initial"] == pytest.approx(0.0, abs=1e-6)
    # A weak update's single estimate may fall either side of its (small, positive) mean.
    assert metrics[2]["eval/kl_to_initial"] != 0
    for record in metrics[1:]:
        assert record["train/reward_all_min"] <= record["train/reward_selected_min"]
        assert record["train/reward_selected_max"] <= record["train/reward_all_max"]
        assert record["train/reward_all_median"] <= record["train/reward_all_max"]


def test_evaluation_every_n_stages_keeps_the_first_and_last(workspace, tiny_model_dir):
    config = make_config(workspace, tiny_model_dir, raft={"stages": 3},
                         evaluation={"every": 2, "sampled": False}, tracking={"report": False})
    metrics = train(config).metrics
    assert [("eval/accuracy" in r) for r in metrics] == [True, False, True, True]


def test_by_default_only_the_last_stage_gets_sampled_metrics(workspace, tiny_model_dir):
    config = make_config(workspace, tiny_model_dir, raft={"stages": 2},
                         tracking={"report": False})
    metrics = train(config).metrics
    assert [("eval/accuracy" in r) for r in metrics] == [True, True, True]
    assert [any(key in r for key in SAMPLED_KEYS) for r in metrics] == [False, False, True]
    assert all(key in metrics[2] for key in SAMPLED_KEYS)


def test_sampled_every_n_stages_keeps_the_last(workspace, tiny_model_dir):
    config = make_config(workspace, tiny_model_dir, raft={"stages": 3},
                         evaluation={"samples_per_prompt": 3, "sampled_every": 2},
                         tracking={"report": False})
    metrics = train(config).metrics
    assert [("eval/sampled_accuracy" in r) for r in metrics] == [True, False, True, True]


def test_sampling_fewer_evaluations_leaves_training_and_greedy_accuracy_alone(
        workspace, tiny_model_dir):
    def run(sampled_every: int, name: str) -> list[dict]:
        config = make_config(workspace, tiny_model_dir, raft={"stages": 2},
                             run={"output_dir": str(workspace / name)},
                             evaluation={"samples_per_prompt": 3,
                                         "sampled_every": sampled_every},
                             tracking={"report": False})
        return train(config).metrics

    every, last_only = run(1, "every"), run(0, "last")
    for a, b in zip(every, last_only, strict=True):
        assert {k: v for k, v in a.items() if k.startswith(("train/", "tokens/"))} == {
            k: v for k, v in b.items() if k.startswith(("train/", "tokens/"))}
        assert a["eval/accuracy"] == b["eval/accuracy"]
        assert a["eval/reward_mean"] == b["eval/reward_mean"]


def test_a_negative_sampled_every_is_named(workspace, tiny_model_dir):
    with pytest.raises(ValueError, match=r"evaluation.sampled_every: expected >= 0, got -1$"):
        make_config(workspace, tiny_model_dir, evaluation={"sampled_every": -1})


def test_sampled_evaluation_can_be_switched_off(workspace, tiny_model_dir):
    config = make_config(workspace, tiny_model_dir, evaluation={"sampled": False},
                         tracking={"report": False})
    record = train(config).metrics[1]
    assert "eval/reward_mean" in record
    assert not any(key in record for key in SAMPLED_KEYS)


# raftlm eval ---------------------------------------------------------------------------------

def write_config(workspace, config: RaftConfig):
    path = workspace / "config.yaml"
    path.write_text(config.to_yaml())
    return path


def test_eval_cli_evaluates_the_base_model_folder(workspace, tiny_model_dir, capsys):
    path = write_config(workspace, make_config(workspace, tiny_model_dir))
    assert cli_main(["eval", "--config", str(path), "--set", "data.max_eval_prompts=3"]) == 0
    result = json.loads((workspace / "run/eval.json").read_text())
    assert result["eval/prompts"] == 3 and result["checkpoint"] is None
    assert result["eval/kl_to_initial"] == pytest.approx(0.0, abs=1e-5)  # up to rounding
    out = capsys.readouterr().out
    for key in SAMPLED_KEYS + ("eval/reward_mean", "eval/accuracy"):
        assert key in result and key in out, key


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_eval_cli_on_a_checkpoint_reproduces_the_runs_own_metrics(workspace, tiny_model_dir,
                                                                  lora, capsys):
    config = make_config(workspace, tiny_model_dir, lora=lora, tracking={"report": False})
    logged = train(config).metrics[1]
    checkpoint = RunDir(config.run.output_dir).checkpoint_dir(1)
    output = workspace / "stage1.json"
    assert cli_main(["eval", "--config", str(write_config(workspace, config)),
                     "--checkpoint", str(checkpoint), "--output", str(output)]) == 0
    assert f"written to {output}" in capsys.readouterr().out
    result = json.loads(output.read_text())
    for key in ("eval/reward_mean", "eval/accuracy", "eval/best_of_k_reward", "eval/distinct_2",
                "eval/kl_to_initial"):
        assert result[key] == pytest.approx(logged[key], abs=1e-4), key


def test_eval_cli_rejects_a_folder_without_a_model(workspace, tiny_model_dir, capsys):
    path = write_config(workspace, make_config(workspace, tiny_model_dir))
    (workspace / "empty").mkdir()
    assert cli_main(["eval", "--config", str(path), "--checkpoint",
                     str(workspace / "empty")]) == 2
    assert "no LoRA adapter" in capsys.readouterr().err


# Trackers -----------------------------------------------------------------------------------

def test_tensorboard_receives_every_numeric_metric_per_stage(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = Tracker(RunDir(tmp_path), TrackingConfig(tensorboard=True))
    tracker.log(0, {"eval/reward_mean": 0.25, "note": "text is not a scalar"})
    tracker.log(1, {"eval/reward_mean": 0.5, "train/n_selected": 4})
    tracker.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"eval/reward_mean", "train/n_selected"}
    points = [(e.step, e.value) for e in events.Scalars("eval/reward_mean")]
    assert points == [(0, 0.25), (1, 0.5)]


def test_wandb_logs_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is optional (pip install raftlm[tracking])")
    monkeypatch.setenv("WANDB_MODE", "offline")
    tracker = Tracker(RunDir(tmp_path), TrackingConfig(wandb=True))
    tracker.log(0, {"eval/reward_mean": 0.25})
    tracker.close()
    assert list((tmp_path / "wandb").glob("offline-run-*"))
