"""raft.hints (STaR's rationalization, raftlm.stage.hints) on a tiny model: which prompts are
hinted, what the hinted prompt is, what is kept and trained on (the original prompt's ids),
exact resume inside the hinted round, and two processes agreeing with one."""

from collections import Counter
from pathlib import Path

import pytest
from test_collectors import stage_rows
from test_loop import REWARD_FILE, make_config
from test_resume import Killed, snapshot
from tiny import assert_same_run, write_digits_task
from transformers import AutoTokenizer

from raftlm import RaftConfig, train
from raftlm.config import ConfigError
from raftlm.config.teaching import HintsConfig
from raftlm.data.prompts import PromptRecord, PromptSet, render_chat
from raftlm.run.journal import StageJournal
from raftlm.run.rundir import RunDir
from raftlm.stage.hints import check_hint_answers, hinted_prompt, quotes_hint
from raftlm.stage.loop import RunResult
from raftlm.training.trainer import PolicyTrainer

# The digit share of the tiny model's responses: at >= 0.15 some prompts are solved, some not.
HINTS = {"raft": {"hints": {"samples": 2}}, "selection": {"min_reward": 0.15}}


@pytest.fixture
def workspace(tmp_path, tiny_model_dir):
    write_digits_task(tmp_path, REWARD_FILE)
    return tmp_path


def config(workspace, model_dir, mode: dict = HINTS, **sections) -> RaftConfig:
    merged = {key: dict(value) for key, value in mode.items()}
    for key, value in sections.items():
        merged.setdefault(key, {}).update(value)
    return make_config(workspace, model_dir, tracking={"report": False}, **merged)


def killed_and_resumed(run_config: RaftConfig, kill_at: int, monkeypatch
                       ) -> tuple[RunResult, list[tuple[int, int]]]:
    """`run_config`'s run killed as it journals its `kill_at`-th sample, then resumed: the
    resumed run and the (prompt id, sample) pairs it sampled itself."""
    RunDir.create(run_config.run.output_dir, overwrite=True)
    original, calls = StageJournal.add_sample, Counter()

    def die(self, prompt_id, sample, completion):
        calls["n"] += 1
        if calls["n"] == kill_at:
            raise Killed
        original(self, prompt_id, sample, completion)

    monkeypatch.setattr(StageJournal, "add_sample", die)
    with pytest.raises(Killed):
        train(run_config)
    sampled = []
    monkeypatch.setattr(StageJournal, "add_sample", lambda self, *args: (
        sampled.append(args[:2]), original(self, *args)))
    return train(run_config, resume=True), sampled


def in_two_processes(workspace, one: RaftConfig) -> Path:
    """`one`'s run made by 2 processes (`accelerate launch`) in workspace/two."""
    from test_distributed import accelerate_launch

    two = RaftConfig.from_dict({**one.to_dict(), "run": {**one.to_dict()["run"],
                                                         "output_dir": str(workspace / "two")}})
    (workspace / "two.yaml").write_text(two.to_yaml())
    accelerate_launch(workspace, "--config", str(workspace / "two.yaml"))
    return workspace / "two"


# What a hint is --------------------------------------------------------------------------------

def test_a_response_quotes_the_hint_when_it_repeats_it_or_names_it():
    hint = "Hint: the answer is 42."
    assert not quotes_hint("6 * 7 = 42", hint, ["hint"])  # the answer alone is the point
    assert quotes_hint("As the HINT says, 42", hint, ["hint"])
    assert quotes_hint("so:  the answer\nis 42.", "the answer is 42.", [])  # spacing aside
    assert not quotes_hint("hint", hint, [])


def test_the_hinted_prompt_is_the_template_rendered_like_the_data_and_keeps_its_id(tok):
    hints = HintsConfig()
    record = PromptRecord(7, "What is 6 * 7?", "x", [1], {"answer": "42"})
    hinted = hinted_prompt(record, hints, tok, "Be brief.")
    text, ids = render_chat("What is 6 * 7?\n\nHint: the answer is 42.", tok, "Be brief.")
    assert (hinted.text, hinted.token_ids) == (text, ids)
    assert (hinted.id, hinted.prompt, hinted.columns) == (7, record.prompt, record.columns)
    chat = PromptRecord(8, [{"role": "user", "content": "6 * 7?"},
                            {"role": "assistant", "content": "?"},
                            {"role": "user", "content": "Well?"}], "x", [1], {"answer": "42"})
    assert "Well?\n\nHint: the answer is 42.<|im_end|>" in hinted_prompt(chat, hints, tok,
                                                                          None).text


def test_settings_that_cannot_work_are_refused_at_load(workspace, tiny_model_dir):
    with pytest.raises(ConfigError, match="raft.hints.template: expected {prompt} and {answer}"):
        config(workspace, tiny_model_dir, raft={"hints": {"template": "{prompt} {solution}"}})
    with pytest.raises(ConfigError, match="raft.hints.accept_reward: expected a number"):
        config(workspace, tiny_model_dir, {"raft": {"hints": {}}})
    with pytest.raises(ConfigError, match="raft.hints: expected no `rollout` section"):
        config(workspace, tiny_model_dir, rollout={"tools": ["calculator"]})
    off = config(workspace, tiny_model_dir, {"raft": {"hints": {"enabled": False}}})
    assert off.raft.hints.enabled is False  # no threshold needed: hints are off


def test_a_prompt_without_the_answer_column_is_refused_naming_it(workspace, tiny_model_dir):
    prompts = PromptSet([PromptRecord(0, "a", "a", [1], {"answer": "1"}),
                         PromptRecord(3, "b", "b", [1], {})], 0, "train.jsonl")
    with pytest.raises(ConfigError, match="raft.hints.answer_field: prompt 3 of train.jsonl "
                                          "has no 'answer' column"):
        check_hint_answers(config(workspace, tiny_model_dir), prompts)


# End to end ------------------------------------------------------------------------------------

def test_only_unsolved_prompts_are_hinted_and_only_kept_hints_have_a_reward(workspace,
                                                                           tiny_model_dir):
    result = train(config(workspace, tiny_model_dir))
    kept_total = 0
    for stage, metrics in enumerate(result.metrics[1:], start=1):
        rows = stage_rows(result.run_dir, stage)
        by_prompt: dict[int, list[dict]] = {}
        for row in rows:
            by_prompt.setdefault(row["prompt_id"], []).append(row)
        hinted = {pid for pid, group in by_prompt.items() if any("hint" in r for r in group)}
        unsolved = {pid for pid, group in by_prompt.items()
                    if all(r["reward"] < 0.15 for r in group[:3])}
        assert hinted == unsolved and metrics["sampling/hinted_prompts"] == len(unsolved)
        for pid in hinted:  # K own samples, then 2 hinted ones, indices going on
            assert [("hint" in r, r["sample"]) for r in by_prompt[pid]] == [
                (False, 0), (False, 1), (False, 2), (True, 3), (True, 4)]
        hints = [r for r in rows if "hint" in r]
        for row in hints:
            accepted = row["rewards"]["digits"] >= 0.15
            assert row["hint"] == ("wrong" if not accepted else "quoted" if quotes_hint(
                row["response"], f"Hint: the answer is {row['prompt_id']}.", ["hint"])
                else "kept")
            assert (row["reward"] is not None) == (row["hint"] == "kept")
        kept = [r for r in hints if r["hint"] == "kept"]
        assert metrics["sampling/hinted_kept"] == len(kept)
        assert metrics["sampling/hinted_samples"] == len(hints)
        assert metrics["sampling/samples"] == 12  # the collector's own
        assert metrics["tokens/generated"] == sum(r["n_tokens"] for r in rows)
        # The policy's numbers are its own samples': no hinted reward, no hinted "invalid".
        own = [r["reward"] for r in rows if "hint" not in r]
        assert metrics["train/reward_mean"] == pytest.approx(sum(own) / len(own))
        assert metrics["train/n_invalid_reward"] == 0
        # A kept hint solves its prompt: best_per_prompt picks one of them.
        for pid in {r["prompt_id"] for r in kept}:
            assert [r.get("hint") for r in by_prompt[pid] if r["selected"]] == ["kept"]
        kept_total += len(kept)
    assert kept_total >= 1  # the run exercised the kept path


def test_hinted_responses_are_sampled_from_the_hint_and_trained_on_the_original_prompt(
        workspace, tiny_model_dir, monkeypatch):
    import raftlm.stage.collect

    shown, trained, original = [], [], raftlm.stage.collect.generate
    monkeypatch.setattr(raftlm.stage.collect, "generate", lambda *args, **kwargs: (
        shown.extend(args[2]), original(*args, **kwargs))[1])
    train_original = PolicyTrainer.train
    monkeypatch.setattr(PolicyTrainer, "train", lambda self, examples, stage: (
        trained.extend(examples), train_original(self, examples, stage))[1])
    result = train(config(workspace, tiny_model_dir))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [r for stage in (1, 2) for r in stage_rows(result.run_dir, stage)]
    for pid in {r["prompt_id"] for r in rows if "hint" in r}:
        assert render_chat(f"Say {pid} digits\n\nHint: the answer is {pid}.", tok)[1] in shown
    kept = [r for r in rows if r.get("hint") == "kept"]
    assert kept
    for row in kept:  # the pair trained on: the prompt as the data has it, the hinted response
        prompt_ids = render_chat(row["original_prompt"], tok)[1]
        example = next(e for e in trained if list(e.prompt_ids) == prompt_ids
                       and tok.decode(e.response_ids, skip_special_tokens=True)
                       == row["response"])
        assert example.old_log_probs is None  # taken under the hinted prompt: dropped


def test_dynamic_sampling_takes_hints_for_the_prompts_it_drew_without_a_signal(
        workspace, tiny_model_dir):
    result = train(config(workspace, tiny_model_dir, raft={
        "collector": "dynamic", "dynamic": {"max_rounds": 2}, "stages": 1}))
    rows, metrics = stage_rows(result.run_dir, 1), result.metrics[1]
    hinted = {r["prompt_id"] for r in rows if "hint" in r}
    assert len(hinted) == metrics["sampling/hinted_prompts"] >= 1
    assert metrics["sampling/rounds"] == 2  # the collector's: the hinted round is not one
    assert metrics["sampling/prompts_drawn"] == len({r["prompt_id"] for r in rows}) > 4


def test_after_gvm_the_hinted_samples_continue_each_prompts_own_count(workspace,
                                                                     tiny_model_dir):
    result = train(config(workspace, tiny_model_dir, raft={
        "collector": "gvm", "gvm": {"first_samples": 2, "max_samples": 6}, "stages": 1}))
    by_prompt: dict[int, list[dict]] = {}
    for row in stage_rows(result.run_dir, 1):
        by_prompt.setdefault(row["prompt_id"], []).append(row)
    hinted = {pid: rows for pid, rows in by_prompt.items() if any("hint" in r for r in rows)}
    assert hinted
    for rows in hinted.values():
        own = [r for r in rows if "hint" not in r]
        assert [r["sample"] for r in rows] == list(range(len(own) + 2))
        assert all(r["reward"] < 0.15 for r in own)


def test_a_stage_killed_in_its_hinted_round_resumes_to_the_identical_run(
        workspace, tiny_model_dir, monkeypatch):
    reference = snapshot(train(config(workspace, tiny_model_dir)).run_dir)
    assert sum(1 for r in stage_rows(workspace / "run", 1) if "hint" in r) >= 2
    kill_at = 12 + 2  # stage 1's first round writes 4 x 3 samples; die in the hinted round
    resumed, sampled = killed_and_resumed(config(workspace, tiny_model_dir), kill_at,
                                          monkeypatch)
    assert_same_run(snapshot(resumed.run_dir), reference)
    stage_one = len(stage_rows(resumed.run_dir, 1))
    stage_two = len(stage_rows(resumed.run_dir, 2))
    assert len(sampled) == stage_one - (kill_at - 1) + stage_two  # finished samples reused


def test_the_generate_job_refuses_hints(workspace, tiny_model_dir):
    from raftlm.jobs.steps import generate_stage
    from raftlm.jobs.workdir import WorkMismatch

    with pytest.raises(WorkMismatch, match="raft.hints: raftlm generate samples"):
        generate_stage(config(workspace, tiny_model_dir), workspace / "work")


@pytest.mark.slow  # one 2-process launch (~20 s)
def test_two_processes_hint_the_same_prompts_as_one(workspace, tiny_model_dir):
    one = config(workspace, tiny_model_dir, raft={"stages": 1, "prompts_per_stage": 3},
                 run={"output_dir": str(workspace / "one")})
    train(one)
    assert stage_rows(in_two_processes(workspace, one), 1) == stage_rows(workspace / "one", 1)
    ones, twos = (RunDir(workspace / name).read_metrics()[1] for name in ("one", "two"))
    assert ones["sampling/hinted_prompts"] >= 1
    assert {k: v for k, v in twos.items() if k.startswith("sampling/")} == {
        k: v for k, v in ones.items() if k.startswith("sampling/")}
