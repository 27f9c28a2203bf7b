"""raft.collector: fixed | dynamic | gvm (raftlm.stage.collectors) on a tiny model: what each
collector samples, that decisions come from (seed, stage, prompt, sample index) alone, exact
resume inside a stage, and two processes agreeing with one."""

import json
from collections import Counter

import numpy as np
import pytest
from test_loop import REWARD_FILE, make_config
from test_resume import Killed, snapshot
from tiny import assert_same_run, write_digits_task

from raftlm import RaftConfig, train
from raftlm.config import ConfigError, field_choices
from raftlm.data.prompts import PromptRecord
from raftlm.run.journal import StageJournal
from raftlm.run.rundir import RunDir
from raftlm.stage.collectors import COLLECTORS, gvm_counts
from raftlm.stage.rank import useful_prompts
from raftlm.stage.rollouts import Rollout, Rollouts

# min_reward 0.15 on the digit share: some of the tiny model's prompts carry a signal, some not
DYNAMIC = {"raft": {"collector": "dynamic", "dynamic": {"max_rounds": 3}},
           "selection": {"min_reward": 0.15}}
GVM = {"raft": {"collector": "gvm", "gvm": {"first_samples": 2, "max_samples": 6}},
       "selection": {"min_reward": 0.15}}


@pytest.fixture
def workspace(tmp_path, tiny_model_dir):
    write_digits_task(tmp_path, REWARD_FILE)
    return tmp_path


def config(workspace, model_dir, mode: dict, **sections) -> RaftConfig:
    merged = {key: dict(value) for key, value in mode.items()}
    for key, value in sections.items():
        merged.setdefault(key, {}).update(value)
    merged["raft"] = {"stages": 2, **merged.get("raft", {})}
    return make_config(workspace, model_dir, tracking={"report": False}, **merged)


def stage_rows(run_dir, stage: int) -> list[dict]:
    return [json.loads(line) for line in
            (run_dir / f"stages/{stage:03d}/candidates.jsonl").read_text().splitlines()]


def texts_by_prompt(rows: list[dict]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for row in rows:
        out.setdefault(row["prompt_id"], []).append(row["response"])
    return out


def test_collectors_are_the_config_choices():
    assert set(COLLECTORS) == set(field_choices(RaftConfig, "raft.collector"))


def test_gvm_needs_a_reward_that_counts_as_accepted(workspace, tiny_model_dir):
    with pytest.raises(ConfigError, match="raft.gvm.accept_reward"):
        make_config(workspace, tiny_model_dir, raft={"collector": "gvm"})
    accepted = make_config(workspace, tiny_model_dir,
                           raft={"collector": "gvm", "gvm": {"accept_reward": 1.0}})
    assert accepted.raft.gvm.accept_reward == 1.0


def test_the_flat_names_of_last_release_still_work_with_a_note(workspace, tiny_model_dir,
                                                               capsys):
    old = make_config(workspace, tiny_model_dir, raft={
        "sampling": "gvm", "gvm_accept_reward": 1.0, "gvm_first_samples": 3,
        "max_sampling_rounds": 2}, generation={"vllm_gpu_memory_utilization": 0.7})
    assert (old.raft.collector, old.raft.gvm.accept_reward, old.raft.gvm.first_samples,
            old.raft.dynamic.max_rounds) == ("gvm", 1.0, 3, 2)
    assert old.generation.vllm.gpu_memory_utilization == 0.7
    notes = capsys.readouterr().err
    assert "raft.gvm_first_samples is now raft.gvm.first_samples" in notes
    assert "raft.sampling is now raft.collector" in notes
    with pytest.raises(ConfigError, match="raft.sampling and raft.collector are the same"):
        make_config(workspace, tiny_model_dir, raft={"sampling": "gvm", "collector": "fixed"})


def test_an_import_path_names_a_collector_of_ones_own(workspace, tiny_model_dir):
    """Half of each stage's prompts, K samples each: a collector is a short policy over the
    one Collect primitive, named like a reward function."""
    (workspace / "halves.py").write_text(
        "from raftlm.stage.collectors import Collector\n"
        "def collect(run, prompts, collect):\n"
        "    half = prompts[: len(prompts) // 2]\n"
        "    return collect(half, [run.config.raft.samples_per_prompt] * len(half))\n"
        "HALVES = Collector(collect, rewards_between_rounds=False)\n")
    result = train(config(workspace, tiny_model_dir, {}, raft={
        "collector": f"{workspace / 'halves.py'}:HALVES", "stages": 1}))
    assert len(texts_by_prompt(stage_rows(result.run_dir, 1))) == 2  # of b = 4


# Decisions on hand-made candidates ---------------------------------------------------------------

def candidates(rewards: list[list[float]], texts: list[list[str]] | None = None) -> Rollouts:
    texts = texts or [[f"answer {p} {j}" for j in range(len(row))] for p, row in
                      enumerate(rewards)]
    prompts = [PromptRecord(p, "q", "q", [1, 2], {}) for p in range(len(rewards))]
    responses = [[Rollout(text=t, token_ids=[5] * 3, finish_reason="stop",
                          token_log_probs=[-0.1, -0.2, -0.3]) for t in row] for row in texts]
    return Rollouts(prompts, responses, np.array(rewards, dtype=np.float64))


def test_a_prompt_is_useful_to_raft_when_a_response_passes_min_reward(workspace, tiny_model_dir):
    cfg = make_config(workspace, tiny_model_dir, selection={"min_reward": 1.0})
    table = candidates([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert useful_prompts(table, cfg).tolist() == [True, False, True]


def test_a_prompt_is_useful_to_grpo_when_its_rewards_differ(workspace, tiny_model_dir):
    cfg = make_config(workspace, tiny_model_dir, training={"objective": "grpo"})
    table = candidates([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert useful_prompts(table, cfg).tolist() == [True, False, False]


def test_gvm_gives_rarely_accepted_prompts_more_and_never_accepted_ones_their_first_round(
        workspace, tiny_model_dir):
    cfg = make_config(workspace, tiny_model_dir, raft={
        "collector": "gvm", "prompts_per_stage": 3, "samples_per_prompt": 8,
        "gvm": {"first_samples": 4, "max_samples": 16, "accept_reward": 1.0}})
    table = candidates([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    counts = gvm_counts(table, cfg)
    assert sum(counts) == 3 * 8 and counts[2] == 4 and counts[1] > counts[0] > 4


# End to end -------------------------------------------------------------------------------------

def test_fixed_sampling_records_its_numbers_and_is_the_default(workspace, tiny_model_dir):
    result = train(make_config(workspace, tiny_model_dir, tracking={"report": False}))
    stage = result.metrics[1]
    assert stage["sampling/prompts_drawn"] == 4 and stage["sampling/samples"] == 12
    assert stage["sampling/rounds"] == 1 and stage["sampling/samples_per_prompt_std"] == 0.0


def test_dynamic_sampling_draws_more_prompts_until_b_are_useful(workspace, tiny_model_dir):
    result = train(config(workspace, tiny_model_dir, DYNAMIC))
    for stage, metrics in enumerate(result.metrics[1:], start=1):
        rows = stage_rows(result.run_dir, stage)
        ids = list(dict.fromkeys(r["prompt_id"] for r in rows))
        assert len(ids) == metrics["sampling/prompts_drawn"] > 4  # set-aside prompts recorded
        assert metrics["sampling/samples"] == 3 * len(ids) == len(rows)
        assert metrics["sampling/useful_prompts"] == 4 or metrics["sampling/rounds"] == 3
        kept = {r["prompt_id"] for r in rows if r["selected"]}
        useful = {pid for pid in ids if any(r["reward"] >= 0.15 for r in rows
                                            if r["prompt_id"] == pid)}
        assert kept == useful and len(useful) == metrics["sampling/useful_prompts"]
    first, second = ({r["prompt_id"] for r in stage_rows(result.run_dir, s)} for s in (1, 2))
    assert not first & second  # the prompts set aside count as drawn: the order moved on


def test_gvm_extends_the_first_round_within_the_budget(workspace, tiny_model_dir):
    fixed = train(config(workspace, tiny_model_dir, {"selection": {"min_reward": 0.15}},
                         run={"output_dir": str(workspace / "fixed")}))
    result = train(config(workspace, tiny_model_dir, GVM))
    metrics = result.metrics[1]
    counts = Counter(r["prompt_id"] for r in stage_rows(result.run_dir, 1))
    assert sum(counts.values()) == metrics["sampling/samples"] == 4 * 3  # b * K
    assert min(counts.values()) >= 2 and max(counts.values()) <= 6
    assert metrics["sampling/samples_per_prompt_std"] > 0 and metrics["sampling/rounds"] == 2
    # Sample j of a prompt is the same whoever asks for it: GVM's samples begin with fixed's.
    ours = texts_by_prompt(stage_rows(result.run_dir, 1))
    theirs = texts_by_prompt(stage_rows(fixed.run_dir, 1))
    assert ours.keys() == theirs.keys()
    for pid, texts in ours.items():
        n = min(len(texts), 3)
        assert texts[:n] == theirs[pid][:n]


def test_gvm_on_a_backend_that_reseeds_samples_only_the_missing_responses(
        workspace, tiny_model_dir, monkeypatch):
    import raftlm.stage.collect

    asked, original = [], raftlm.stage.collect.generate
    monkeypatch.setattr(raftlm.stage.collect, "generate", lambda *args, **kwargs: (
        asked.append(list(args[3])), original(*args, **kwargs))[1])
    result = train(config(workspace, tiny_model_dir, GVM, generation={"backend": "hf"},
                          raft={"stages": 1}))
    counts = Counter(r["prompt_id"] for r in stage_rows(result.run_dir, 1)).values()
    assert asked[0] == [2] * 4 and sum(asked[1]) == 12 - 8  # the second round: only the rest
    assert sum(counts) == 12 and min(counts) >= 2


@pytest.mark.parametrize("mode, kill_at", [(DYNAMIC, 14), (GVM, 10)], ids=["dynamic", "gvm"])
def test_a_stage_killed_in_its_second_round_resumes_to_the_identical_run(
        workspace, tiny_model_dir, monkeypatch, mode, kill_at):
    reference = snapshot(train(config(workspace, tiny_model_dir, mode)).run_dir)
    RunDir.create(workspace / "run", overwrite=True)
    original, calls = StageJournal.add_sample, Counter()

    def die(self, prompt_id, sample, completion):
        calls["n"] += 1
        if calls["n"] == kill_at:  # stage 1's second round (its first wrote 12 or 8 samples)
            raise Killed
        original(self, prompt_id, sample, completion)

    monkeypatch.setattr(StageJournal, "add_sample", die)
    with pytest.raises(Killed):
        train(config(workspace, tiny_model_dir, mode))
    sampled = []
    monkeypatch.setattr(StageJournal, "add_sample", lambda self, *args: (
        sampled.append(args[:2]), original(self, *args)))
    resumed = train(config(workspace, tiny_model_dir, mode), resume=True)
    assert_same_run(snapshot(resumed.run_dir), reference)
    stage_one = sum(1 for r in stage_rows(resumed.run_dir, 1))
    stage_two = sum(1 for r in stage_rows(resumed.run_dir, 2))
    assert len(sampled) == stage_one - (kill_at - 1) + stage_two  # finished samples reused


# Two processes ----------------------------------------------------------------------------------

@pytest.mark.slow  # one 2-process launch each (~20 s): gvm's allocation, dynamic's empty shard
@pytest.mark.parametrize("mode", [DYNAMIC, GVM], ids=["dynamic", "gvm"])
def test_two_processes_take_the_same_decisions_as_one(workspace, tiny_model_dir, mode):
    from test_distributed import accelerate_launch

    # b = 3 over 2 processes: shards of 2 and 1, and a round of 1 prompt leaves one empty.
    one = config(workspace, tiny_model_dir, mode, raft={"stages": 1, "prompts_per_stage": 3},
                 run={"output_dir": str(workspace / "one")})
    train(one)
    two = RaftConfig.from_dict({**one.to_dict(), "run": {**one.to_dict()["run"],
                                                         "output_dir": str(workspace / "two")}})
    (workspace / "two.yaml").write_text(two.to_yaml())
    accelerate_launch(workspace, "--config", str(workspace / "two.yaml"))
    assert stage_rows(workspace / "two", 1) == stage_rows(workspace / "one", 1)
    ones, twos = (RunDir(workspace / name).read_metrics()[1] for name in ("one", "two"))
    assert {k: v for k, v in twos.items() if k.startswith("sampling/")} == {
        k: v for k, v in ones.items() if k.startswith("sampling/")}
    assert ones["sampling/rounds"] == 2


def test_a_group_objective_finds_no_signal_in_the_overlong_penalty_alone(workspace,
                                                                         tiny_model_dir):
    """31.8: DAPO's useful-prompt test reads accuracy: all answers right but of different
    lengths differ only by the overlong penalty, which is no signal about the task."""
    cfg = make_config(workspace, tiny_model_dir, generation={"max_new_tokens": 6},
                      training={"objective": "grpo", "overlong_buffer": 4})
    table = candidates([[1.0, 1.0], [1.0, 0.0]])
    table.responses[0][1].token_ids = [5] * 6  # long: shaped 1.0 - penalty, raw still 1.0
    assert useful_prompts(table, cfg).tolist() == [False, True]


def test_dynamic_sets_aside_the_prompts_without_a_signal(workspace, tiny_model_dir):
    """31.3: the prompts dynamic drew but did not use are marked, so Rank leaves them out of
    its statistics (the batch std of advantage_scale batch)."""
    from types import SimpleNamespace

    from raftlm.data.prompts import PromptOrder
    from raftlm.stage.collectors import dynamic

    cfg = make_config(workspace, tiny_model_dir, raft={"prompts_per_stage": 2,
                                                       "samples_per_prompt": 2},
                      training={"objective": "grpo"})
    pool = [PromptRecord(p, "q", "q", [1, 2], {}) for p in range(6)]
    rewards = {0: [1.0, 0.0], 1: [0.0, 0.0], 2: [0.0, 0.0], 3: [0.0, 1.0]}
    run = SimpleNamespace(config=cfg, train_prompts=SimpleNamespace(records=pool),
                          prompt_order=PromptOrder(6, 0))
    run.prompt_order.draw(2)  # the stage's first b prompts: ids 0 and 1 are passed in below

    def collect(prompts, counts):
        return Rollouts(prompts, [[Rollout("a", [5], "eos", [-0.1])] * n for n in counts],
                        np.array([rewards.get(p.id, [0.0, 0.0]) for p in prompts]))

    out = dynamic(run, pool[:2], collect)
    useful = useful_prompts(out, cfg)
    assert useful.sum() >= 1 and out.set_aside.tolist() == (~useful).tolist()


def test_gvm_refuses_a_budget_its_first_round_would_overspend(workspace, tiny_model_dir):
    """31.7: 4 prompts x 4 first samples spend 16 before any allocation; a budget of 8 was
    silently spent twice over."""
    with pytest.raises(ConfigError, match="raft.gvm.budget: expected 0 .* or >= "
                                          "raft.prompts_per_stage x raft.gvm.first_samples"):
        make_config(workspace, tiny_model_dir, raft={"collector": "gvm", "gvm": {
            "budget": 8, "first_samples": 4, "accept_reward": 1.0}})


def test_gvm_gradient_norms_from_a_backend_without_log_probs_are_refused(workspace,
                                                                         tiny_model_dir):
    """31.7: vllm records no log-probs, so grad_norm logits silently became none."""
    from raftlm.stage.collectors import collector

    cfg = make_config(workspace, tiny_model_dir, raft={"collector": "gvm", "gvm": {
        "accept_reward": 1.0}}, generation={"backend": "vllm"})
    with pytest.raises(ConfigError, match="raft.gvm.grad_norm: expected none with "
                                          "generation.backend=vllm"):
        collector("gvm").check(cfg)
    cfg.raft.gvm.grad_norm = "none"
    collector("gvm").check(cfg)
