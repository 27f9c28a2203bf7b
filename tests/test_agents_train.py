"""RAFT with tools and environments end to end on a tiny model: `raftlm.train` samples
trajectories, trains on the model's tokens only, and resumes to the same stage."""

import json
import shutil

import pytest
from tiny import scripted_turns, write_digits_task

import raftlm.agents.rollout as rollout_module
import raftlm.stage.loop as loop_module
from raftlm import RaftConfig, train
from raftlm.training.batches import PairExample

COUNTER = '''
class Counter:
    """A step-shaped environment: every model turn is an action; three steps and it is done."""

    def reset(self, prompt, answer, **row):
        self.steps = 0
        return f"You have {answer} tries."

    def step(self, action):
        self.steps += 1
        return f"step {self.steps}", None, self.steps >= 3
'''


def make_config(workspace, model_dir, **sections):
    raw = {
        "run": {"output_dir": str(workspace / "run"), "seed": 1},
        "model": {"path": str(model_dir), "dtype": "fp32", "lora": {"r": 4, "alpha": 8}},
        "data": {"train_file": str(workspace / "train.jsonl")},
        "raft": {"stages": 2, "prompts_per_stage": 3, "samples_per_prompt": 2},
        "generation": {"max_new_tokens": 6, "batch_size": 8},
        "reward": {"terms": [f"{workspace / 'rewards.py'}:digits"]},
        "training": {"learning_rate": 1e-2, "micro_batch_size": 2},
        "evaluation": {"enabled": False},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return RaftConfig.from_dict(raw)


@pytest.fixture
def workspace(tmp_path):
    write_digits_task(tmp_path)
    (tmp_path / "envs.py").write_text(COUNTER)
    return tmp_path


@pytest.fixture
def trained_on(monkeypatch):
    """Every stage's training examples, as the Fine-tune step received them."""
    seen = []

    def spy(trainer, rollouts, ranked, *args, **kwargs):
        seen.append(ranked.examples)
        return fine_tune(trainer, rollouts, ranked, *args, **kwargs)

    fine_tune = loop_module.fine_tune
    monkeypatch.setattr(loop_module, "fine_tune", spy)
    return seen


def test_a_tool_run_trains_only_on_the_models_tokens(workspace, tiny_model_dir, monkeypatch,
                                                     trained_on, tok):
    """Scripted turns (the tiny model cannot write a call): odd draws ask the calculator how
    many digits the prompt wants and answer with that many; even draws answer at once."""
    monkeypatch.setattr(rollout_module, "generate", scripted_turns(tok))
    result = train(make_config(workspace, tiny_model_dir, generation={"max_new_tokens": 120},
                               rollout={"tools": ["calculator"], "max_turns": 3}))
    assert [m["stage"] for m in result.metrics] == [0, 1, 2]
    assert result.metrics[1]["time/tools_s"] >= 0
    examples = [e for stage in trained_on for e in stage]
    called = [e for e in examples if e.loss_mask and 0 in e.loss_mask]
    assert called, "a trajectory with a tool call was selected"
    for example in called:
        assert "calculator" in tok.decode(example.prompt_ids)  # sampled after the tool prompt
        observation = [t for t, m in zip(example.response_ids, example.loss_mask) if m == 0]
        assert tok.decode(observation).startswith("<|im_end|>\n<|im_start|>tool\n")
        assert len(example.loss_mask) == len(example.response_ids)
    rows = [json.loads(line) for line in (result.run_dir / "stages/001/candidates.jsonl").open()]
    assert len(rows) == 3 * 2
    assert all("calculator" in row["prompt"] for row in rows)


def test_a_step_environment_run_resumes_to_the_same_stage(workspace, tiny_model_dir,
                                                          trained_on, tok):
    rollout = {"environment": f"{workspace / 'envs.py'}:Counter", "max_turns": 3,
               "max_trajectory_tokens": 200}
    full = train(make_config(workspace, tiny_model_dir, raft={"stages": 3}, rollout=rollout))
    reference = (full.run_dir / "stages/003/candidates.jsonl").read_text()
    examples = [e for stage in trained_on for e in stage]
    assert all(e.loss_mask.count(0) > 0 for e in examples)  # observations masked out
    assert all("tries." in tok.decode(e.prompt_ids) for e in examples)  # reset's text
    shutil.rmtree(full.run_dir)

    train(make_config(workspace, tiny_model_dir, raft={"stages": 2}, rollout=rollout))
    resumed = train(make_config(workspace, tiny_model_dir, raft={"stages": 3}, rollout=rollout),
                    resume=True)
    assert (resumed.run_dir / "stages/003/candidates.jsonl").read_text() == reference


@pytest.mark.parametrize("objective, collector", [
    ("grpo", "fixed"), ("raft++", "dynamic"), ("reward_weighted", "gvm"),
    ("reinforce_rej", "fixed"), ("dpo", "fixed"), ("rpo", "dynamic")])
def test_trajectories_train_under_every_objective_and_collector(workspace, tiny_model_dir,
                                                                  trained_on, objective,
                                                                  collector):
    config = make_config(
        workspace, tiny_model_dir, training={"objective": objective},
        raft={"stages": 1, "collector": collector,
              "gvm": {"first_samples": 2, "max_samples": 4, "accept_reward": 0.1}},
        rollout={"environment": f"{workspace / 'envs.py'}:Counter", "max_turns": 2,
                 "max_trajectory_tokens": 200})
    result = train(config)
    assert [m["stage"] for m in result.metrics] == [0, 1]
    examples = [e for stage in trained_on for e in stage]
    assert examples
    for e in examples:
        if isinstance(e, PairExample):  # dpo, rpo: both responses masked to the model's tokens
            assert len(e.loss_mask) == len(e.response_ids) and 0 in e.loss_mask
            assert len(e.rejected_loss_mask) == len(e.rejected_ids) and 0 in e.rejected_loss_mask
        else:
            assert len(e.loss_mask) == len(e.response_ids) == len(e.old_log_probs)
            assert 0 in e.loss_mask


def test_a_stage_killed_mid_rollout_resumes_from_its_journal_to_the_same_stage(
        workspace, tiny_model_dir, monkeypatch):
    from raftlm.run.journal import StageJournal

    rollout = {"environment": f"{workspace / 'envs.py'}:Counter", "max_turns": 3,
               "max_trajectory_tokens": 200}
    config = make_config(workspace, tiny_model_dir, raft={"stages": 1}, rollout=rollout)
    reference = (train(config).run_dir / "stages/001/candidates.jsonl").read_text()
    shutil.rmtree(workspace / "run")

    journaled = []
    add_sample = StageJournal.add_sample

    def dies_after_three(journal, prompt_id, sample, record):
        if len(journaled) == 3:
            raise RuntimeError("killed")
        journaled.append((prompt_id, sample))
        add_sample(journal, prompt_id, sample, record)

    monkeypatch.setattr(StageJournal, "add_sample", dies_after_three)
    with pytest.raises(RuntimeError, match="killed"):
        train(config)
    resampled = []
    monkeypatch.setattr(StageJournal, "add_sample", lambda journal, prompt_id, sample, record: (
        resampled.append((prompt_id, sample)), add_sample(journal, prompt_id, sample, record)))
    resumed = train(config, resume=True)
    assert (resumed.run_dir / "stages/001/candidates.jsonl").read_text() == reference
    assert len(resampled) == 3 * 2 - 3 and not set(resampled) & set(journaled)
