"""The stage's steps on ragged rollouts (a different number of responses per prompt)."""

import numpy as np

from raftlm.config import RaftConfig
from raftlm.data.prompts import PromptRecord
from raftlm.jobs.steps import JobParts
from raftlm.rewards.reward import Reward
from raftlm.run.journal import StageJournal
from raftlm.stage import rank as rank_module
from raftlm.stage.collect import Collect
from raftlm.stage.rank import rank
from raftlm.stage.record import candidate_metrics, candidate_rows
from raftlm.stage.rollouts import Rollout, reward_rows_to_rollouts


def config(**training):
    return RaftConfig.from_dict({"data": {"task": "arithmetic"}, "training": training,
                                 "selection": {"deduplicate": False}})


def prompts(n):
    return [PromptRecord(id=10 + i, prompt=f"q{i}", text=f"q{i}", token_ids=[1, 2, 3],
                         columns={"answer": str(i)}) for i in range(n)]


def completion(text):
    return Rollout(text=text, token_ids=[4] * len(text), finish_reason="eos",
                      token_log_probs=[-0.5] * len(text))


def exact(prompts, completions, answer, **kwargs):
    return [float(c == a) for c, a in zip(completions, answer)]


def length(prompts, completions, **kwargs):
    return [len(c) / 10 for c in completions]


def score_candidates(reward, prompts, responses, folder):
    """Collect's scoring half on its own (as `raftlm score` runs it)."""
    journal = StageJournal(folder / "001", 0, {"stage": 1})
    rows = Collect(JobParts(RaftConfig(), reward=reward), 1, journal).score(prompts, responses)
    journal.close()
    return reward_rows_to_rollouts(prompts, responses, rows,
                                   sorted({name for row in rows for name in row["terms"]}))


def test_scoring_gives_nan_padded_tables_for_a_count_per_prompt(tmp_path):
    responses = [[completion("0"), completion("1"), completion("x")], [completion("1")]]
    reward = Reward([("exact", 1.0, exact), ("length", 0.5, length)])
    candidates = score_candidates(reward, prompts(2), responses, tmp_path)
    assert candidates.rewards.shape == (2, 3)
    np.testing.assert_allclose(candidates.rewards[0], [1.05, 0.05, 0.05])
    assert candidates.rewards[1, 0] == 1.05 and np.isnan(candidates.rewards[1, 1:]).all()
    np.testing.assert_array_equal(candidates.per_term["exact"][0], [1.0, 0.0, 0.0])
    rows = candidate_rows(candidates)
    assert len(rows) == 4  # padding is not a candidate
    assert rows[3]["rewards"] == {"exact": 1.0, "length": 0.1}


def test_rank_trains_group_objectives_on_each_prompts_own_responses(tmp_path):
    responses = [[completion("0"), completion("1"), completion("x")], [completion("1")]]
    candidates = score_candidates(Reward([("exact", 1.0, exact)]), prompts(2), responses,
                                  tmp_path)
    ranked = rank(candidates, config(objective="reinforce_rej"), stage=1)
    # prompt 0 has a spread (1, 0, 0): its three responses train; prompt 1 (one response) not
    assert sorted(len(e.response_ids) for e in ranked.examples) == [1, 1, 1]
    assert ranked.stats["train/groups_dropped"] == 1
    metrics = candidate_metrics(candidates, ranked)
    assert metrics["tokens/generated"] == 4 and metrics["reward/exact/mean"] == 0.5


def test_keeping_the_best_of_all_wrong_answers_is_said_once(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(rank_module, "_warned", set())
    responses = [[completion("x"), completion("y")], [completion("0"), completion("z")]]
    candidates = score_candidates(Reward([("exact", 1.0, exact)]), prompts(2), responses,
                                  tmp_path)
    ranked = rank(candidates, config(), stage=1)
    assert ranked.selection.n_selected == 2  # best_per_prompt keeps a wrong answer of prompt 1
    rank(candidates, config(), stage=2)
    err = capsys.readouterr().err
    assert err.count("had all rewards equal") == 1 and "selection.min_reward" in err
    strict = RaftConfig.from_dict({"data": {"task": "arithmetic"},
                                   "selection": {"min_reward": 1.0}})
    monkeypatch.setattr(rank_module, "_warned", set())
    rank(candidates, strict, stage=1)
    assert capsys.readouterr().err == ""


def test_a_rollouts_loss_mask_reaches_its_training_example(tmp_path):
    responses = [[completion("0"), completion("1")]]
    responses[0][0].loss_mask = [1]
    candidates = score_candidates(Reward([("exact", 1.0, exact)]), prompts(1), responses,
                                  tmp_path)
    ranked = rank(candidates, config(), stage=1)
    assert [e.loss_mask for e in ranked.examples] == [[1]]
