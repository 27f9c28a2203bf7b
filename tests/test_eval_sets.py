"""Several evaluation sets per run: the held-out set first under today's names, each other set
under eval/<name>/, accuracy from what the set or the user's reward says (issue 31.19)."""

import json

import numpy as np
import pytest
import torch

from raftlm import RaftConfig, train
from raftlm.cli import main as cli_main
from raftlm.config import ConfigError
from raftlm.data.prompts import build_prompt_set, load_prompt_sets
from raftlm.errors import UserError
from raftlm.evaluation.evaluate import evaluate
from raftlm.evaluation.extraction import EXTRACTIONS
from raftlm.evaluation.set_metrics import set_metrics
from raftlm.evaluation.sets import ResolvedSet, resolve_set
from raftlm.models.loading import load_policy
from raftlm.rewards.reward import build_reward
from raftlm.sampling.completion import Completion

CPU = torch.device("cpu")


@pytest.fixture
def workspace(tmp_path):
    capitals = [("Hungary", "Budapest"), ("France", "Paris"), ("Peru", "Lima"),
                ("Japan", "Tokyo")]
    rows = [{"prompt": f"What is the capital of {c}?", "answer": a} for c, a in capitals]
    (tmp_path / "capitals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sums = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(4)]
    (tmp_path / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sums))
    # A user's reward that knows nothing of numbers: 1 for a response of even length.
    (tmp_path / "rewards.py").write_text(
        "def even(prompts, completions, answer, **columns):\n"
        "    return [float(len(c) % 2 == 0) for c in completions]\n")
    return tmp_path


def config_for(workspace, model_dir, prompts="capitals.jsonl", **sections) -> RaftConfig:
    raw = {
        "run": {"output_dir": str(workspace / "run"), "seed": 3},
        "model": {"path": str(model_dir), "dtype": "fp32", "lora": {"r": 4, "alpha": 8}},
        "data": {"train_file": str(workspace / prompts), "eval_file": str(workspace / prompts)},
        "raft": {"stages": 1, "prompts_per_stage": 2, "samples_per_prompt": 2},
        "generation": {"max_new_tokens": 5, "batch_size": 16},
        "reward": {"terms": [f"{workspace / 'rewards.py'}:even"]},
        "training": {"micro_batch_size": 4},
        "evaluation": {"samples_per_prompt": 2, "kl_responses": 4},
        "tracking": {"report": False},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return RaftConfig.from_dict(raw)


# Issue 31 item 19: word answers with the user's own reward -----------------------------------

def test_word_answers_with_a_user_reward_train_without_a_numeric_accuracy(workspace,
                                                                         tiny_model_dir):
    metrics = train(config_for(workspace, tiny_model_dir)).metrics
    assert "eval/reward_mean" in metrics[0] and "eval/reward_mean" in metrics[1]
    assert not any(key.startswith(("eval/accuracy", "eval/pass")) for key in metrics[0])


def test_word_answers_get_accuracy_from_the_users_reward_when_the_set_says_so(workspace,
                                                                             tiny_model_dir):
    config = config_for(workspace, tiny_model_dir, evaluation={"extraction": ["reward"],
                                                               "samples_per_prompt": 2})
    last = train(config).metrics[-1]  # the stage that gets the sampled metrics
    # The reward is 0 or 1, so "reward >= evaluation.correct_reward (1)" is its mean.
    assert last["eval/accuracy"] == pytest.approx(last["eval/reward_mean"])
    assert last["eval/avg@2"] == pytest.approx(last["eval/sampled_reward_mean"])
    assert "eval/maj@2" not in last  # no answers are extracted: nothing to vote on


def test_raftlm_eval_on_word_answers_is_no_traceback(workspace, tiny_model_dir, capsys):
    path = workspace / "config.yaml"
    path.write_text(config_for(workspace, tiny_model_dir).to_yaml())
    assert cli_main(["eval", "--config", str(path)]) == 0
    assert "Traceback" not in capsys.readouterr().err


def test_a_number_rule_on_word_answers_scores_zero_instead_of_crashing(workspace,
                                                                      tiny_model_dir):
    config = config_for(workspace, tiny_model_dir, evaluation={"extraction": ["lenient"],
                                                               "sampled": False})
    policy, tokenizer = load_policy(config.model, CPU, torch.float32)
    _, held_out = load_prompt_sets(config, tokenizer)
    metrics, items = evaluate(policy, tokenizer, held_out, build_reward(config.reward), config)
    assert metrics["eval/accuracy"] == 0.0
    assert items[0]["answer"] == "Budapest" and items[0]["correct"] == {"lenient": False}


# Several sets ---------------------------------------------------------------------------------

def test_other_sets_log_under_their_name_and_the_held_out_names_stay(workspace,
                                                                    tiny_model_dir):
    config = config_for(workspace, tiny_model_dir, prompts="sums.jsonl", evaluation={
        "samples_per_prompt": 2,
        "sets": [{"name": "arith", "task": "arithmetic", "size": 3, "samples": 3,
                  "extraction": ["strict", "lenient"], "temperature": 0.7},
                 {"name": "words", "file": str(workspace / "capitals.jsonl"), "size": 2}]})
    policy, tokenizer = load_policy(config.model, CPU, torch.float32)
    _, held_out = load_prompt_sets(config, tokenizer)
    metrics, items = evaluate(policy, tokenizer, held_out, build_reward(config.reward), config)
    for key in ("eval/accuracy", "eval/reward_mean", "eval/sampled_accuracy", "eval/pass_at_k",
                "eval/best_of_k_reward", "eval/distinct_2", "eval/kl_to_initial",
                "eval/pass@1", "eval/pass@2", "eval/maj@2", "eval/avg@2"):
        assert key in metrics, key
    assert metrics["eval/pass_at_k"] == metrics["eval/pass@2"]
    assert metrics["eval/sampled_accuracy"] == metrics["eval/avg@2"]
    for key in ("accuracy", "accuracy_lenient", "avg@3", "maj@3", "pass@1", "pass@3",
                "pass@3_lenient", "response_tokens_mean", "sampled_tokens_mean"):
        assert f"eval/arith/{key}" in metrics, key
    assert "eval/arith/reward_mean" not in metrics  # the run's reward only where asked
    # Word answers under auto with a user reward: no accuracy, only what was asked and exists.
    assert "eval/words/response_tokens_mean" in metrics
    assert not any(k.startswith("eval/words/accuracy") for k in metrics)
    assert [item["set"] for item in items] == ["heldout"] * 4 + ["arith"] * 3 + ["words"] * 2
    assert len(items[4]["samples"]) == 3 and set(items[4]["correct"]) == {"strict", "lenient"}


def test_a_set_takes_its_own_temperature_and_k_shot_prompts(workspace, tiny_model_dir, tok):
    config = config_for(workspace, tiny_model_dir, evaluation={"sets": [
        {"name": "g", "task": "gsm8k", "size": 2, "shots": 2, "temperature": 0.5}]})
    rset = resolve_set(config.evaluation.sets[0], config, tok, "evaluation.sets[0]")
    assert rset.generation.temperature == 0.5 and config.generation.temperature == 1.0
    assert [m["role"] for m in rset.prompts.records[0].prompt] == ["user", "assistant"] * 2 + [
        "user"]
    assert rset.prefix == "eval/g/" and len(rset.prompts) == 2


@pytest.mark.parametrize("sets, message", [
    ([{"name": "a", "task": "gsm8k", "file": "x.jsonl"}],
     r"evaluation.sets\[0\]: expected exactly one of `task`, `file`"),
    ([{"name": "a", "file": "x.jsonl", "shots": 2}], r"evaluation.sets\[0\].shots"),
    ([{"name": "a/b", "task": "gsm8k"}], r"evaluation.sets\[0\].name"),
    ([{"name": "a", "task": "gsm8k"}, {"name": "a", "task": "larger"}],
     r"evaluation.sets\[1\].name: 'a' is used twice"),
    ([{"name": "a", "task": "gsm8k", "samples": -1}], r"evaluation.sets\[0\].samples"),
])
def test_a_bad_set_is_one_line_naming_its_field(workspace, tiny_model_dir, sets, message):
    with pytest.raises(ConfigError, match=message):  # at load, before anything runs
        config_for(workspace, tiny_model_dir, evaluation={"sets": sets})


def test_an_unknown_extraction_is_refused_at_load(workspace, tiny_model_dir):
    with pytest.raises(ConfigError, match=r"evaluation.sets\[0\].extraction\[0\]: expected "
                                          r".*got 'loose'"):
        config_for(workspace, tiny_model_dir, evaluation={"sets": [
            {"name": "a", "task": "gsm8k", "extraction": "loose"}]})


# The metrics of one set from hand-made responses ---------------------------------------------

def completion(text: str) -> Completion:
    return Completion(text, [0] * len(text.split()), "eos")


def test_set_metrics_from_hand_made_responses(tok):
    rows = [{"prompt": "p1", "answer": "#### 18"}, {"prompt": "p2", "answer": "7"}]
    prompts = build_prompt_set(rows, tok, prompt_field="prompt", max_prompt_tokens=99,
                               system_prompt=None, source="hand")
    rset = ResolvedSet("hand", prompts, [EXTRACTIONS["strict"], EXTRACTIONS["lenient"]], 3,
                       None, None, ("accuracy", "avg@n", "maj@n", "pass@k"))
    greedy = [completion("so #### 18"), completion("it is 7")]
    sampled = [[completion("#### 18"), completion("#### 17"), completion("#### 17")],
               [completion("7"), completion("The answer is 7."), completion("8")]]
    metrics, items = set_metrics(rset, greedy, sampled, None, 1.0)
    assert metrics["eval/hand/accuracy"] == 0.5  # strict: "it is 7" has no format
    assert metrics["eval/hand/accuracy_lenient"] == 1.0
    strict = np.array([[1, 0, 0], [0, 1, 0]])
    assert metrics["eval/hand/avg@3"] == pytest.approx(strict.mean())
    assert metrics["eval/hand/pass@1"] == pytest.approx(1 / 3)
    assert metrics["eval/hand/pass@2"] == pytest.approx(2 / 3)  # 1 - C(2,2)/C(3,2) per prompt
    assert metrics["eval/hand/pass@3"] == 1.0
    # "17" outvotes "18"; strict reads only "The answer is 7." of the second prompt: "7" wins.
    assert metrics["eval/hand/maj@3"] == 0.5
    assert metrics["eval/hand/maj@3_lenient"] == 0.5  # lenient: 7, 7, 8 -> 7
    assert items[1]["extracted"] == {"strict": None, "lenient": "7"}
    assert items[0]["samples"][1] == {"response": "#### 17", "extracted": {
        "strict": "17", "lenient": "17"}, "correct": {"strict": False, "lenient": False}}


def test_no_prompt_of_a_set_is_dropped_for_the_training_prompt_cap(workspace, tiny_model_dir,
                                                                   tok):
    config = config_for(workspace, tiny_model_dir, data={"max_prompt_tokens": 8}, evaluation={
        "sets": [{"name": "w", "file": str(workspace / "capitals.jsonl")}]})
    rset = resolve_set(config.evaluation.sets[0], config, tok, "evaluation.sets[0]")
    assert len(rset.prompts) == 4 and rset.prompts.n_skipped_too_long == 0


def test_a_number_rule_on_a_set_without_answers_is_one_line(workspace, tiny_model_dir, tok):
    (workspace / "bare.jsonl").write_text('{"prompt": "Hi"}\n')
    config = config_for(workspace, tiny_model_dir, evaluation={
        "sets": [{"name": "bare", "file": str(workspace / "bare.jsonl"),
                  "extraction": ["strict"]}]})
    with pytest.raises(UserError, match=r"evaluation.sets\[0\].extraction: extraction 'strict' "
                                        "compares with an `answer` column, which this set has"):
        resolve_set(config.evaluation.sets[0], config, tok, "evaluation.sets[0]")


def test_a_run_logs_its_other_sets_every_evaluated_stage(workspace, tiny_model_dir):
    config = config_for(workspace, tiny_model_dir, prompts="sums.jsonl", evaluation={
        "sampled": False, "sets": [{"name": "larger", "task": "larger", "size": 2,
                                    "max_new_tokens": 3}]})
    metrics = train(config).metrics
    for record in metrics:  # stage 0 (the baseline) and stage 1
        assert {"eval/accuracy", "eval/larger/accuracy", "eval/larger/response_tokens_mean"} <= set(
            record)
