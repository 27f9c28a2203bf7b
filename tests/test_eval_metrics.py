"""Evaluation metrics over n samples: unbiased pass@k, avg@n, maj@n (hand-made cases)."""

import itertools
from math import comb

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from raftlm.core.evaluation import (
    avg_at_n,
    maj_at_n,
    majority_answer,
    pass_at_k,
    pass_at_k_curve,
)


def test_pass_at_k_matches_the_binomial_formula_on_a_hand_case():
    # n=5, c=2: pass@1 = 2/5; pass@2 = 1 - C(3,2)/C(5,2) = 1 - 3/10; pass@3 = 1 - 1/10.
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9)
    assert pass_at_k(5, 2, 4) == 1.0  # n - c < k: every draw holds a correct sample


def test_pass_at_k_is_the_share_of_k_subsets_holding_a_correct_sample():
    samples = [1, 0, 0, 1, 0, 0]
    for k in range(1, 7):
        subsets = list(itertools.combinations(samples, k))
        expected = sum(any(s) for s in subsets) / len(subsets)
        assert pass_at_k(6, 2, k) == pytest.approx(expected)


@given(st.integers(1, 60), st.data())
def test_pass_at_k_equals_the_exact_binomial_ratio(n, data):
    c = data.draw(st.integers(0, n))
    k = data.draw(st.integers(1, n))
    assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)


def test_pass_at_k_stays_finite_where_binomials_overflow_floats():
    # C(2000, 1000) ~ 1e600 would overflow a float; the product form does not.
    value = pass_at_k(2000, 1, 1000)
    assert value == pytest.approx(0.5)


def test_pass_at_k_refuses_k_outside_one_to_n():
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, 1, 5)


def test_pass_at_k_curve_averages_over_prompts_for_every_k():
    correct = np.array([[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    curve = pass_at_k_curve(correct)
    assert list(curve) == [1, 2, 3, 4]
    assert curve[1] == pytest.approx((0.25 + 1 + 0) / 3)
    assert curve[2] == pytest.approx((0.5 + 1 + 0) / 3)
    # At k = n the unbiased estimate is "any of the n": the legacy eval/pass_at_k.
    assert curve[4] == pytest.approx(np.mean(correct.any(axis=1)))


def test_avg_at_n_pools_every_sample():
    assert avg_at_n(np.array([[1, 0], [1, 1]])) == pytest.approx(0.75)


def test_majority_answer_counts_votes_and_ignores_samples_without_an_answer():
    assert majority_answer(["3", None, "5", "5", None, None]) == "5"
    assert majority_answer([None, None]) is None


def test_majority_answer_breaks_a_tie_for_the_answer_seen_first():
    assert majority_answer(["7", "3", "3", "7"]) == "7"
    assert majority_answer(["3", "7", "7", "3"]) == "3"


def test_maj_at_n_is_the_share_of_prompts_whose_vote_is_right():
    answers = [["18", "18", "20"], ["1", "2", "2"], [None, None, None]]
    correct = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]])  # references 18, 1 and 4
    assert maj_at_n(answers, correct) == pytest.approx(1 / 3)


def test_maj_at_n_judges_the_vote_by_the_samples_that_gave_it():
    # An equivalence rule (math-verify) may call "0.5" and "1/2" both right: the vote for
    # "1/2" is right because its samples were judged right, not because strings match.
    assert maj_at_n([["1/2", "1/2", "0.5"]], np.array([[1, 1, 1]])) == 1.0
    assert maj_at_n([["7", "7", "5"]], np.array([[0, 0, 1]])) == 0.0
