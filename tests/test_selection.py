"""Rank step: strategies and filters over a [P, K] reward table."""

import numpy as np

from raftlm.config import SelectionConfig


def run_select(rewards, texts=None, lengths=None, **settings):
    from raftlm.rewards.selection import select

    rewards = np.array(rewards, dtype=float)
    p, k = rewards.shape
    texts = texts or [[f"r{i}-{j}" for j in range(k)] for i in range(p)]
    lengths = lengths or [[5] * k for _ in range(p)]
    return select(rewards, texts, lengths, SelectionConfig(**settings))


def test_best_per_prompt_keeps_one_argmax_per_prompt_first_on_ties():
    sel = run_select([[0.1, 0.9, 0.9], [0.5, 0.2, 0.1]])
    assert sel.mask.tolist() == [[False, True, False], [True, False, False]]


def test_top_k_per_prompt_keeps_k_best_of_each_prompt():
    sel = run_select([[0.1, 0.9, 0.5], [0.3, 0.2, 0.4]], strategy="top_k_per_prompt", top_k=2)
    assert sel.mask.tolist() == [[False, True, True], [True, False, True]]


def test_top_fraction_is_global_across_prompts():
    sel = run_select([[0.1, 0.9, 0.8], [0.3, 0.2, 0.4]], strategy="top_fraction",
                     top_fraction=2 / 6)
    assert sel.mask.tolist() == [[False, True, True], [False, False, False]]


def test_min_reward_drops_selected_responses_below_threshold():
    sel = run_select([[0.0, 0.0], [1.0, 0.0]], min_reward=1.0)
    assert sel.mask.tolist() == [[False, False], [True, False]]
    assert sel.dropped["below_min_reward"] == 1


def test_uniform_prompts_carry_no_signal_and_are_dropped():
    sel = run_select([[1.0, 1.0], [0.0, 1.0]], drop_uniform_prompts=True)
    assert sel.mask.tolist() == [[False, False], [False, True]]
    assert sel.dropped["uniform_prompt"] == 2


def test_too_short_responses_are_dropped():
    sel = run_select([[0.9, 0.1]], lengths=[[0, 3]], min_response_tokens=1)
    assert sel.mask.tolist() == [[False, True]]
    assert sel.dropped["too_short"] == 1


def test_truncated_responses_are_dropped_when_asked():
    from raftlm.rewards.selection import select

    rewards = np.array([[0.9, 0.1]])
    config = SelectionConfig(drop_truncated=True)
    sel = select(rewards, [["a", "b"]], [[5, 5]], config, truncated=np.array([[True, False]]))
    assert sel.mask.tolist() == [[False, True]]
    assert sel.dropped["truncated"] == 1


def test_responses_matching_reject_pattern_are_dropped():
    sel = run_select([[0.9, 0.1]], texts=[["As an AI, 42", "42"]], reject_pattern=r"As an AI")
    assert sel.mask.tolist() == [[False, True]]


def test_duplicates_of_a_prompt_are_kept_once():
    sel = run_select([[0.9, 0.9, 0.1]], texts=[["same", "same", "other"]],
                     strategy="top_k_per_prompt", top_k=2)
    assert sel.mask.tolist() == [[True, False, True]]
    assert sel.dropped["duplicate"] == 1


def test_invalid_rewards_are_never_selected():
    sel = run_select([[np.nan, 0.2], [np.nan, np.nan]])
    assert sel.mask.tolist() == [[False, True], [False, False]]
