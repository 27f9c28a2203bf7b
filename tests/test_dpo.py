"""Iterative DPO / RPO (issue 32.4): the pairs a stage's reward table gives, TRL's sigmoid loss
and rewards/* metrics (against TRL's own formula and the NumPy reference), the reference
policy, the loss mask, the settings refused at load, and whole runs (collectors, resume, two
processes)."""

import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from test_distributed import accelerate_launch
from test_objective_training import lora_model
from test_objectives import run_config
from tiny import save_tiny_model, tiny_causal_lm, write_digits_task

from raftlm import RaftConfig, train
from raftlm.config import ConfigError, TrainingConfig
from raftlm.config.sections import DpoConfig
from raftlm.core import objectives as ref
from raftlm.stage import rank
from raftlm.stage.rank import Selection
from raftlm.stage.rollouts import Rollout, Rollouts
from raftlm.training import losses
from raftlm.training.batches import (
    IGNORE,
    PairExample,
    collate,
    response_log_probs,
    sequences,
    token_nll,
)
from raftlm.training.objectives import check_objective_config
from raftlm.training.pairs import pair_loss, set_reference_log_probs
from raftlm.training.trainer import PolicyTrainer

CPU = torch.device("cpu")
NAN = float("nan")


def pairs_of(rewards, rule="best_worst", max_pairs=1):
    return ref.preference_pairs(np.array(rewards, dtype=float), rule, max_pairs).tolist()


# Pairs from the reward table -----------------------------------------------------------------

def test_best_worst_pairs_each_prompts_best_with_its_worst_and_skips_ties():
    rewards = [[0.0, 1.0, 0.5], [1.0, 1.0, 1.0], [0.0, NAN, 0.0], [NAN, 2.0, -1.0], [1.0, NAN, NAN]]
    assert pairs_of(rewards) == [[0, 1, 0], [3, 1, 2]]


def test_all_pairs_takes_each_correct_against_each_incorrect_up_to_the_cap():
    assert pairs_of([[1.0, 0.0, 1.0, 0.0]], "all_pairs", 10) == [
        [0, 0, 1], [0, 0, 3], [0, 2, 1], [0, 2, 3]]
    assert pairs_of([[1.0, 0.0, 1.0, 0.0]], "all_pairs", 2) == [[0, 0, 1], [0, 0, 3]]
    # graded rewards: the largest gap first
    assert pairs_of([[0.9, 0.5, 0.0]], "all_pairs", 2) == [[0, 0, 2], [0, 1, 2]]


def test_rank_pairs_eligible_distinct_responses_and_counts_them():
    texts = [["a", "b", "a", "c"], ["d", "e"]]
    prompts = [type("P", (), {"id": f"p{i}", "token_ids": [5, i]})() for i in range(2)]
    responses = [[Rollout(t, [10 + j, 2], "eos") for j, t in enumerate(row)]
                 for row in texts]
    rewards = np.array([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, NAN, NAN]])
    eligible = np.array([[True, False, True, True], [True, True, False, False]])  # not "b"
    examples, stats = rank.training_examples(
        Rollouts(prompts, responses, rewards), rewards,
        Selection(np.zeros_like(eligible), eligible), TrainingConfig(objective="dpo"), 1)
    assert [(e.prompt_ids, e.response_ids, e.rejected_ids) for e in examples] == [
        ([5, 0], [10, 2], [13, 2])]
    assert stats["train/n_pairs"] == stats["train/n_examples"] == 1
    all_pairs = TrainingConfig(objective="dpo", dpo=DpoConfig(pairs="all_pairs"))
    examples, _ = rank.training_examples(Rollouts(prompts, responses, rewards), rewards,
                                         Selection(np.zeros_like(eligible), eligible),
                                         all_pairs, 1)
    assert len(examples) == 1  # the repeat of "a" gives no second pair


def test_a_prompt_is_useful_to_dpo_when_it_gives_a_pair():
    """What the dynamic collector asks: a pair after the filters and without repeats (a prompt
    whose only different answer is a repeat of another, or filtered out, gives none)."""
    texts = [["xx", "yy", "zz"], ["xx", "xx", "yy"], ["xx", "yy", "zz"], ["xx", "y", "zz"]]
    prompts = [type("P", (), {"id": f"p{i}", "token_ids": [5, i]})() for i in range(4)]
    responses = [[Rollout(t, [10] * len(t), "eos") for t in row] for row in texts]  # 1 per char
    rewards = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    config = RaftConfig.from_dict({"data": {"task": "arithmetic"}}, [
        "training.objective=dpo", "selection.min_response_tokens=2"])  # "y" is too short
    assert rank.useful_prompts(Rollouts(prompts, responses, rewards), config).tolist() == [
        True, False, False, True]


# The loss, as TRL computes it ----------------------------------------------------------------

def trl_sigmoid_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """TRL 1.x DPOTrainer._compute_loss, loss_type sigmoid and its rewards/* metrics, verbatim
    on summed log-probs (f_divergence_type reverse_kl)."""
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    delta_score = chosen_logratios - rejected_logratios
    loss = (-F.logsigmoid(beta * delta_score)).mean()
    chosen_rewards = beta * chosen_logratios
    rejected_rewards = beta * rejected_logratios
    return loss, {"rewards/chosen": chosen_rewards.mean(),
                  "rewards/rejected": rejected_rewards.mean(),
                  "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
                  "rewards/margins": (chosen_rewards - rejected_rewards).mean()}


@pytest.fixture
def pair_tokens():
    """Log-probs of 3 pairs on a [6, 5] grid (rows chosen, rejected, ...), with masks."""
    rng = np.random.default_rng(0)
    log_probs = -rng.uniform(0.1, 3.0, (6, 5))
    mask = np.zeros((6, 5))
    for row, length in enumerate([5, 2, 3, 4, 1, 5]):
        mask[row, :length] = 1
    refs = (log_probs * mask).sum(axis=1) + rng.normal(0, 1.0, 6)
    return log_probs, mask, refs


def test_dpo_loss_and_its_metrics_are_trls_and_the_numpy_references(pair_tokens):
    log_probs, mask, refs = pair_tokens
    summed = torch.tensor((log_probs * mask).sum(axis=1))
    ref_t = torch.tensor(refs)
    beta = 0.3
    trl_loss, trl_metrics = trl_sigmoid_loss(summed[0::2], summed[1::2], ref_t[0::2],
                                             ref_t[1::2], beta)
    losses_, chosen, rejected = losses.dpo_loss(summed[0::2], summed[1::2], ref_t[0::2],
                                                ref_t[1::2], beta)
    numpy = ref.dpo_loss(log_probs[0::2], mask[0::2], log_probs[1::2], mask[1::2], refs[0::2],
                         refs[1::2], beta)
    assert float(losses_.mean()) == pytest.approx(float(trl_loss), rel=1e-12)
    assert numpy["loss"] == pytest.approx(float(trl_loss), rel=1e-12)
    for ours, theirs in [("rewards_chosen", "rewards/chosen"),
                         ("rewards_rejected", "rewards/rejected"),
                         ("rewards_margin", "rewards/margins"),
                         ("rewards_accuracy", "rewards/accuracies")]:
        assert numpy[ours] == pytest.approx(float(trl_metrics[theirs]), rel=1e-12), ours
    assert float(chosen.mean()) == pytest.approx(numpy["rewards_chosen"], rel=1e-12)
    assert float(rejected.mean()) == pytest.approx(numpy["rewards_rejected"], rel=1e-12)


def test_rpo_adds_alpha_times_trls_sft_loss_on_the_chosen_tokens(pair_tokens):
    """RPO is TRL's loss_type [sigmoid, sft] with loss_weights [1, alpha] (rpo_alpha before
    TRL 1.0): the chosen tokens' mean NLL. A step that divides by its chosen tokens gets it
    from `pair_loss` with per_pair = chosen tokens / pairs."""
    log_probs, mask, refs = pair_tokens
    pairs = [PairExample([1], [2], [3], ref_chosen=refs[2 * i], ref_rejected=refs[2 * i + 1])
             for i in range(3)]
    chosen_tokens = mask[0::2].sum()
    loss, stats = pair_loss(torch.tensor(log_probs), torch.tensor(mask), pairs, 0.3, 0.5,
                            chosen_tokens / 3)
    trl_loss, _ = trl_sigmoid_loss(*(torch.tensor(a) for a in (
        (log_probs * mask).sum(axis=1)[0::2], (log_probs * mask).sum(axis=1)[1::2],
        refs[0::2], refs[1::2])), 0.3)
    trl_sft = -torch.tensor(log_probs[0::2])[torch.tensor(mask[0::2]).bool()].mean()
    assert float(loss) / chosen_tokens == pytest.approx(float(trl_loss + 0.5 * trl_sft), rel=1e-12)
    numpy = ref.dpo_loss(log_probs[0::2], mask[0::2], log_probs[1::2], mask[1::2], refs[0::2],
                         refs[1::2], 0.3, rpo_alpha=0.5)
    assert float(loss) / chosen_tokens == pytest.approx(numpy["loss"], rel=1e-12)
    assert stats["pairs"] == 3


# In the trainer ------------------------------------------------------------------------------

PAIRS = [([5, 6], [8, 9, 10], [8, 11]), ([7], [11, 12], [13]), ([5], [9], [12, 10, 9])]


def pair_examples():
    return [PairExample(p, c, r) for p, c, r in PAIRS]


def trainer_for(model, steps=10, **training):
    config = TrainingConfig(**{"learning_rate": 1e-2, "micro_batch_size": 8, **training})
    return PolicyTrainer(model, config, steps, Accelerator(cpu=True), pad_id=2, seed=0)


@pytest.mark.parametrize("objective", ["dpo", "rpo"])
def test_the_stage_start_reference_gives_log_2_and_zero_rewards_before_the_first_update(
        objective):
    model = tiny_causal_lm(seed=3)
    rows = response_log_probs(model, sequences(pair_examples()), 2, 8, CPU)
    chosen = np.concatenate(rows[0::2])
    stats = trainer_for(model, objective=objective).train(pair_examples(), stage=1)
    nll = -chosen.mean() if objective == "rpo" else 0.0  # rpo: rpo_alpha 1.0
    assert stats["train/loss"] == pytest.approx(np.log(2) + nll, rel=1e-5)
    assert stats["train/rewards_chosen"] == pytest.approx(0.0, abs=1e-5)
    assert stats["train/rewards_margin"] == pytest.approx(0.0, abs=1e-5)
    assert stats["train/rewards_accuracy"] <= 1 / 3  # 0 unless rounding puts one ahead


def test_one_step_over_micro_batches_is_trls_loss_on_the_whole_batch():
    """Three pairs, one per micro-batch, one optimizer step: the same weights as TRL's loss
    (mean over pairs + rpo_alpha x the chosen tokens' mean NLL) on the whole batch."""
    model, by_hand = lora_model(seed=2), lora_model(seed=2)
    trainer = trainer_for(model, objective="rpo", micro_batch_size=1,
                          gradient_accumulation_steps=3,
                          dpo=DpoConfig(beta=0.5, reference="initial", rpo_alpha=0.7))
    stats = trainer.train(pair_examples(), stage=1)

    order = pair_examples()
    random.Random("0:1:0").shuffle(order)
    with by_hand.disable_adapter():
        refs = [float(lp.sum()) for lp in response_log_probs(by_hand, sequences(order), 2, 8, CPU)]
    by_hand.train()
    optimizer = torch.optim.AdamW([p for p in by_hand.parameters() if p.requires_grad], lr=1e-2,
                                  weight_decay=0.0)
    batch = collate(sequences(order), pad_id=2)
    log_probs = -token_nll(by_hand, batch)
    mask = (batch["labels"][:, 1:] != IGNORE).float()
    summed = (log_probs * mask).sum(dim=1)
    ref_t = torch.tensor(refs)
    loss, _ = trl_sigmoid_loss(summed[0::2], summed[1::2], ref_t[0::2], ref_t[1::2], 0.5)
    loss = loss + 0.7 * -log_probs[0::2][mask[0::2].bool()].mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(by_hand.parameters(), 1.0)
    optimizer.step()
    assert stats["train/loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    # AdamW's first step moves each weight by about lr = 1e-2 (g / |g|): 1e-5 is 0.1% of it
    for mine, theirs in zip(model.parameters(), by_hand.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)


def test_the_initial_reference_is_the_lora_base_with_its_adapter_off():
    model = lora_model(seed=1)
    initial, start = pair_examples(), pair_examples()
    set_reference_log_probs(model, initial, 2, CPU, TrainingConfig(
        objective="dpo", dpo=DpoConfig(reference="initial")))
    set_reference_log_probs(model, start, 2, CPU, TrainingConfig(objective="dpo"))
    expected = [float(lp.sum()) for lp in response_log_probs(  # the model before LoRA
        tiny_causal_lm(seed=1), sequences(pair_examples()), 2, 8, CPU)]
    assert [v for p in initial for v in (p.ref_chosen, p.ref_rejected)] == pytest.approx(
        expected, rel=1e-6)
    assert start[0].ref_chosen != pytest.approx(initial[0].ref_chosen, rel=1e-3)


def test_tokens_the_loss_mask_marks_0_are_in_no_summed_log_prob():
    model = tiny_causal_lm(seed=5)
    masked = [PairExample([5, 6], [8, 9, 10], [8, 11], loss_mask=[1, 0, 1],
                          rejected_loss_mask=[0, 1])]
    set_reference_log_probs(model, masked, 2, CPU, TrainingConfig(objective="dpo"))
    full = response_log_probs(model, sequences(pair_examples()[:1]), 2, 8, CPU)
    assert masked[0].ref_chosen == pytest.approx(float(full[0][0] + full[0][2]), rel=1e-6)
    assert masked[0].ref_rejected == pytest.approx(float(full[1][1]), rel=1e-6)


# Settings refused at load --------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["training.objective=dpo", "selection.strategy=top_fraction"],
     "selection.strategy: expected best_per_prompt"),
    (["training.objective=dpo", "training.kl_coef=0.1"], "training.kl_coef: expected 0 with"),
    (["training.objective=rpo", "training.dpo.reference=initial", "model.lora.enabled=false"],
     "training.dpo.reference: expected stage_start without LoRA"),
    (["training.objective=dpo", "training.loss=nll"], "training.loss: expected a paired loss"),
    (["training.objective=sft", "training.loss=dpo"], "training.weighting: expected pairs"),
    (["training.objective=dpo", "training.dpo.beta=0"], "training.dpo.beta: expected > 0"),
    (["training.objective=dpo", "training.loss_aggregation=seq_mean_token_mean"],
     "training.loss_aggregation: expected token_mean"),
    (["training.objective=dpo", "training.mask_truncated=true"],
     "training.mask_truncated: expected false"),
    (["training.objective=dpo", "raft.samples_per_prompt=1"],
     "raft.samples_per_prompt: expected >= 2"),
])
def test_settings_that_make_no_sense_with_dpo_are_refused_in_one_line(overrides, message):
    config = RaftConfig.from_dict({"data": {"task": "arithmetic"}}, overrides)
    with pytest.raises(ConfigError, match=message) as err:
        check_objective_config(config)
    assert "\n" not in str(err.value)


# Whole runs ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    save_tiny_model(root / "model")
    write_digits_task(root)
    return root


def dpo_config(root, name, objective="dpo", stages=2, collector="fixed", **training):
    raw = run_config(root, objective, name, stages, **training)
    raw["selection"] = {}
    raw["raft"]["collector"] = collector
    raw["raft"]["gvm"] = {"first_samples": 2, "max_samples": 4, "accept_reward": 0.1}
    # sampled metrics at every evaluated stage: a 1-stage run extended to 2 stages then
    # evaluates its stage 1 as the 2-stage run does (by default only the last stage samples)
    raw.setdefault("evaluation", {})["sampled_every"] = 1
    return raw


def without_times(metrics):
    return [{k: v for k, v in m.items() if not k.startswith("time/")} for m in metrics]


@pytest.mark.parametrize("objective, collector", [
    ("dpo", "fixed"), ("rpo", "dynamic"), ("dpo", "gvm")])
def test_dpo_trains_with_every_collector_and_resumes_exactly(workspace, objective, collector):
    whole = train(RaftConfig.from_dict(dpo_config(workspace, f"{collector}-whole", objective,
                                                  collector=collector)))
    first = dpo_config(workspace, f"{collector}-resumed", objective, stages=1,
                       collector=collector)
    train(RaftConfig.from_dict(first))
    resumed = train(RaftConfig.from_dict(first, ["raft.stages=2"]), resume=True)
    assert without_times(resumed.metrics) == without_times(whole.metrics)
    last = whole.metrics[2]
    assert last["train/n_pairs"] == last["train/n_examples"] > 0
    assert 0 <= last["train/rewards_accuracy"] <= 1
    assert last["train/rewards_margin"] == pytest.approx(
        last["train/rewards_chosen"] - last["train/rewards_rejected"])


class Killed(BaseException):
    """Stands in for a SIGKILL in-process: nothing catches it."""


def test_a_run_killed_while_dpo_trains_resumes_to_the_same_run(workspace, monkeypatch):
    """The reference is recomputed from the stage's starting checkpoint: the same numbers."""
    whole = train(RaftConfig.from_dict(dpo_config(workspace, "kill-whole", "rpo")))
    original = PolicyTrainer.train

    def killed_in_stage_2(self, examples, stage):
        if stage == 2:
            original(self, examples[:1], stage)  # one step taken, then the kill
            raise Killed
        return original(self, examples, stage)

    monkeypatch.setattr(PolicyTrainer, "train", killed_in_stage_2)
    config = RaftConfig.from_dict(dpo_config(workspace, "kill-resumed", "rpo"))
    with pytest.raises(Killed):
        train(config)
    monkeypatch.setattr(PolicyTrainer, "train", original)
    resumed = train(config, resume=True)
    assert without_times(resumed.metrics) == without_times(whole.metrics)


def test_two_processes_train_dpo_like_one(workspace):
    settings = {"dpo": {"pairs": "all_pairs", "rpo_alpha": 0.5}}
    one = train(RaftConfig.from_dict(dpo_config(workspace, "one", **settings)))
    config_path = workspace / "two.yaml"
    config_path.write_text(RaftConfig.from_dict(dpo_config(workspace, "two", **settings))
                           .to_yaml())
    accelerate_launch(workspace, "--config", str(config_path))
    two = [json.loads(line) for line in (workspace / "two/metrics.jsonl").open()]
    for key in ("train/loss", "train/rewards_chosen", "train/rewards_rejected",
                "train/rewards_margin", "train/rewards_accuracy", "train/grad_norm"):
        assert two[2][key] == pytest.approx(one.metrics[2][key], rel=1e-4, abs=1e-6), key
    for key in ("train/n_pairs", "train/optimizer_steps"):
        assert two[2][key] == one.metrics[2][key], key
