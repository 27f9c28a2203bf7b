"""Reward functions, loading user rewards, reward models, and the combined reward."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
from tiny import tiny_reward_model, tiny_tokenizer

from raftlm.config import RewardConfig, RewardTerm
from raftlm.rewards.reward import (
    TERM_KINDS,
    ModelReward,
    Reward,
    RewardError,
    build_reward,
    load_function,
)
from raftlm.rewards.terms import TermFailure
from raftlm.rewards.verifiable import math_answer, numeric_answer


def score(fn, completions, answers):
    return fn(prompts=[""] * len(completions), completions=completions, answer=answers)


# --- built-ins -------------------------------------------------------------------------------


def test_numeric_answer_takes_the_last_number_of_a_restated_question():
    assert score(numeric_answer, ["17 + 25 = 42", "42 is 17 + 25"], ["42", "42"]) == [1.0, 0.0]


def test_numeric_answer_reads_thousands_separators_and_trailing_periods():
    assert score(numeric_answer, ["It is 1,234.", "so 3.0"], ["1234", "3"]) == [1.0, 1.0]


def test_numeric_answer_reads_negatives_but_not_hyphens():
    assert score(numeric_answer, ["10 - 15 = -5", "pages 10-5"], ["-5", "5"]) == [1.0, 1.0]


def test_numeric_answer_scores_zero_without_a_number():
    assert score(numeric_answer, ["no idea", ""], ["3", "3"]) == [0.0, 0.0]


def test_numeric_answer_accepts_numeric_references():
    assert score(numeric_answer, ["= 7"], [7]) == [1.0]


def test_math_answer_checks_equivalence():
    pytest.importorskip("math_verify")
    completions = ["The answer is $\\frac{1}{2}$", "The answer is 0.25"]
    assert score(math_answer, completions, ["0.5", "0.5"]) == [1.0, 0.0]


def test_math_answer_works_off_the_main_thread():
    pytest.importorskip("math_verify")
    result = []
    thread = threading.Thread(target=lambda: result.append(score(math_answer, ["1/2"], ["0.5"])))
    thread.start()
    thread.join()
    assert result == [[1.0]]


# --- loading user functions ------------------------------------------------------------------


def test_load_function_from_a_module_path():
    assert load_function("raftlm.rewards:numeric_answer") is numeric_answer


def test_load_function_from_a_file_path_relative_to_cwd(tmp_path, monkeypatch):
    (tmp_path / "my_reward.py").write_text(
        "def length(completions, **kwargs):\n    return [float(len(c)) for c in completions]\n"
    )
    monkeypatch.chdir(tmp_path)
    fn = load_function("my_reward.py:length")
    assert fn(prompts=["p"], completions=["abc"]) == [3.0]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("missing_file.py:f", "file not found"),
        ("no_such_module_xyz:f", "cannot import module"),
        ("raftlm.rewards:nope", "has no attribute 'nope'"),
        ("raftlm.rewards:BUILTIN_REWARDS", "is not callable"),
    ],
)
def test_load_function_errors_name_the_spec(spec, message):
    with pytest.raises(ValueError, match=f"reward '{spec}'.*{message}"):
        load_function(spec)


# --- combining terms -------------------------------------------------------------------------


def test_terms_receive_extra_columns_as_keyword_arguments():
    received = {}

    def fn(prompts, completions, answer, **kwargs):
        received.update(answer=answer, **kwargs)
        return [0.0] * len(completions)

    Reward([("fn", 1.0, fn)])(["p", "q"], ["a", "b"], {"answer": ["1", "2"], "level": [3, 4]})
    assert received == {"answer": ["1", "2"], "level": [3, 4]}


def test_terms_may_take_only_completions_like_trl_examples():
    def length(completions, **kwargs):
        return [float(len(c)) for c in completions]

    assert Reward([("len", 1.0, length)])(["p"], ["abcd"], {}).scores.tolist() == [4.0]


def test_reward_is_the_weighted_sum_of_terms():
    def ones(completions, **kwargs):
        return [1.0] * len(completions)

    reward = Reward([("num", 2.0, numeric_answer), ("ones", 0.5, ones)])
    result = reward(["p", "p"], ["= 3", "= 4"], {"answer": ["3", "3"]})
    assert result.scores.tolist() == [2.5, 0.5]
    assert result.per_term["num"].tolist() == [1.0, 0.0]
    assert result.n_invalid == 0


def test_missing_column_is_reported_before_scoring():
    with pytest.raises(RewardError, match=r"needs column\(s\) \['answer'\]"):
        Reward([("numeric_answer", 1.0, numeric_answer)], on_error="skip")(["p"], ["1"], {})


def test_build_reward_resolves_builtins_and_specs():
    config = RewardConfig(
        terms=[RewardTerm(name="numeric_answer"), RewardTerm(name="raftlm.rewards:math_answer")]
    )
    reward = build_reward(config)
    assert [t.fn for t in reward.terms] == [numeric_answer, math_answer]
    assert [t.name for t in reward.terms] == ["numeric_answer", "math_answer"]  # stable, short
    assert reward.models() == []


def test_term_names_are_labels_or_short_and_unique():
    config = RewardConfig(terms=[RewardTerm(name="numeric_answer"),
                                 RewardTerm(name="raftlm.rewards:numeric_answer"),
                                 RewardTerm(name="numeric_answer", label="exact")])
    assert [t.name for t in build_reward(config).terms] == [
        "numeric_answer", "numeric_answer#2", "exact"]


def test_the_configs_term_kinds_are_the_registrys():
    assert tuple(TERM_KINDS) == RewardTerm.kinds


def test_offload_asks_each_term_what_it_holds():
    class HoldsTwo:
        def models(self):
            return ["encoder", "head"]

        def __call__(self, prompts, completions, **columns):
            return [0.0] * len(completions)

    reward = Reward([("a", 1.0, HoldsTwo()), ("b", 1.0, numeric_answer)])
    assert reward.models() == ["encoder", "head"]


def test_build_reward_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown reward 'bleu'"):
        build_reward(RewardConfig(terms=[RewardTerm(name="bleu")]))


# --- errors ----------------------------------------------------------------------------------


def nan_for_item_1(completions, **kwargs):
    return [math.nan if i == 1 else 1.0 for i in range(len(completions))]


def wrong_count(completions, **kwargs):
    return [1.0]


def raises_on_bad(completions, **kwargs):
    if any("bad" in c for c in completions):
        raise ValueError("cannot score")
    return [1.0] * len(completions)


def text_score(completions, **kwargs):
    return ["high"] * len(completions)


COMPLETIONS = ["good one", "bad one", "good two"]


def run(fn, on_error):
    return Reward([("x", 1.0, fn)], on_error=on_error)(["p"] * 3, COMPLETIONS, {})


def test_nan_score_raises_naming_term_and_item():
    with pytest.raises(RewardError, match=r"reward 'x' returned nan for item 1 \(completion: 'bad"):
        run(nan_for_item_1, "raise")


def test_non_number_score_raises_naming_term_and_item():
    with pytest.raises(RewardError, match=r"reward 'x' returned a non-number .* item 0"):
        run(text_score, "raise")


def test_wrong_count_raises_in_either_mode():
    for on_error in ("raise", "skip"):
        with pytest.raises(RewardError, match="reward 'x' returned 1 scores for 3 completions"):
            run(wrong_count, on_error)


def test_raising_term_raises_naming_the_failing_item():
    with pytest.raises(RewardError, match=r"reward 'x' raised ValueError: cannot score \(.*\) "
                                          r"for item 1"):
        run(raises_on_bad, "raise")


def test_skip_mode_marks_nan_scores_invalid_and_counts_them():
    result = run(nan_for_item_1, "skip")
    assert np.isnan(result.scores).tolist() == [False, True, False]
    assert result.n_invalid == 1


def test_skip_mode_isolates_the_items_a_raising_term_fails_on():
    result = run(raises_on_bad, "skip")
    assert np.isnan(result.per_term["x"]).tolist() == [False, True, False]
    assert result.scores[0] == 1.0 and result.n_invalid == 1


class Outage:
    """A term whose batch failure is an outage (a server), not one bad candidate."""

    blame_items = False

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, completions, **columns):
        self.calls.append(len(completions))
        raise ConnectionError("connection refused")


def test_an_outage_is_not_multiplied_by_item_by_item_calls():
    term = Outage()
    result = Reward([("remote", 1.0, term)], on_error="skip")(["p"] * 3, COMPLETIONS, {})
    assert term.calls == [3]
    assert result.n_invalid == 3


def test_an_outage_raises_one_line_naming_the_term():
    with pytest.raises(RewardError, match=r"^reward 'remote' raised ConnectionError: connection "
                                          r"refused \(tests/test_rewards.py:\d+ in __call__\); "
                                          r"RAFTLM_TRACEBACK=1 prints the traceback$"):
        Reward([("remote", 1.0, Outage())])(["p"] * 3, COMPLETIONS, {})


def test_a_partly_failed_batch_keeps_what_was_scored_when_skipping():
    def half(completions, **columns):
        raise TermFailure("batch 2/2 failed: HTTP 500", [1.0, 2.0, None])

    result = Reward([("remote", 1.0, half)], on_error="skip")(["p"] * 3, COMPLETIONS, {})
    assert result.per_term["remote"][:2].tolist() == [1.0, 2.0]
    assert np.isnan(result.scores[2]) and result.n_invalid == 1
    with pytest.raises(RewardError, match="^reward 'remote' batch 2/2 failed: HTTP 500$"):
        Reward([("remote", 1.0, half)])(["p"] * 3, COMPLETIONS, {})


# --- reward models ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reward_model")
    tok = tiny_tokenizer()
    tiny_reward_model(seed=0, vocab_size=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


PROMPTS = ["What is 1 + 2?", [{"role": "user", "content": "Hi"}], "Say a word", "x"]
RESPONSES = ["3", "Hello there, friend.", "word", "a much longer response than the others"]


def test_model_reward_scores_deterministically(reward_model_dir):
    rm = ModelReward(reward_model_dir, batch_size=4)
    first, second = rm(PROMPTS, RESPONSES), rm(PROMPTS, RESPONSES)
    assert first == second and len(set(first)) == 4


def test_model_reward_scores_do_not_depend_on_batch_size(reward_model_dir):
    batched = ModelReward(reward_model_dir, batch_size=4)(PROMPTS, RESPONSES)
    single = ModelReward(reward_model_dir, batch_size=1)(PROMPTS, RESPONSES)
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_model_reward_is_listed_for_offload(reward_model_dir):
    reward = build_reward(RewardConfig(terms=[RewardTerm(model=str(reward_model_dir))]))
    (rm,) = reward.models()
    assert rm.to("cpu") is rm and rm.device.type == "cpu"
    assert reward.terms[0].name == reward_model_dir.name


def test_a_declared_context_keyword_is_none_outside_a_stage():
    seen = {}

    def curriculum(completions, stage, **columns):
        seen["stage"] = stage
        return [0.0] * len(completions)

    Reward([("c", 1.0, curriculum)])(["p"], ["x"], {})
    assert seen == {"stage": None}


def test_an_async_term_that_raises_is_blamed_item_by_item():
    async def raises_on_bad_async(completions, **kwargs):
        return raises_on_bad(completions)

    result = Reward([("x", 1.0, raises_on_bad_async)], on_error="skip")(["p"] * 3, COMPLETIONS, {})
    assert np.isnan(result.per_term["x"]).tolist() == [False, True, False]
    with pytest.raises(RewardError, match=r"reward 'x' raised ValueError: cannot score .* item 1"):
        Reward([("x", 1.0, raises_on_bad_async)])(["p"] * 3, COMPLETIONS, {})


def test_a_function_that_declares_trajectories_gets_each_rollouts_turns():
    """Issue 36.5: a multi-turn rollout's conversation reaches the reward as chat messages
    (None for a single-turn response); a function that does not declare it gets nothing."""
    from raftlm.data.prompts import PromptRecord
    from raftlm.rewards.reward import score
    from raftlm.stage.rollouts import Rollout

    seen = []

    def last_tool_result(prompts, completions, trajectories, **kwargs):
        seen.append(trajectories)
        return [float(t[-1]["content"] == "42") if t else 0.0 for t in trajectories]

    turns = [{"role": "assistant", "content": "<tool_call>...</tool_call>"},
             {"role": "tool", "name": "calculator", "content": "42"}]
    rollouts = [[Rollout("42", [1], "eos", turns=turns), Rollout("41", [1], "eos")]]
    record = PromptRecord(0, "q", "q", [5], {})
    result = score(Reward([("tool", 1.0, last_tool_result)]), [record], rollouts)
    assert result.scores.tolist() == [1.0, 0.0] and seen == [[turns, None]]
