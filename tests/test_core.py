"""Specification tests for raftlm.core (NumPy RAFT math)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftlm.core import (
    best_per_prompt,
    best_per_prompt_mask,
    raft_alignment,
    raft_iteration,
    token_pooled_nll,
    top_fraction_mask,
    top_k_per_prompt_mask,
)
from raftlm.core import raft as core  # the module, for its private ragged path

FEW = settings(max_examples=40, deadline=None)

ISSUE_LOG_PROBS = [
    [[[-2.0, -1.8], [-1.5, -1.6]]],
    [[[-0.6, -0.5], [-0.7, -0.8]]],
    [[[-0.2, -0.1], [-0.3, -0.4]]],
]
ISSUE_REWARDS = [[[0.2, 0.4]], [[0.75, 0.7]], [[0.95, 0.8]]]


def as_lists(value):
    """Nested Python lists of Python floats (ndarray.tolist, but for ragged input too)."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return [as_lists(v) for v in value]
    return float(value)


# --------------------------------------------------------------------------- raft_alignment


def test_issue_example_with_nested_lists():
    assert raft_alignment(ISSUE_LOG_PROBS, ISSUE_REWARDS) == [1.55, 0.55, 0.15]


def test_issue_example_with_ndarrays():
    losses = raft_alignment(np.array(ISSUE_LOG_PROBS), np.array(ISSUE_REWARDS))
    assert losses == [1.55, 0.55, 0.15]


def test_losses_are_python_floats_rounded_to_4_decimals():
    losses = raft_alignment([[[[-1.0, -1.0, 0.0]]]], [[[1.0]]])
    assert losses == [0.6667]
    assert type(losses[0]) is float


def test_pooling_over_several_prompts_uses_each_prompts_best_response():
    log_probs = [[[[-9.0, -9.0], [-1.0, -3.0]], [[-2.0, -2.0], [-9.0, -9.0]]]]
    rewards = [[[0.1, 0.9], [0.5, 0.2]]]
    assert raft_alignment(log_probs, rewards) == [2.0]  # (1 + 3 + 2 + 2) / 4


def test_tied_rewards_select_the_first_response():
    log_probs = [[[[-1.0, -1.0], [-3.0, -3.0], [-5.0, -5.0]]]]
    assert raft_alignment(log_probs, [[[0.5, 0.5, 0.5]]]) == [1.0]
    assert raft_alignment(np.array(log_probs), np.array([[[0.5, 0.5, 0.5]]])) == [1.0]


def test_negative_rewards_select_the_least_negative():
    log_probs = [[[[-1.0], [-2.0], [-3.0]]]]
    assert raft_alignment(log_probs, [[[-3.0, -1.0, -2.0]]]) == [2.0]


def test_ragged_responses_are_token_weighted():
    # Kept responses have 4 tokens (nll 1 each) and 1 token (nll 3): pooled 7/5, not (1+3)/2.
    log_probs = [[[[-1.0, -1.0, -1.0, -1.0], [-8.0]], [[-8.0, -8.0], [-3.0]]]]
    rewards = [[[1.0, 0.0], [0.0, 1.0]]]
    assert raft_alignment(log_probs, rewards) == [1.4]


def test_zero_stages_give_an_empty_list():
    assert raft_alignment([], []) == []


def test_ndarray_input_takes_the_vectorised_path(monkeypatch):
    def forbidden(*args):
        raise AssertionError("ragged path used for rectangular ndarray input")

    monkeypatch.setattr(core, "_stage_loss_ragged", forbidden)
    rng = np.random.default_rng(0)
    losses = raft_alignment(-rng.random((2, 3, 4, 5)), rng.random((2, 3, 4)))
    assert len(losses) == 2


@st.composite
def ragged_stages(draw, equal_lengths=False, distinct_rewards=False):
    """(log_probs [T][P][K][L], rewards [T][P][K]) as nested lists."""
    n_stages = draw(st.integers(1, 3))
    n_prompts = draw(st.integers(1, 3))
    n_responses = draw(st.integers(1, 4))
    length = draw(st.integers(1, 5))
    lp_value = st.floats(-5.0, 0.0, allow_nan=False)
    reward = st.floats(-10.0, 10.0, allow_nan=False)
    log_probs, rewards = [], []
    for _ in range(n_stages * n_prompts):
        lengths = [length if equal_lengths else draw(st.integers(1, 5)) for _ in range(n_responses)]
        log_probs.append([draw(st.lists(lp_value, min_size=n, max_size=n)) for n in lengths])
        rewards.append(
            draw(
                st.lists(
                    reward, min_size=n_responses, max_size=n_responses, unique=distinct_rewards
                )
            )
        )

    def by_stage(items):
        return [items[t * n_prompts : (t + 1) * n_prompts] for t in range(n_stages)]

    return by_stage(log_probs), by_stage(rewards)


@FEW
@given(ragged_stages(distinct_rewards=True), st.randoms(use_true_random=False))
def test_permuting_candidates_with_their_rewards_keeps_the_loss(data, random):
    log_probs, rewards = data
    shuffled_lp = [[list(prompt) for prompt in stage] for stage in log_probs]
    shuffled_rw = [[list(prompt) for prompt in stage] for stage in rewards]
    for stage_lp, stage_rw in zip(shuffled_lp, shuffled_rw, strict=True):
        for prompt_lp, prompt_rw in zip(stage_lp, stage_rw, strict=True):
            pairs = list(zip(prompt_lp, prompt_rw, strict=True))
            random.shuffle(pairs)
            prompt_lp[:], prompt_rw[:] = zip(*pairs, strict=True)
    assert raft_alignment(shuffled_lp, shuffled_rw) == raft_alignment(log_probs, rewards)


@FEW
@given(ragged_stages(equal_lengths=True))
def test_equal_lengths_pool_to_the_mean_of_per_response_means(data):
    log_probs, rewards = data
    for t, loss in enumerate(raft_alignment(log_probs, rewards)):
        kept = [lp[int(np.argmax(rw))] for lp, rw in zip(log_probs[t], rewards[t], strict=True)]
        assert loss == pytest.approx(np.mean([-np.mean(r) for r in kept]), abs=1e-4)


@FEW
@given(ragged_stages(), st.floats(0.0, 10.0))
def test_lowering_every_log_prob_by_c_raises_the_loss_by_c(data, c):
    log_probs, rewards = data
    shifted = [[[[x - c for x in resp] for resp in pr] for pr in stage] for stage in log_probs]
    before, after = raft_alignment(log_probs, rewards), raft_alignment(shifted, rewards)
    for b, a in zip(before, after, strict=True):
        assert a == pytest.approx(b + c, abs=1e-4 + 1e-9)  # two roundings of 5e-5 each


@FEW
@given(
    st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.integers(1, 6)),
    st.integers(0, 2**32 - 1),
    st.booleans(),
)
def test_vectorised_path_equals_ragged_path_exactly(shape, seed, tied):
    rng = np.random.default_rng(seed)
    log_probs = -rng.exponential(size=shape)
    rewards = rng.integers(0, 2, size=shape[:3]) if tied else rng.normal(size=shape[:3])
    dense = raft_alignment(log_probs, rewards)
    assert dense == raft_alignment(as_lists(log_probs), as_lists(rewards))


def stage_with(bad_lp=None, bad_rw=None):
    """Two valid stages of 2 prompts x 3 responses x 2 tokens, with one entry replaced."""
    log_probs = [[[[-0.5, -0.25] for _ in range(3)] for _ in range(2)] for _ in range(2)]
    rewards = [[[0.1, 0.2, 0.3] for _ in range(2)] for _ in range(2)]
    if bad_lp is not None:
        (t, p, k, tok), value = bad_lp
        log_probs[t][p][k][tok] = value
    if bad_rw is not None:
        (t, p, k), value = bad_rw
        rewards[t][p][k] = value
    return log_probs, rewards


VALUE_ERRORS = {
    "nan reward": (
        stage_with(bad_rw=((1, 0, 1), math.nan)),
        "stage 1, prompt 0, response 1: reward is nan",
    ),
    "inf reward": (
        stage_with(bad_rw=((0, 1, 2), math.inf)),
        "stage 0, prompt 1, response 2: reward is inf",
    ),
    "-inf reward": (
        stage_with(bad_rw=((1, 1, 0), -math.inf)),
        "stage 1, prompt 1, response 0: reward is -inf",
    ),
    "nan log-prob": (
        stage_with(bad_lp=((1, 0, 2, 1), math.nan)),
        "stage 1, prompt 0, response 2, token 1: log-probability is nan (must be finite)",
    ),
    "-inf log-prob": (
        stage_with(bad_lp=((0, 1, 0, 0), -math.inf)),
        "stage 0, prompt 1, response 0, token 0: log-probability is -inf",
    ),
    "positive log-prob": (
        stage_with(bad_lp=((1, 1, 2, 0), 0.5)),
        "stage 1, prompt 1, response 2, token 0: log-probability is 0.5 (must be <= 0)",
    ),
}


@pytest.mark.parametrize("case", VALUE_ERRORS.values(), ids=VALUE_ERRORS.keys())
@pytest.mark.parametrize("as_array", [False, True], ids=["lists", "ndarray"])
def test_bad_values_raise_value_error_naming_the_location(case, as_array):
    (log_probs, rewards), message = case
    if as_array:
        log_probs, rewards = np.array(log_probs), np.array(rewards)
    with pytest.raises(ValueError, match=re.escape(message)):
        raft_alignment(log_probs, rewards)


def test_a_bad_log_prob_in_an_unselected_response_still_raises():
    log_probs, rewards = stage_with(bad_lp=((0, 0, 0, 0), math.nan))  # response 2 is selected
    for lp, rw in [(log_probs, rewards), (np.array(log_probs), np.array(rewards))]:
        with pytest.raises(ValueError, match="stage 0, prompt 0, response 0, token 0"):
            raft_alignment(lp, rw)


def test_a_zero_log_prob_is_allowed():
    assert raft_alignment([[[[0.0, -0.0]]]], [[[1.0]]]) == [0.0]


STRUCTURE_ERRORS = {
    "stage count": (([[[[-1.0]]]], [[[1.0]], [[1.0]]]), "1 stages of log-probabilities but 2"),
    "prompt count": (([[[[-1.0]]], [[[-1.0]]]], [[[1.0]], [[1.0], [2.0]]]), "stage 1: 1 prompts"),
    "response count": (([[[[-1.0], [-1.0]]]], [[[1.0]]]), "stage 0, prompt 0: 2 responses"),
    "empty stage": (([[[[-1.0]]], []], [[[1.0]], []]), "stage 1: no prompts"),
    "empty prompt": (([[[]]], [[[]]]), "stage 0, prompt 0: no responses"),
    "empty response": (
        ([[[[-1.0], []]]], [[[1.0, 2.0]]]),
        "stage 0, prompt 0, response 1: response has no tokens",
    ),
}


@pytest.mark.parametrize("case", STRUCTURE_ERRORS.values(), ids=STRUCTURE_ERRORS.keys())
def test_mismatched_or_empty_structure_raises_value_error_naming_the_location(case):
    (log_probs, rewards), message = case
    with pytest.raises(ValueError, match=message):
        raft_alignment(log_probs, rewards)


def test_rectangular_arrays_with_mismatched_shapes_name_the_location():
    with pytest.raises(
        ValueError, match="stage 0, prompt 0: 3 responses of log-probabilities but 2"
    ):
        raft_alignment(np.full((2, 2, 3, 4), -1.0), np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="stage 0, prompt 0, response 0: response has no tokens"):
        raft_alignment(np.zeros((1, 1, 2, 0)), np.zeros((1, 1, 2)))


TYPE_ERRORS = {
    "string log-prob": (([[[[-1.0, "x"]]]], [[[1.0]]]), "stage 0, prompt 0, response 0, token 1"),
    "None log-prob": (
        ([[[[-1.0], [None]]]], [[[1.0, 2.0]]]),
        "stage 0, prompt 0, response 1, token 0",
    ),
    "bool log-prob": (
        ([[[[-1.0]], [[False]]]], [[[1.0], [2.0]]]),
        "stage 0, prompt 1, response 0, token 0",
    ),
    "nested log-prob": (
        ([[[[-1.0, [-1.0]]]]], [[[1.0]]]),
        "stage 0, prompt 0, response 0, token 1",
    ),
    "None reward": (([[[[-1.0], [-1.0]]]], [[[1.0, None]]]), "stage 0, prompt 0, response 1"),
    "string reward": (
        ([[[[-1.0]]], [[[-1.0]]]], [[[1.0]], [["a"]]]),
        "stage 1, prompt 0, response 0",
    ),
    "response not a list": (([[[-1.0]]], [[[1.0]]]), "stage 0, prompt 0, response 0"),
    "stage not a list": ((["abc"], [[[1.0]]]), "stage 0"),
    "top level not a list": ((3, [[[1.0]]]), "stages_log_probs"),
}


@pytest.mark.parametrize("case", TYPE_ERRORS.values(), ids=TYPE_ERRORS.keys())
def test_non_numeric_entries_raise_type_error_naming_the_location(case):
    (log_probs, rewards), message = case
    with pytest.raises(TypeError, match=message):
        raft_alignment(log_probs, rewards)


# --------------------------------------------------------------------------- token_pooled_nll


def test_token_pooled_nll_weighs_responses_by_length():
    assert token_pooled_nll([np.array([-1.0, -1.0, -1.0, -1.0]), [-3.0]]) == pytest.approx(1.4)


def test_token_pooled_nll_on_a_rectangular_array_is_the_plain_mean():
    lp = np.array([[-1.0, -2.0], [-3.0, -6.0]])
    assert token_pooled_nll(lp) == pytest.approx(3.0)


def test_token_pooled_nll_mask_ignores_padding_even_if_nan():
    lp = np.array([[-1.0, -1.0, -1.0, -1.0], [-3.0, np.nan, 7.0, 0.0]])
    mask = np.array([[1, 1, 1, 1], [1, 0, 0, 0]])
    assert token_pooled_nll(lp, mask) == pytest.approx(1.4)
    assert token_pooled_nll(lp, mask.astype(bool)) == pytest.approx(1.4)


def test_token_pooled_nll_dense_equals_ragged():
    lp = -np.random.default_rng(1).random((5, 7))
    assert token_pooled_nll(lp) == token_pooled_nll(list(lp))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (([[]],), "no tokens"),
        ((np.zeros((2, 2)), np.zeros((2, 2))), "no tokens"),
        ((np.zeros((2, 2)), np.ones((2, 3))), "mask shape"),
        ((np.zeros(3),), "2-D"),
    ],
)
def test_token_pooled_nll_rejects_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        token_pooled_nll(*args)


# --------------------------------------------------------------------------- selectors


def test_best_per_prompt_returns_one_index_per_prompt_first_on_ties():
    rewards = np.array([[0.1, 0.9, 0.9], [-3.0, -1.0, -2.0], [0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(best_per_prompt(rewards), [1, 1, 0])


def test_best_per_prompt_works_on_leading_batch_axes():
    rewards = np.random.default_rng(0).random((2, 3, 4))
    best = best_per_prompt(rewards)
    assert best.shape == (2, 3)
    np.testing.assert_array_equal(best, rewards.argmax(axis=-1))


def test_best_per_prompt_skips_nan_even_next_to_minus_inf():
    rewards = np.array([[np.nan, 0.5, 0.7], [np.nan, -np.inf, np.nan]])
    np.testing.assert_array_equal(best_per_prompt(rewards), [2, 1])


def test_best_per_prompt_raises_for_a_prompt_with_only_nan():
    with pytest.raises(ValueError, match=r"\(1,\) has only NaN"):
        best_per_prompt(np.array([[1.0, 2.0], [np.nan, np.nan]]))


def test_best_per_prompt_mask_sets_one_entry_per_prompt_and_none_for_all_nan():
    rewards = np.array([[0.3, 0.3, 0.1], [np.nan, np.nan, np.nan], [np.nan, 2.0, 5.0]])
    expected = [[True, False, False], [False, False, False], [False, False, True]]
    np.testing.assert_array_equal(best_per_prompt_mask(rewards), expected)


def test_top_k_per_prompt_mask_prefers_lower_index_on_ties():
    rewards = np.array([[1.0, 2.0, 2.0, 2.0], [4.0, 3.0, 2.0, 1.0]])
    expected = [[False, True, True, False], [True, True, False, False]]
    np.testing.assert_array_equal(top_k_per_prompt_mask(rewards, 2), expected)


def test_top_k_per_prompt_mask_never_selects_nan():
    rewards = np.array([[np.nan, 1.0, np.nan, -np.inf], [np.nan] * 4])
    expected = [[False, True, False, True], [False] * 4]
    np.testing.assert_array_equal(top_k_per_prompt_mask(rewards, 3), expected)


@pytest.mark.parametrize(("k", "error"), [(0, ValueError), (1.5, TypeError), (True, TypeError)])
def test_top_k_per_prompt_mask_rejects_bad_k(k, error):
    with pytest.raises(error, match="k"):
        top_k_per_prompt_mask(np.zeros((2, 3)), k)


def test_top_fraction_mask_selects_the_global_top_with_earlier_flat_index_on_ties():
    rewards = np.array([[1.0, 5.0, 3.0], [5.0, 2.0, 3.0]])
    expected = [[False, True, True], [True, False, False]]  # 6 * 0.5 = 3; 3.0 at (0, 2) first
    np.testing.assert_array_equal(top_fraction_mask(rewards, 0.5), expected)


def test_top_fraction_mask_selects_at_least_one():
    assert top_fraction_mask(np.arange(6.0).reshape(2, 3), 0.01).sum() == 1


def test_top_fraction_mask_counts_nan_candidates_but_never_selects_them():
    rewards = np.array([[np.nan, 1.0], [np.nan, np.nan]])
    np.testing.assert_array_equal(top_fraction_mask(rewards, 0.5), [[False, True], [False, False]])
    assert not top_fraction_mask(np.full((2, 2), np.nan), 1.0).any()


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, math.nan])
def test_top_fraction_mask_rejects_fractions_outside_0_1(fraction):
    with pytest.raises(ValueError, match="fraction"):
        top_fraction_mask(np.zeros((2, 2)), fraction)


@FEW
@given(
    st.lists(st.floats(-5, 5) | st.just(math.nan), min_size=1, max_size=24),
    st.floats(0.01, 1.0),
    st.integers(1, 6),
)
def test_selectors_keep_count_and_order(values, fraction, k):
    rewards = np.array(values)
    flat = top_fraction_mask(rewards[None, :], fraction)[0]
    valid = ~np.isnan(rewards)
    assert flat.sum() <= max(1, int(rewards.size * fraction))
    assert not (flat & ~valid).any()
    per_prompt = top_k_per_prompt_mask(rewards, k)
    assert per_prompt.sum() == min(k, valid.sum())
    for mask in (flat, per_prompt):
        if mask.any() and (valid & ~mask).any():
            assert rewards[mask].min() >= rewards[valid & ~mask].max()


# --------------------------------------------------------------------------- raft_iteration


def reference_raft_iteration(
    policy_logits, prompts, reward_fn, n_candidates=8, top_fraction=0.25, lr=1e-3
):
    """The straightforward loop that raft_iteration must reproduce under np.random.seed."""
    logits = np.array(policy_logits, dtype=float)
    n_prompts, vocab = logits.shape
    top_k = max(1, int(n_candidates * top_fraction))
    kept_rewards = []
    for i, prompt in enumerate(prompts):
        z = logits[i] - logits[i].max()
        p = np.exp(z) / np.exp(z).sum()
        idx = np.array([np.random.choice(vocab, p=p) for _ in range(n_candidates)])
        rewards = [reward_fn(prompt, int(tok)) for tok in idx]
        for j in np.argsort(rewards)[-top_k:]:
            logits[i, idx[j]] += lr * rewards[j]
            kept_rewards.append(rewards[j])
    return {
        "updated_logits": logits,
        "mean_reward": float(np.mean(kept_rewards)),
        "n_selected": len(kept_rewards),
    }


def quadratic_reward(prompt, token):
    return -((token - prompt) ** 2) / 10.0


def tied_reward(prompt, token):
    return float(token % 2)


def assert_same_result(actual, expected):
    np.testing.assert_array_equal(actual["updated_logits"], expected["updated_logits"])
    assert actual["mean_reward"] == expected["mean_reward"]
    assert actual["n_selected"] == expected["n_selected"]


def test_one_size_k_choice_consumes_the_global_stream_like_k_single_choices():
    p = np.array([0.1, 0.2, 0.3, 0.4])
    np.random.seed(7)
    singles = [np.random.choice(4, p=p) for _ in range(9)]
    after_singles = np.random.random()
    np.random.seed(7)
    batch = np.random.choice(4, size=9, p=p)
    assert list(batch) == singles
    assert np.random.random() == after_singles


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 42])
@pytest.mark.parametrize(
    ("reward_fn", "n_candidates", "top_fraction"),
    [(quadratic_reward, 8, 0.25), (tied_reward, 5, 0.5), (quadratic_reward, 3, 1.0)],
)
def test_matches_the_reference_loop_under_the_same_global_seed(
    seed, reward_fn, n_candidates, top_fraction
):
    logits = np.random.default_rng(seed).normal(size=(4, 6)) * 2
    prompts = [0, 2, 4, 5]
    kwargs = {"n_candidates": n_candidates, "top_fraction": top_fraction, "lr": 0.1}
    np.random.seed(seed)
    expected = reference_raft_iteration(logits, prompts, reward_fn, **kwargs)
    np.random.seed(seed)
    actual = raft_iteration(logits, prompts, reward_fn, **kwargs)
    assert_same_result(actual, expected)


def test_a_random_state_rng_reproduces_the_global_seed_without_touching_it():
    logits = np.zeros((3, 5))
    np.random.seed(11)
    expected = reference_raft_iteration(logits, [1, 2, 3], quadratic_reward)
    state = np.random.get_state()
    actual = raft_iteration(logits, [1, 2, 3], quadratic_reward, rng=np.random.RandomState(11))
    assert_same_result(actual, expected)
    assert np.random.get_state()[1].tolist() == state[1].tolist()


def test_a_generator_rng_is_reproducible():
    runs = [
        raft_iteration(np.zeros((3, 5)), [1, 2, 3], quadratic_reward, rng=np.random.default_rng(5))
        for _ in range(2)
    ]
    assert_same_result(*runs)


def test_the_input_logits_are_not_modified():
    logits = np.zeros((2, 4))
    nested = [[0.0] * 4, [0.0] * 4]
    result = raft_iteration(logits, [0, 1], lambda p, t: 1.0, rng=np.random.default_rng(0))
    raft_iteration(nested, [0, 1], lambda p, t: 1.0, rng=np.random.default_rng(0))
    assert not logits.any() and nested == [[0.0] * 4, [0.0] * 4]
    assert result["updated_logits"] is not logits and result["updated_logits"].any()


def test_a_token_kept_several_times_gets_every_increment():
    # One token only: all 4 candidates are token 0 and all are kept.
    result = raft_iteration(
        [[0.0]], ["p"], lambda p, t: 2.0, n_candidates=4, top_fraction=1.0, lr=0.5
    )
    np.testing.assert_array_equal(result["updated_logits"], [[4.0]])  # 4 * 0.5 * 2.0
    assert result["n_selected"] == 4 and result["mean_reward"] == 2.0


def test_only_the_top_fraction_is_kept_and_reported():
    logits = np.zeros((3, 10))
    result = raft_iteration(
        logits,
        [0, 1, 2],
        lambda p, t: float(t),
        n_candidates=8,
        top_fraction=0.25,
        lr=1.0,
        rng=np.random.default_rng(3),
    )
    assert result["n_selected"] == 3 * 2
    gains = result["updated_logits"]
    assert gains.sum() == pytest.approx(result["mean_reward"] * 6)  # lr=1: gain = reward


def test_numpy_scalar_rewards_are_accepted():
    result = raft_iteration(
        [[0.0, 0.0]], [0], lambda p, t: np.float32(t), rng=np.random.default_rng(0)
    )
    assert isinstance(result["mean_reward"], float)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"policy_logits": [[0.0, np.nan], [0.0, 0.0]]}, ValueError, "prompt 0, token 1"),
        ({"policy_logits": [[0.0, 0.0], [np.inf, 0.0]]}, ValueError, "prompt 1, token 0"),
        ({"policy_logits": [0.0, 0.0]}, ValueError, r"\[P, V\]"),
        ({"prompts": [0]}, ValueError, "1 prompts but policy_logits has 2 rows"),
        ({"n_candidates": 0}, ValueError, "n_candidates"),
        ({"n_candidates": 2.0}, TypeError, "n_candidates"),
        ({"top_fraction": 0.0}, ValueError, "top_fraction"),
        ({"top_fraction": 1.01}, ValueError, "top_fraction"),
        ({"lr": math.inf}, ValueError, "lr"),
        (
            {"reward_fn": lambda p, t: math.nan},
            ValueError,
            "prompt 0, candidate 0: reward_fn returned nan",
        ),
        (
            {"reward_fn": lambda p, t: "good"},
            TypeError,
            "prompt 0, candidate 0: reward_fn returned 'good'",
        ),
        ({"reward_fn": lambda p, t: True}, TypeError, "prompt 0, candidate 0"),
        (
            {"reward_fn": lambda p, t: math.inf if p == 1 else 0.0},
            ValueError,
            "prompt 1, candidate 0",
        ),
    ],
)
def test_raft_iteration_rejects_bad_input(kwargs, error, message):
    args = {"policy_logits": np.zeros((2, 2)), "prompts": [0, 1], "reward_fn": lambda p, t: 1.0}
    args.update(kwargs)
    with pytest.raises(error, match=message):
        raft_iteration(**args, rng=np.random.default_rng(0))
