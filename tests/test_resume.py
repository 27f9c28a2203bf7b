"""Resume: exact continuation (between and inside stages), safe checkpoint files, one writer."""

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_loop import REWARD_FILE, make_config
from tiny import assert_same_run, differences, tiny_causal_lm, write_digits_task

from raftlm import RaftConfig, train
from raftlm.cli import main as cli_main
from raftlm.models.loading import merged_adapter
from raftlm.run import journal as journal_module
from raftlm.run.checkpoint import join_tensors, read_trainer_state, split_tensors
from raftlm.run.journal import JournalMismatch, StageJournal, read_lines
from raftlm.run.lock import RunInUseError, run_lock
from raftlm.run.rundir import RunDir


class Killed(BaseException):
    """Stands in for a SIGKILL in-process: nothing catches it, nothing after it runs."""


@pytest.fixture
def workspace(tmp_path, tiny_model_dir):
    write_digits_task(tmp_path, REWARD_FILE)
    return tmp_path


def config_for(workspace, model_dir, stages=3):
    # sampled evaluation at every evaluated stage: a run stopped after stage 2 and extended
    # evaluates stage 2 as the longer run does (by default only the last stage samples)
    return make_config(workspace, model_dir, raft={"stages": stages},
                       evaluation={"sampled_every": 1}, tracking={"report": False})


def snapshot(run_dir) -> dict:
    """Everything a run produced that must not depend on interruptions (times aside)."""
    metrics = [{k: v for k, v in m.items() if not k.startswith("time/")}
               for m in RunDir(run_dir).read_metrics()]
    files = {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
             if p.is_file() and p.name not in ("metrics.jsonl", ".lock")}
    return {"metrics": metrics, "files": files}


def uninterrupted(workspace, model_dir, stages=3) -> dict:
    result = train(config_for(workspace, model_dir, stages))
    reference = snapshot(result.run_dir)
    RunDir.create(result.run_dir, overwrite=True)
    return reference


def test_a_snapshot_difference_is_named_by_file_line_and_metric():
    ours = {"metrics": [{"loss": 1.0}], "files": {"a.jsonl": b'{"x": 1}\n{"x": 2}\n', "b": b"ab"}}
    theirs = {"metrics": [{"loss": 1.5}], "files": {"a.jsonl": b'{"x": 1}\n{"x": 3}\n'}}
    assert differences(ours, ours) == []
    assert differences(ours, theirs) == [
        "metrics of stage 0: loss 1.0 != 1.5",
        """a.jsonl line 2: b'{"x": 2}' != b'{"x": 3}'""",
        "b differs (2 vs 8 bytes)"]


# Exactness ---------------------------------------------------------------------------------------

def test_merge_and_unmerge_leave_the_base_weights_bit_identical():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_causal_lm(), LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM",
                                                        target_modules=["q_proj", "v_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)  # a trained adapter: B is no longer zero
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with merged_adapter(model):
        pass
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == []


def test_resume_after_a_completed_stage_ends_bit_identical(workspace, tiny_model_dir):
    reference = uninterrupted(workspace, tiny_model_dir)
    train(config_for(workspace, tiny_model_dir, stages=2))
    resumed = train(config_for(workspace, tiny_model_dir), resume=True)
    assert_same_run(snapshot(resumed.run_dir), reference)


def test_resume_inside_sampling_reuses_finished_samples_and_ends_identical(
        workspace, tiny_model_dir, monkeypatch):
    reference = uninterrupted(workspace, tiny_model_dir)
    calls = {"n": 0}
    original = StageJournal.add_sample

    def die_at_the_20th_sample(self, *args):
        calls["n"] += 1
        if calls["n"] == 20:  # stage 2 (12 samples per stage), 8 of its samples written
            raise Killed
        original(self, *args)

    monkeypatch.setattr(StageJournal, "add_sample", die_at_the_20th_sample)
    with pytest.raises(Killed):
        train(config_for(workspace, tiny_model_dir))
    monkeypatch.setattr(StageJournal, "add_sample", original)
    sampled = []
    monkeypatch.setattr(StageJournal, "add_sample",
                        lambda self, *args: (sampled.append(args[:2]), original(self, *args)))
    resumed = train(config_for(workspace, tiny_model_dir), resume=True)
    assert len(sampled) == (12 - 7) + 12  # stage 2's missing samples, then stage 3's
    assert_same_run(snapshot(resumed.run_dir), reference)


def killed_in_stage_one_training(workspace, model_dir, monkeypatch) -> None:
    """A one-stage run killed while stage 1 trains (sampled and scored, not checkpointed);
    training works again afterwards."""
    from raftlm.training.trainer import PolicyTrainer

    original_train = PolicyTrainer.train
    monkeypatch.setattr(PolicyTrainer, "train", lambda self, examples, stage: (
        (_ for _ in ()).throw(Killed) if stage == 1 else original_train(self, examples, stage)))
    with pytest.raises(Killed):
        train(config_for(workspace, model_dir, stages=1))
    monkeypatch.setattr(PolicyTrainer, "train", original_train)


def test_resume_after_scoring_does_not_score_again(workspace, tiny_model_dir, monkeypatch):
    killed_in_stage_one_training(workspace, tiny_model_dir, monkeypatch)
    import raftlm.stage.collect

    monkeypatch.setattr(raftlm.stage.collect, "score", lambda *args: pytest.fail("scored again"))
    resumed = train(config_for(workspace, tiny_model_dir, stages=1), resume=True)
    assert [m["stage"] for m in resumed.metrics] == [0, 1]


def test_no_journal_or_temporary_file_outlives_a_completed_run(workspace, tiny_model_dir):
    result = train(config_for(workspace, tiny_model_dir, stages=1))
    leftovers = [p.name for p in result.run_dir.rglob("*")
                 if p.name.startswith("journal") or (p.name.startswith(".") and p.name != ".lock")]
    assert leftovers == []


# Journal -----------------------------------------------------------------------------------------

def test_a_torn_last_journal_line_is_dropped_and_cut_off(tmp_path):
    path = tmp_path / "journal.rank0.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": 2}\n{"c": ')
    assert read_lines(path) == [{"a": 1}, {"b": 2}]
    assert path.read_bytes() == b'{"a": 1}\n{"b": 2}\n'


def test_a_journal_written_for_other_settings_is_discarded(tmp_path):
    first = StageJournal(tmp_path, 0, {"stage": 1, "prompt_ids": [3, 4]})
    first.add_sample(3, 0, {"text": "x"})
    first.close()
    again = StageJournal(tmp_path, 0, {"stage": 1, "prompt_ids": [3, 4]})
    assert again.samples == {(3, 0): {"text": "x"}}
    again.close()
    other = StageJournal(tmp_path, 0, {"stage": 1, "prompt_ids": [5, 6]})
    assert other.samples == {} and other.discarded == "settings changed"


def test_a_journal_scored_under_another_reward_config_is_refused(tmp_path):
    first = StageJournal(tmp_path, 0, {"stage": 1, "prompt_ids": [3], "scoring": "aaaa"})
    first.add_rewards(3, [1.0])
    first.close()
    with pytest.raises(JournalMismatch, match="another reward config"):
        StageJournal(tmp_path, 0, {"stage": 1, "prompt_ids": [3], "scoring": "bbbb"})
    assert StageJournal(tmp_path, 0, {"stage": 1, "prompt_ids": [3], "scoring": "aaaa"}
                        ).rewards == {3: {"rewards": [1.0], "terms": {}}}


def test_resume_refuses_a_changed_reward_inside_a_stage(workspace, tiny_model_dir, monkeypatch):
    from raftlm.training.trainer import PolicyTrainer

    monkeypatch.setattr(PolicyTrainer, "train", lambda self, examples, stage: (
        (_ for _ in ()).throw(Killed)))
    config = config_for(workspace, tiny_model_dir, stages=1)
    with pytest.raises(Killed):
        train(config)
    changed = RaftConfig.from_dict({**config.to_dict(), "reward": {"terms": [
        {"name": "numeric_answer", "weight": 2.0}]}})
    with pytest.raises(JournalMismatch, match="another reward config"):
        train(changed, resume=True)


def test_journal_appends_are_flushed_line_by_line(tmp_path):
    journal = StageJournal(tmp_path, 0, {"stage": 2})
    journal.add_rewards(7, [1.0, None], {"exact": [1.0, None]})
    assert read_lines(journal.path)[-1] == {"prompt_id": 7, "rewards": [1.0, None],
                                            "terms": {"exact": [1.0, None]}}
    journal.close()
    assert journal_module.FORMAT == read_lines(journal.path)[0]["journal"]


# Checkpoint files --------------------------------------------------------------------------------

def test_trainer_state_round_trips_through_safetensors_and_json(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    random.seed(5)
    state = {"optimizer": optimizer.state_dict(), "step": 1,
             "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                     "torch": torch.get_rng_state()}}
    tensors = {}
    data = json.loads(json.dumps(split_tensors(state, tensors)))
    back = join_tensors(data, tensors)
    random.setstate(back["rng"]["python"])
    assert random.random() == (random.seed(5), random.random())[1]
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"],
                       state["optimizer"]["state"][0]["exp_avg"])
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert np.array_equal(back["rng"]["numpy"][1], state["rng"]["numpy"][1])


def test_an_old_pickle_trainer_state_is_refused_not_unpickled(tmp_path):
    torch.save({"step": 1}, tmp_path / "trainer_state.pt")
    with pytest.raises(ValueError, match="old pickle format"):
        read_trainer_state(tmp_path)


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(workspace, tiny_model_dir,
                                                                    capsys):
    reference = uninterrupted(workspace, tiny_model_dir)
    run_dir = train(config_for(workspace, tiny_model_dir, stages=2)).run_dir
    adapter = run_dir / "checkpoints/stage-002/policy/adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-1] ^= 0xFF
    adapter.write_bytes(bytes(data))
    capsys.readouterr()
    resumed = train(config_for(workspace, tiny_model_dir), resume=True)
    warning = [line for line in capsys.readouterr().out.splitlines() if "damaged" in line]
    assert len(warning) == 1 and "stage-002" in warning[0]
    assert_same_run(snapshot(resumed.run_dir), reference)


@pytest.mark.parametrize("moment", ["before the delete", "inside the delete"])
def test_a_kill_while_old_checkpoints_are_deleted_is_made_good_by_the_resume(
        workspace, tiny_model_dir, monkeypatch, moment):
    # Found by tests/test_faults.py's random SIGKILLs: killed after the last checkpoint was
    # renamed into place, a run resumed with nothing left to do and kept stage-001.
    reference = uninterrupted(workspace, tiny_model_dir)
    original_remove, original_rmtree = RunDir.remove_old_checkpoints, shutil.rmtree

    def kill_before(self, keep):
        if self.checkpoints()[-1][0] == 3:
            raise Killed
        original_remove(self, keep)

    def kill_inside(path, *args, **kwargs):
        if Path(path).name == ".stage-001.deleted" and Path(path).is_dir():
            (Path(path) / "state.json").unlink()  # one file gone, the rest left behind
            raise Killed
        original_rmtree(path, *args, **kwargs)

    if moment == "before the delete":
        monkeypatch.setattr(RunDir, "remove_old_checkpoints", kill_before)
    else:
        monkeypatch.setattr(shutil, "rmtree", kill_inside)
    with pytest.raises(Killed):
        train(config_for(workspace, tiny_model_dir))
    monkeypatch.undo()
    assert any(p.name.endswith("stage-001") or p.name.startswith(".stage-001")
               for p in (workspace / "run/checkpoints").iterdir())
    resumed = train(config_for(workspace, tiny_model_dir), resume=True)
    assert_same_run(snapshot(resumed.run_dir), reference)


def test_checkpoint_weights_load_without_pickle(workspace, tiny_model_dir):
    run_dir = train(config_for(workspace, tiny_model_dir, stages=1)).run_dir
    state = read_trainer_state(run_dir / "checkpoints/stage-001")
    assert state["step"] >= 1 and state["rng"]["torch"].dtype == torch.uint8
    assert load_file(str(run_dir / "checkpoints/stage-001/trainer_state.safetensors"))


# One writer per run directory ---------------------------------------------------------------------

def test_a_locked_run_directory_refuses_a_second_writer(tmp_path):
    with run_lock(tmp_path / "run"):
        with pytest.raises(RunInUseError, match="in use"):
            with run_lock(tmp_path / "run"):
                pass
    with run_lock(tmp_path / "run"):  # released again
        pass


def test_the_lock_of_a_killed_process_is_released(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from raftlm.run.lock import run_lock\n"
         f"with run_lock({str(tmp_path / 'run')!r}):\n print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunInUseError):
        with run_lock(tmp_path / "run"):
            pass
    holder.kill()
    holder.wait()
    with run_lock(tmp_path / "run"):
        pass


def test_overwrite_of_a_running_run_is_refused_and_deletes_nothing(workspace, tiny_model_dir,
                                                                   capsys):
    config = config_for(workspace, tiny_model_dir, stages=1)
    train(config)
    (workspace / "config.yaml").write_text(config.to_yaml())
    before = snapshot(workspace / "run")
    with run_lock(workspace / "run"):  # the run "still running"
        code = cli_main(["train", "--config", str(workspace / "config.yaml"), "--overwrite"])
    assert code == 2 and "in use" in capsys.readouterr().err
    assert_same_run(snapshot(workspace / "run"), before)


def test_resume_of_a_run_killed_before_its_config_says_how_to_start_it(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run/.lock").write_text("")
    assert cli_main(["train", "--resume", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "nothing was started there" in err and "raftlm train --config" in err
    assert "config file not found" not in err


def test_checkpoints_list_lora_target_modules_sorted_whatever_the_hash_seed(workspace,
                                                                          tiny_model_dir):
    # peft writes a set in hash order; unsorted, two processes wrote different bytes.
    run_dir = train(config_for(workspace, tiny_model_dir, stages=1)).run_dir
    adapter = json.loads((run_dir / "checkpoints/stage-001/policy/adapter_config.json")
                         .read_text())
    assert adapter["target_modules"] == sorted(adapter["target_modules"])
    assert len(adapter["target_modules"]) == 7


@pytest.mark.parametrize("change", [{"data": {"system_prompt": "Be brief."}},
                                    {"model": {"dtype": "bf16"}}, {"run": {"seed": 2}}])
def test_a_resume_under_another_model_prompts_or_seed_is_refused_in_one_line(
        workspace, tiny_model_dir, change):
    """31.12: the journal and the checkpoints were made for the run's own prompts and model;
    resuming under others would silently reuse them."""
    from raftlm.config import ConfigError

    train(config_for(workspace, tiny_model_dir, stages=1))
    config = config_for(workspace, tiny_model_dir, stages=2)
    for section, values in change.items():
        for key, value in values.items():
            setattr(getattr(config, section), key, value)
    with pytest.raises(ConfigError, match=f"the run was started with other {next(iter(change))}"):
        train(config, resume=True)
    assert [m["stage"] for m in RunDir(workspace / "run").read_metrics()] == [0, 1]  # kept
    more = config_for(workspace, tiny_model_dir, stages=2)  # only raft.stages grew: fine
    assert [m["stage"] for m in train(more, resume=True).metrics] == [0, 1, 2]


def test_a_resume_before_the_first_checkpoint_keeps_the_baseline_evaluation(
        workspace, tiny_model_dir, monkeypatch):
    """33.7: an interruption inside stage 1 threw away the stage-0 evaluation (cheap here,
    minutes on a benchmark set); a resume under the same evaluation config keeps it."""
    import raftlm.stage.loop as loop

    original_eval = loop.evaluate
    killed_in_stage_one_training(workspace, tiny_model_dir, monkeypatch)
    baseline = RunDir(workspace / "run").read_metrics()
    assert [m["stage"] for m in baseline] == [0]
    evaluated = []
    monkeypatch.setattr(loop, "evaluate", lambda *args, **kwargs: (
        evaluated.append(1), original_eval(*args, **kwargs))[1])
    resumed = train(config_for(workspace, tiny_model_dir, stages=1), resume=True)
    assert len(evaluated) == 1 and resumed.metrics[0] == baseline[0]  # stage 1's only
    assert [m["stage"] for m in resumed.metrics] == [0, 1]


def test_a_resume_under_another_evaluation_config_evaluates_the_baseline_again(
        workspace, tiny_model_dir, monkeypatch):
    killed_in_stage_one_training(workspace, tiny_model_dir, monkeypatch)
    config = config_for(workspace, tiny_model_dir, stages=1)
    config.evaluation.samples_per_prompt = 2
    resumed = train(config, resume=True)
    assert [m["stage"] for m in resumed.metrics] == [0, 1]
    assert "eval/avg@2" in resumed.metrics[0]  # measured again, under the new settings
