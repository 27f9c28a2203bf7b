"""Rank step: strategies and filters over a [P, K] reward table."""

import numpy as np

from raftlm.config import SelectionConfig
from raftlm.stage.rank import select


def run_select(rewards, texts=None, lengths=None, **settings):
    from raftlm.stage.rank import select

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
    from raftlm.stage.rank import select

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


def test_a_ragged_table_selects_only_real_candidates():
    # prompt 0 has 3 responses, prompt 1 only 1: its row is NaN-padded
    rewards = np.array([[0.1, 0.9, 0.5], [0.7, np.nan, np.nan]])
    sel = select(rewards, [["a", "b", "c"], ["d"]], np.array([[3, 3, 3], [3, 0, 0]]),
                 SelectionConfig(strategy="top_fraction", top_fraction=0.5))
    # 4 real candidates -> 2 kept (the padding does not count towards the fraction)
    assert sel.mask.tolist() == [[False, True, False], [True, False, False]]
    assert sel.dropped["too_short"] == 0  # padded slots are not "too short" responses


def test_top_fraction_ties_are_broken_by_the_given_keys_not_by_position():
    rewards = np.ones((4, 2))
    keys = np.random.default_rng(0).random(rewards.shape)
    sel = select(rewards, [["a", "b"]] * 4, [[2, 2]] * 4,
                 SelectionConfig(strategy="top_fraction", top_fraction=0.25), tie_break=keys)
    expected = np.zeros(8, dtype=bool)
    expected[np.argsort(keys.ravel())[:2]] = True
    assert sel.mask.ravel().tolist() == expected.tolist()


def test_eligible_marks_what_passed_the_response_filters_only():
    sel = select([[1.0, 0.0, 0.0, np.nan]], [["ok", "ok", "BAD", "x"]], [[2, 2, 2, 2]],
                 SelectionConfig(reject_pattern="BAD", deduplicate=True),
                 truncated=np.array([[False, False, False, False]]))
    # the duplicate "ok" is still eligible (dedup is about imitation, not response quality);
    # the rejected pattern and the invalid reward are not
    assert sel.eligible.tolist() == [[True, True, False, False]]
    assert sel.dropped["duplicate"] == 1 and sel.dropped["rejected_pattern"] == 1


def test_selection_strategies_registry_matches_the_config_choices():
    from raftlm.config import SelectionConfig as Config
    from raftlm.config.schema import field_choices
    from raftlm.stage.rank import SELECTION_STRATEGIES

    assert set(SELECTION_STRATEGIES) == set(field_choices(Config, "strategy"))


def test_uniformity_is_judged_on_what_the_response_filters_leave():
    """Issue 31.1: the only correct answer of prompt 0 was truncated; the two wrong ones left
    are all equal, so the prompt carries no signal and best_per_prompt must not imitate one."""
    config = SelectionConfig(drop_truncated=True, drop_uniform_prompts=True)
    truncated = np.array([[True, False, False], [False, False, False]])
    sel = select(np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]), [["a", "b", "c"], ["d", "e", "f"]],
                 [[5] * 3] * 2, config, truncated=truncated)
    assert sel.mask.tolist() == [[False, False, False], [True, False, False]]
    assert sel.dropped["truncated"] == 1 and sel.dropped["uniform_prompt"] == 2
