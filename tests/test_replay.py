"""Stages that build on each other (docs/recipes.md): replay of earlier stages' kept responses,
anchor data, restart from the initial policy, per-stage schedules."""

import json

import numpy as np
import pytest
import torch
from test_loop import REWARD_FILE, make_config
from test_resume import Killed, snapshot
from tiny import assert_same_run, tiny_tokenizer, write_digits_task

from raftlm import RaftConfig, train
from raftlm.config import ConfigError
from raftlm.config.stages import Ramp, ReplayConfig, stage_value
from raftlm.data.anchor import anchor_draw, load_anchor
from raftlm.data.prompts import DataError, build_prompt_set
from raftlm.stage.replay import KEPT_FILE, check_stage_settings, planned_examples, replay_rows
from raftlm.training.trainer import PolicyTrainer

# Replay's choice of rows ---------------------------------------------------------------------


def row(prompt_id: int, response: list[int], weight: float = 1.0) -> dict:
    return {"prompt_id": prompt_id, "sample": 0, "weight": weight, "prompt_ids": [prompt_id],
            "response_ids": response}


EARLIER = {1: [row(1, [5]), row(2, [6])], 2: [row(1, [5]), row(1, [7])], 3: [row(3, [8])]}


def test_replay_takes_every_earlier_stage_newest_first_one_copy_each():
    rows = replay_rows(EARLIER, own=[], config=ReplayConfig(), seed=0, stage=4)
    assert [(r["prompt_id"], r["response_ids"]) for r in rows] == [
        (3, [8]), (1, [5]), (1, [7]), (2, [6])]


def test_replay_window_keeps_the_last_n_stages():
    rows = replay_rows(EARLIER, own=[], config=ReplayConfig(window=1), seed=0, stage=4)
    assert [r["response_ids"] for r in rows] == [[8]]


def test_replay_skips_what_the_stage_kept_itself_and_caps_per_prompt():
    rows = replay_rows(EARLIER, own=[row(3, [8])], config=ReplayConfig(per_prompt_cap=1),
                       seed=0, stage=4)
    assert [(r["prompt_id"], r["response_ids"]) for r in rows] == [(1, [5]), (2, [6])]


def test_replay_without_dedupe_keeps_repeats():
    rows = replay_rows(EARLIER, own=[row(3, [8])], config=ReplayConfig(dedupe=False), seed=0,
                       stage=4)
    assert len(rows) == 5


def test_replay_share_draws_a_seeded_subset_in_pool_order():
    own = [row(9, [1]), row(9, [2])]
    config = ReplayConfig(share=1.0)
    first = replay_rows(EARLIER, own, config, seed=0, stage=4)
    assert len(first) == 2 and first == replay_rows(EARLIER, own, config, seed=0, stage=4)
    pool = replay_rows(EARLIER, own, ReplayConfig(), seed=0, stage=4)
    assert [pool.index(r) for r in first] == sorted(pool.index(r) for r in first)
    draws = {tuple(map(id, replay_rows(EARLIER, own, config, seed=s, stage=4))) for s in range(8)}
    assert len(draws) > 1


def test_a_kept_row_holds_the_sampled_ids_and_a_multi_turn_loss_mask():
    from raftlm.data.prompts import PromptRecord
    from raftlm.stage.rank import rank
    from raftlm.stage.replay import kept_rows
    from raftlm.stage.rollouts import Rollout, Rollouts

    prompt = PromptRecord(7, "q", "q", [1, 2], {})
    trajectory = Rollout("call", [5, 6, 9, 2], "eos", loss_mask=[1, 1, 0, 1])
    rollouts = Rollouts([prompt], [[Rollout("x", [4, 2], "eos"), trajectory]],
                        np.array([[0.0, 1.0]]))
    config = RaftConfig.from_dict({"data": {"task": "arithmetic"}})
    assert kept_rows(rollouts, rank(rollouts, config, 1)) == [
        {"prompt_id": 7, "sample": 1, "weight": 1.0, "prompt_ids": [1, 2],
         "response_ids": [5, 6, 9, 2], "loss_mask": [1, 1, 0, 1]}]


def test_a_stage_plans_its_replayed_and_anchor_examples_for_the_schedule():
    config = RaftConfig.from_dict({"data": {"task": "arithmetic", "anchor": {
        "path": "a.jsonl", "share": 0.25}}, "raft": {"prompts_per_stage": 8, "replay": {}}})
    assert [planned_examples(config, t) for t in (1, 2, 3)] == [8 + 2, 16 + 2, 24 + 2]
    capped = RaftConfig.from_dict({"data": {"task": "arithmetic"}, "raft": {
        "prompts_per_stage": 8, "replay": {"share": 0.5, "window": 1}}})
    assert [planned_examples(capped, t) for t in (1, 2, 5)] == [8, 12, 12]


# Schedules -----------------------------------------------------------------------------------


def test_a_list_schedule_gives_one_value_per_stage_and_repeats_its_last():
    assert [stage_value([1.0, 0.8], t, 5) for t in range(6)] == [1.0, 1.0, 0.8, 0.8, 0.8, 0.8]
    assert stage_value(0.7, 3, 5) == 0.7 and stage_value(None, 3, 5) is None


@pytest.mark.parametrize("stages", [1, 2, 4, 8])
def test_a_ramp_is_numpy_linspace_over_the_stages(stages):
    ramp = Ramp(start=1.0, end=0.7)
    reference = np.linspace(1.0, 0.7, stages)
    assert [stage_value(ramp, t, stages) for t in range(1, stages + 1)] == reference.tolist()
    assert stage_value(ramp, stages + 3, stages) == reference[-1]  # resumed with more stages


def test_schedules_load_from_yaml_and_the_command_line():
    config = RaftConfig.from_dict({"data": {"task": "arithmetic"}, "raft": {"stages": 3},
                                   "generation": {"temperature": {"start": 1.0, "end": 0.6}}},
                                  ["selection.min_reward=[0.5, 1]"])
    assert [config.at_stage(t).generation.temperature for t in (0, 1, 2, 3)] == [
        1.0, 1.0, 0.8, 0.6]
    assert [config.at_stage(t).selection.min_reward for t in (1, 2, 3)] == [0.5, 1.0, 1.0]
    assert RaftConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()


def test_a_scalar_config_is_the_same_at_every_stage():
    config = RaftConfig.from_dict({"data": {"task": "arithmetic"}})
    assert config.at_stage(4) == config


@pytest.mark.parametrize("temperature", ["[1.0, 0]", "[]", "{start: 1.0, end: -0.5}"])
def test_a_schedule_with_a_temperature_not_above_zero_is_refused(temperature):
    with pytest.raises(ConfigError, match="generation.temperature"):
        RaftConfig.from_dict({"data": {"task": "arithmetic"}},
                             [f"generation.temperature={temperature}"])


# What is refused -----------------------------------------------------------------------------


@pytest.mark.parametrize("replay", [None, {"window": 2}, {"share": 0.5}])
def test_restart_without_replay_of_every_stage_is_refused_in_one_line(replay):
    raw = {"data": {"task": "arithmetic"}, "training": {"start": "restart"}}
    if replay is not None:
        raw["raft"] = {"replay": replay}
    with pytest.raises(ConfigError, match="training.start: restart .* window 0") as err:
        RaftConfig.from_dict(raw)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("objective", ["grpo", "reinforce_rej"])
@pytest.mark.parametrize("section", ["raft.replay={}", "data.anchor={path: a.jsonl}"])
def test_replay_and_anchor_are_refused_with_group_objectives(objective, section):
    config = RaftConfig.from_dict({"data": {"task": "arithmetic"}},
                                  [section, f"training.objective={objective}"])
    with pytest.raises(ConfigError, match=f"{section.split('=')[0]}: expected null"):
        check_stage_settings(config)


@pytest.mark.parametrize("objective", ["sft", "reward_weighted", "raft++"])
def test_replay_and_anchor_go_with_the_raft_objectives(objective):
    check_stage_settings(RaftConfig.from_dict(
        {"data": {"task": "arithmetic"}},
        ["raft.replay={}", "data.anchor={path: a.jsonl}", f"training.objective={objective}",
         "training.weight_transform=minmax"]))


# Anchor data ---------------------------------------------------------------------------------


def write_anchor(folder, rows) -> str:
    path = folder / "anchor.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_anchor_rows_are_rendered_as_training_prompts_and_end_with_eos(tmp_path):
    tok = tiny_tokenizer()
    path = write_anchor(tmp_path, [{"prompt": "Say 3 digits", "response": "123"}])
    config = RaftConfig.from_dict({"data": {"task": "arithmetic", "system_prompt": "Be brief.",
                                            "anchor": {"path": path}}})
    [anchor] = load_anchor(config, tok)
    [prompt] = build_prompt_set([{"prompt": "Say 3 digits"}], tok, prompt_field="prompt",
                                max_prompt_tokens=512, system_prompt="Be brief.",
                                source="x").records
    assert anchor.prompt.token_ids == prompt.token_ids
    assert anchor.response_ids == tok("123", add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id]


def test_an_anchor_row_without_its_response_is_named(tmp_path):
    path = write_anchor(tmp_path, [{"prompt": "a", "response": "b"}, {"prompt": "c"}])
    config = RaftConfig.from_dict({"data": {"task": "arithmetic", "anchor": {"path": path}}})
    with pytest.raises(DataError, match="row 2: field 'response'"):
        load_anchor(config, tiny_tokenizer())


def test_the_anchor_draw_depends_on_seed_and_stage_alone():
    assert anchor_draw(50, 5, 0, 3) == anchor_draw(50, 5, 0, 3)
    assert anchor_draw(50, 5, 0, 3) != anchor_draw(50, 5, 0, 4)
    assert sorted(anchor_draw(4, 10, 0, 1)) == [0, 1, 2, 3]


def test_an_anchor_path_in_a_config_file_is_read_from_the_file_s_folder(tmp_path):
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "config.yaml").write_text(
        "data: {task: arithmetic, anchor: {path: rows/anchor.jsonl}}\n")
    (tmp_path / "task" / "rows").mkdir()
    (tmp_path / "task" / "rows" / "anchor.jsonl").write_text("")
    config = RaftConfig.from_yaml(tmp_path / "task" / "config.yaml")
    assert config.data.anchor.path == str(tmp_path / "task" / "rows" / "anchor.jsonl")


def test_raftlm_finetune_refuses_replay_and_anchor_in_one_line(tmp_path):
    from raftlm.jobs.steps import finetune_stage
    from raftlm.jobs.workdir import WorkMismatch

    for section in ("raft.replay={}", "data.anchor={path: a.jsonl}"):
        config = RaftConfig.from_dict({"data": {"task": "arithmetic"}}, [section])
        with pytest.raises(WorkMismatch, match="use it for them") as err:
            finetune_stage(config, tmp_path / "work", tmp_path / "out")
        assert "\n" not in str(err.value)


# Runs ----------------------------------------------------------------------------------------


@pytest.fixture
def workspace(tmp_path, tiny_model_dir):
    write_digits_task(tmp_path, REWARD_FILE)
    write_anchor(tmp_path, [{"prompt": f"Say {i} digits", "response": "7" * i}
                            for i in range(1, 9)])
    return tmp_path


def building_config(workspace, model_dir, stages=3, **training) -> RaftConfig:
    """Replay of every stage, anchor rows, a temperature ramp and a min_reward list."""
    return make_config(
        workspace, model_dir, raft={"stages": stages, "replay": {}},
        data={"train_file": str(workspace / "train.jsonl"),
              "eval_file": str(workspace / "eval.jsonl"),
              "anchor": {"path": str(workspace / "anchor.jsonl"), "share": 0.5}},
        generation={"max_new_tokens": 6, "batch_size": 8,
                    "temperature": {"start": 1.0, "end": 0.5}},
        selection={"min_reward": [0.0, 0.1]},
        training={"learning_rate": 1e-2, "micro_batch_size": 2, **training},
        tracking={"report": False})


def trained_examples(monkeypatch) -> dict[int, list]:
    """stage -> the examples PolicyTrainer.train got, (prompt ids, response ids, weight)."""
    seen, original = {}, PolicyTrainer.train

    def record(self, examples, stage):
        seen[stage] = [(e.prompt_ids, e.response_ids, e.weight) for e in examples]
        return original(self, examples, stage)

    monkeypatch.setattr(PolicyTrainer, "train", record)
    return seen


def test_a_stage_trains_on_its_own_then_earlier_kept_token_ids_then_anchor_rows(
        workspace, tiny_model_dir, monkeypatch):
    seen, tok = trained_examples(monkeypatch), tiny_tokenizer()
    result = train(building_config(workspace, tiny_model_dir))
    stage_dir = result.run_dir / "stages"
    kept = {s: [json.loads(line) for line in (stage_dir / f"{s:03d}" / KEPT_FILE).open()]
            for s in (1, 2, 3)}
    for s in (1, 2, 3):
        m = result.metrics[s]
        own, replayed = kept[s], m["train/n_replayed"]
        assert len(seen[s]) == len(own) + replayed + m["train/n_anchor"]
        assert m["train/n_anchor"] == int(len(own) * 0.5 + 0.5)
        assert seen[s][:len(own)] == [(r["prompt_ids"], r["response_ids"], r["weight"])
                                     for r in own]
        earlier = {(r["prompt_id"], tuple(r["response_ids"])) for t in range(1, s)
                   for r in kept[t]} - {(r["prompt_id"], tuple(r["response_ids"])) for r in own}
        assert replayed == len(earlier)
        anchor = seen[s][len(own) + replayed:]
        assert all(response[-1] == tok.eos_token_id for _, response, _ in anchor)
    # the kept rows are the sampled token ids: decoding them gives the selected responses
    selected = {(c["prompt_id"], c["sample"]): c["response"] for c in map(
        json.loads, (stage_dir / "001/candidates.jsonl").open()) if c["selected"]}
    assert {(r["prompt_id"], r["sample"]) for r in kept[1]} == set(selected)
    for r in kept[1]:
        assert tok.decode(r["response_ids"], skip_special_tokens=True) == selected[
            (r["prompt_id"], r["sample"])]


def test_restart_trains_every_stage_from_the_initial_weights_with_a_fresh_optimizer(
        workspace, tiny_model_dir, monkeypatch):
    at_start, original = [], PolicyTrainer.train

    def record(self, examples, stage):
        model = self.accelerator.unwrap_model(self.model)
        at_start.append(({n: p.detach().clone() for n, p in model.named_parameters()
                          if p.requires_grad}, len(self.optimizer.state)))
        return original(self, examples, stage)

    monkeypatch.setattr(PolicyTrainer, "train", record)
    result = train(building_config(workspace, tiny_model_dir, stages=2, start="restart",
                                   lr_scheduler="linear"))
    first = at_start[0][0]
    assert len(at_start) == 2
    for weights, optimizer_entries in at_start:
        assert optimizer_entries == 0
        assert all(torch.equal(weights[n], first[n]) for n in first)
    assert result.metrics[1]["train/lr"] == result.metrics[2]["train/lr"] == 0.0  # per stage
    assert result.metrics[2]["train/optimizer_steps"] > result.metrics[1]["train/optimizer_steps"]


def test_each_stage_reads_the_schedules_at_its_own_values(workspace, tiny_model_dir,
                                                          monkeypatch):
    import raftlm.stage.collect
    import raftlm.stage.loop

    sampled, ranked, tuned, evaluated = [], [], [], []
    generate, rank = raftlm.stage.collect.generate, raftlm.stage.loop.rank
    fine_tune, evaluate = raftlm.stage.loop.fine_tune, raftlm.stage.loop.evaluate
    monkeypatch.setattr(raftlm.stage.collect, "generate", lambda *a, **k: (
        sampled.append(a[4].temperature), generate(*a, **k))[1])
    monkeypatch.setattr(raftlm.stage.loop, "rank", lambda r, config, s: (
        ranked.append(config.selection.min_reward), rank(r, config, s))[1])
    monkeypatch.setattr(raftlm.stage.loop, "fine_tune", lambda *a: (
        fine_tune(*a), tuned.append((a[-1], a[0].temperature)))[0])
    monkeypatch.setattr(raftlm.stage.loop, "evaluate", lambda *a, **k: (
        evaluated.append(a[4].generation.temperature), evaluate(*a, **k))[1])
    result = train(building_config(workspace, tiny_model_dir, objective="raft++"))
    assert sampled == [1.0, 0.75, 0.5]
    assert ranked == [0.0, 0.1, 0.1]
    assert tuned == [(t, t) for t in (1.0, 0.75, 0.5)]  # raft++ trains at the sampling T
    assert evaluated == [1.0, 1.0, 0.75, 0.5]  # stage 0 (the baseline) at stage 1's
    # raftlm sample | chat | export | serve: a checkpoint at its stage's values
    from raftlm.tools.target import load_target

    assert load_target(result.run_dir, 2).config.generation.temperature == 0.75
    assert load_target(result.run_dir).config.generation.temperature == 0.5
    assert load_target(result.run_dir).config.selection.min_reward == 0.1


def test_a_run_killed_in_training_resumes_to_the_same_replay_anchor_and_weights(
        workspace, tiny_model_dir, monkeypatch):
    """Restarting from the initial adapter (rebuilt on resume), replaying kept.jsonl rows and
    the anchor draw, a ramp and a list schedule, and raft++'s recomputed pi_old for both."""
    start = "restart"
    config = building_config(workspace, tiny_model_dir, start=start, objective="raft++")
    expected = snapshot(train(config).run_dir)
    original = PolicyTrainer.train

    def killed_in_stage_3(self, examples, stage):
        if stage == 3:
            raise Killed
        return original(self, examples, stage)

    config = building_config(workspace, tiny_model_dir, start=start, objective="raft++")
    config.run.overwrite = True
    monkeypatch.setattr(PolicyTrainer, "train", killed_in_stage_3)
    with pytest.raises(Killed):
        train(config)
    monkeypatch.setattr(PolicyTrainer, "train", original)
    resumed = train(building_config(workspace, tiny_model_dir, start=start,
                                    objective="raft++"), resume=True)
    assert_same_run(snapshot(resumed.run_dir), expected)


def test_two_processes_replay_mix_anchor_rows_and_restart_like_one(workspace, tiny_model_dir):
    from test_distributed import _candidates, accelerate_launch

    config = building_config(workspace, tiny_model_dir, stages=2, start="restart")
    one = train(config)
    raw = config.to_dict()
    raw["run"]["output_dir"] = str(workspace / "two")
    (workspace / "two.yaml").write_text(RaftConfig.from_dict(raw).to_yaml())
    accelerate_launch(workspace, "--config", str(workspace / "two.yaml"))
    two = workspace / "two"
    for stage in (1, 2):
        assert _candidates(two, stage) == _candidates(one.run_dir, stage)
        kept = f"stages/{stage:03d}/{KEPT_FILE}"
        assert (two / kept).read_bytes() == (one.run_dir / kept).read_bytes()
    metrics = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    for key in ("train/n_replayed", "train/n_anchor", "tokens/trained",
                "train/optimizer_steps"):
        assert metrics[2][key] == one.metrics[2][key], key
    for key in ("train/loss", "train/sft_loss"):
        assert metrics[2][key] == pytest.approx(one.metrics[2][key], rel=1e-4), key


def test_the_jobs_take_their_stage_s_schedule_values_as_raftlm_train_does(workspace,
                                                                          tiny_model_dir):
    from raftlm.cli import main as cli_main

    config = make_config(workspace, tiny_model_dir,
                         generation={"max_new_tokens": 6, "batch_size": 8,
                                     "temperature": [1.0, 0.6]},
                         selection={"min_reward": [0.0, 0.2]}, tracking={"report": False})
    path = workspace / "config.yaml"
    path.write_text(config.to_yaml())
    run = train(config).run_dir
    jobs = workspace / "jobs"
    for stage in (1, 2):
        work, start = str(workspace / f"work{stage}"), [] if stage == 1 else ["--from", str(jobs)]
        assert cli_main(["generate", "--config", str(path), "--out", work, *start]) == 0
        assert cli_main(["score", work, "--config", str(path)]) == 0
        assert cli_main(["finetune", "--config", str(path), "--data", work, "--out", str(jobs),
                         *start]) == 0
        name = f"stages/{stage:03d}/candidates.jsonl"
        assert (jobs / name).read_text() == (run / name).read_text()


@pytest.mark.parametrize("collector", [
    {"collector": "dynamic", "dynamic": {"max_rounds": 3}},
    {"collector": "gvm", "gvm": {"first_samples": 2, "max_samples": 6}}])
def test_replay_works_with_the_collectors_that_sample_in_rounds(workspace, tiny_model_dir,
                                                                collector):
    config = make_config(workspace, tiny_model_dir, raft={"replay": {}, **collector},
                         selection={"min_reward": 0.15}, tracking={"report": False})
    result = train(config)
    kept = [json.loads(line) for line in (result.run_dir / "stages/001" / KEPT_FILE).open()]
    assert len(kept) == result.metrics[1]["train/n_selected"]
    assert 0 < result.metrics[2]["train/n_replayed"] <= len(kept)
