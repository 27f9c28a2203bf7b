"""The sampling modes' reference math (raftlm.core.collectors): useful-prompt test, GVM's rule."""

import numpy as np
import pytest

from raftlm.core.collectors import (
    acceptance_rates,
    allocate_samples,
    gvm_allocation,
    gvm_weights,
    has_reward_spread,
    logit_gradient_norm,
    mean_accepted,
)

nan = float("nan")


def test_a_prompt_has_a_reward_spread_only_with_two_different_eligible_rewards():
    rewards = np.array([[0.0, 1.0, nan], [1.0, 1.0, 1.0], [1.0, nan, nan], [nan, nan, nan],
                        [0.5, 0.5, 0.25]])
    assert has_reward_spread(rewards).tolist() == [True, False, False, False, True]


def test_acceptance_rates_count_only_real_samples():
    accepted = np.array([[True, False, False, False], [True, True, False, False],
                         [False, False, False, False]])
    assert acceptance_rates(accepted, [4, 2, 0]).tolist() == [0.25, 1.0, 0.0]


def test_logit_gradient_norm_is_the_norm_of_one_minus_each_token_probability():
    log_probs = np.log([0.5, 1.0, 0.2])
    assert logit_gradient_norm(log_probs) == pytest.approx(np.sqrt(0.5**2 + 0 + 0.8**2))
    assert logit_gradient_norm([]) == 0.0


def test_logit_gradient_norm_bounds_the_true_softmax_gradient_within_sqrt_two():
    rng = np.random.default_rng(0)
    for _ in range(50):
        logits = rng.normal(size=(5, 7)) * 3
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        tokens = rng.integers(0, 7, size=5)
        onehot = np.eye(7)[tokens]
        true = np.linalg.norm(probs - onehot)  # d(-log pi(y)) / d logits, all positions
        proxy = logit_gradient_norm(np.log(probs[np.arange(5), tokens]))
        assert proxy <= true + 1e-12 and true <= np.sqrt(2) * proxy + 1e-12


def test_mean_accepted_averages_over_accepted_samples_only():
    values = np.array([[1.0, 3.0, 100.0], [5.0, 6.0, 7.0]])
    accepted = np.array([[True, True, False], [False, False, False]])
    assert mean_accepted(values, accepted).tolist() == [2.0, 0.0]


def test_gvm_weights_follow_the_papers_rule_and_give_nothing_to_never_accepted_prompts():
    p, g = np.array([0.25, 1.0, 0.0, 0.5]), np.array([2.0, 2.0, 2.0, 0.0])
    w = gvm_weights(p, g, alpha=1e-3, beta=2.0)
    assert w[0] == pytest.approx(2.0 / np.sqrt(0.25 + 1e-3 / 0.25))
    assert w[1] == pytest.approx(2.0 / np.sqrt(1.0 + 1e-3))
    assert w[2] == 0.0 and w[3] == 0.0
    assert w[0] > w[1]  # rarer acceptance, more samples (until alpha takes over near p = 0)
    tiny = gvm_weights(np.array([1e-4, 1e-2]), np.ones(2), alpha=1e-3, beta=2.0)
    assert tiny[0] < tiny[1]  # alpha damps prompts that are almost never accepted


def test_allocation_is_proportional_to_the_weights_and_adds_up_to_the_budget():
    counts = allocate_samples(np.array([1.0, 2.0, 3.0, 2.0]), budget=32, minimum=0, maximum=100)
    assert counts.tolist() == [4, 8, 12, 8]


def test_allocation_respects_the_minimum_and_maximum_and_redistributes_the_rest():
    counts = allocate_samples(np.array([10.0, 1.0, 1.0, 0.0]), budget=32, minimum=4,
                              maximum=12)
    assert counts.tolist() == [12, 8, 8, 4]  # first capped, zero weight at its minimum
    assert counts.sum() == 32


def test_allocation_spends_no_more_than_the_bounds_allow():
    assert allocate_samples(np.array([1.0, 0.0]), budget=100, minimum=2, maximum=5
                            ).tolist() == [5, 2]
    assert allocate_samples(np.array([1.0, 1.0]), budget=1, minimum=2, maximum=5
                            ).tolist() == [2, 2]


def test_allocation_without_any_positive_weight_spreads_the_budget_evenly():
    assert allocate_samples(np.zeros(4), budget=32, minimum=4, maximum=16).tolist() == [8] * 4


def test_allocation_rounds_by_largest_remainder_with_ties_to_the_earlier_prompt():
    assert allocate_samples(np.ones(3), budget=10, minimum=0, maximum=10).tolist() == [4, 3, 3]
    counts = allocate_samples(np.array([1.0, 1.3, 1.7]), budget=8, minimum=0, maximum=10)
    assert counts.tolist() == [2, 3, 3] and counts.sum() == 8


def test_allocation_rejects_bad_inputs():
    with pytest.raises(ValueError, match="weights"):
        allocate_samples(np.array([1.0, -1.0]), 4, 0, 4)
    with pytest.raises(ValueError, match="minimum"):
        allocate_samples(np.ones(2), 4, 5, 4)


def test_allocation_is_exact_on_random_cases():
    rng = np.random.default_rng(1)
    for _ in range(200):
        n = int(rng.integers(1, 40))
        w = rng.random(n) * (rng.random(n) > 0.3)
        low, high = int(rng.integers(0, 5)), int(rng.integers(5, 30))
        budget = int(rng.integers(0, 40 * n))
        counts = allocate_samples(w, budget, low, high)
        assert counts.min() >= low and counts.max() <= high
        room = low * n + (high - low) * int((w > 0).sum() if w.any() else n)
        assert counts.sum() == min(max(budget, low * n), room)
        assert np.all(counts[w == 0] == low) or not w.any()


def test_gvm_allocation_gives_more_to_rarely_accepted_prompts_with_the_same_gradient():
    accepted = np.array([[True, True, True, True], [True, False, False, False],
                         [False, False, False, False]])
    counts = gvm_allocation(accepted, np.ones((3, 4)), [4, 4, 4], budget=24, minimum=4,
                            maximum=16)
    assert counts.sum() == 24 and counts[2] == 4 and counts[1] > counts[0] >= 4
