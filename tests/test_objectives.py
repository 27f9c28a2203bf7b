"""Training objectives: each torch loss matches its NumPy reference, the Rank step hands the
right responses and weights to training, sft is unchanged, bad settings fail at load."""

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from test_distributed import accelerate_launch
from tiny import save_tiny_model, tiny_causal_lm, write_digits_task

from raftlm import RaftConfig, train
from raftlm.config import ConfigError, TrainingConfig, field_choices
from raftlm.core import objectives as ref
from raftlm.stage import rank
from raftlm.stage.rank import Selection
from raftlm.stage.rollouts import Rollout, Rollouts
from raftlm.training import losses, objectives
from raftlm.training.batches import IGNORE, Example, collate, token_nll
from raftlm.training.objectives import (
    LOSSES,
    OBJECTIVES,
    WEIGHTINGS,
    check_objective_config,
    objective_of,
)
from raftlm.training.trainer import PolicyTrainer


@pytest.fixture
def tokens():
    """Random log-probs of 3 responses of different lengths on a [3, 6] token grid."""
    rng = np.random.default_rng(0)
    log_probs = -rng.uniform(0.1, 3.0, (3, 6))
    old = log_probs + rng.normal(0, 0.4, (3, 6))  # ratios well inside and outside the clip
    mask = np.zeros((3, 6))
    for row, length in enumerate([6, 2, 4]):
        mask[row, :length] = 1
    return log_probs, old, mask


def t(array):
    return torch.tensor(np.asarray(array), dtype=torch.float64)


def pooled(per_token, mask):
    return float(per_token.sum() / t(mask).sum())


def test_weighted_nll_matches_its_numpy_reference(tokens):
    log_probs, _, mask = tokens
    weights = np.array([1.0, 0.25, 0.5])
    torch_loss = pooled(losses.weighted_nll(t(log_probs), t(weights), t(mask)), mask)
    assert torch_loss == pytest.approx(ref.weighted_nll(log_probs, weights, mask), rel=1e-12)


@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_clipped_ratio_loss_and_its_statistics_match_the_numpy_reference(tokens, dual_clip):
    log_probs, old, mask = tokens
    advantages = np.array([1.0, -0.8, -2.0])
    loss, ratio, clipped = losses.clipped_ratio_loss(
        t(log_probs), t(old), t(advantages), t(mask), clip_eps=0.2, dual_clip=dual_clip)
    expected = ref.clipped_ratio_loss(log_probs, old, advantages, mask, 0.2, dual_clip)
    real = t(mask).bool()
    assert pooled(loss, mask) == pytest.approx(expected["loss"], rel=1e-12)
    assert float(clipped[real].double().mean()) == pytest.approx(expected["clip_fraction"])
    assert float(ratio[real].mean()) == pytest.approx(expected["ratio_mean"], rel=1e-12)
    assert float(ratio[real].max()) == pytest.approx(expected["ratio_max"], rel=1e-12)
    assert 0 < expected["clip_fraction"] < 1  # the fixture exercises both branches


def test_dual_clip_bounds_the_loss_of_a_negative_advantage():
    # rho = e^3 ~ 20 on a response with A = -1: PPO's loss 20, dual clip caps it at c * |A| = 3.
    out = ref.clipped_ratio_loss(np.array([[0.0]]), np.array([[-3.0]]), np.array([-1.0]),
                                 np.ones((1, 1)), 0.2, dual_clip=3.0)
    assert out["loss"] == pytest.approx(3.0)


def test_clipped_ratio_loss_is_minus_the_advantage_when_pi_equals_pi_old(tokens):
    log_probs, _, mask = tokens
    out = ref.clipped_ratio_loss(log_probs, log_probs, np.array([1.0, 1.0, 1.0]), mask, 0.2)
    assert out == {"loss": -1.0, "clip_fraction": 0.0, "ratio_mean": 1.0, "ratio_max": 1.0}


def test_k3_kl_matches_its_numpy_reference_and_is_zero_at_the_reference(tokens):
    log_probs, old, mask = tokens
    assert pooled(losses.k3_kl(t(log_probs), t(old), t(mask)), mask) == pytest.approx(
        ref.k3_kl(log_probs, old, mask), rel=1e-12)
    assert ref.k3_kl(log_probs, old, mask) > 0
    assert ref.k3_kl(log_probs, log_probs, mask) == 0


def test_group_advantages_center_or_standardise_and_drop_uniform_groups():
    rewards = np.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.5, np.nan, 0.0, 1.0]])
    centred, keep = ref.group_advantages(rewards, scale="none")
    np.testing.assert_allclose(centred[0], [0.5, -0.5, -0.5, 0.5])
    np.testing.assert_allclose(centred[2], [0.0, np.nan, -0.5, 0.5])
    assert keep.tolist() == [True, False, True]
    population, _ = ref.group_advantages(rewards, scale="group", ddof=0)
    np.testing.assert_allclose(population[0], [1, -1, -1, 1], atol=1e-5)


def test_grpo_std_is_the_unbiased_one_by_default_as_trl_and_verl():
    rewards = np.array([[1.0, 0.0, 0.0, 1.0]])
    unbiased, _ = ref.group_advantages(rewards, scale="group")  # ddof=1: std = sqrt(1/3)
    np.testing.assert_allclose(unbiased[0], np.array([1, -1, -1, 1]) * 0.5 / np.sqrt(1 / 3),
                               rtol=1e-5)
    assert TrainingConfig().group_std_ddof == 1
    torch_std = torch.tensor(rewards[0]).std()  # TRL/verl: torch.std, unbiased
    assert float(torch_std) == pytest.approx(np.sqrt(1 / 3))


def test_batch_scale_divides_by_the_std_of_all_valid_rewards():
    rewards = np.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0], [3.0, np.nan, 3.0, 3.0]])
    scaled, keep = ref.group_advantages(rewards, scale="batch")
    centred, _ = ref.group_advantages(rewards, scale="none")
    std = np.std(rewards[~np.isnan(rewards)], ddof=1)
    np.testing.assert_allclose(scaled, centred / (std + ref.GROUP_STD_EPS))
    assert keep.tolist() == [True, True, False]


def test_weight_transforms_are_per_prompt():
    rewards = np.array([[2.0, 4.0, 3.0], [-1.0, -1.0, 5.0]])
    np.testing.assert_allclose(ref.transform_weights(rewards, "none"), rewards)
    np.testing.assert_allclose(ref.transform_weights(rewards, "minmax"),
                               [[0, 1, 0.5], [0, 0, 1]])
    np.testing.assert_allclose(ref.transform_weights(rewards, "rank"),
                               [[0, 1, 0.5], [0, 0, 1]])


def test_rank_weights_give_zero_to_all_equal_groups_and_to_the_worst_answer():
    # Before: 0.5 for a prompt whose rewards are all equal, 1/3 for each wrong 0/1 answer.
    rewards = np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 1.0], [0.0, np.nan, np.nan]])
    np.testing.assert_allclose(ref.transform_weights(rewards, "rank"),
                               [[0, 0, 0], [0, 0, 1], [0, np.nan, np.nan]])


# The Rank step's hand-over --------------------------------------------------------------------

def stage_table(rewards, log_probs=None):
    prompts = [SimpleNamespace(id=f"p{i}", token_ids=[5, i]) for i in range(len(rewards))]
    responses = [[Rollout(f"r{p}{j}", [10 + j, 2], "eos", log_probs)
                  for j in range(len(row))] for p, row in enumerate(rewards)]
    return prompts, responses, np.array(rewards, dtype=float)


def training_examples(prompts, responses, rewards, selection, config, stage):
    return rank.training_examples(Rollouts(prompts, responses, rewards), rewards, selection,
                                  config, stage)


def chosen(mask, eligible=None):
    """A Selection keeping `mask`, every candidate eligible unless said otherwise."""
    mask = np.asarray(mask, dtype=bool)
    return Selection(mask, np.ones_like(mask) if eligible is None else np.asarray(eligible))


def test_raft_plus_plus_trains_the_selected_responses_with_advantage_one():
    prompts, responses, rewards = stage_table([[0.0, 1.0], [1.0, 0.0]])
    mask = np.array([[False, True], [False, False]])
    examples, stats = training_examples(
        prompts, responses, rewards, chosen(mask), TrainingConfig(objective="raft++"), 1)
    assert [(e.prompt_ids, e.response_ids, e.weight) for e in examples] == [([5, 0], [11, 2], 1.0)]
    assert stats["train/groups_dropped"] == 0


def test_grpo_trains_all_k_of_groups_with_a_reward_spread():
    prompts, responses, rewards = stage_table([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    none = np.zeros_like(rewards, dtype=bool)
    examples, stats = training_examples(
        prompts, responses, rewards, chosen(none), TrainingConfig(objective="grpo"), 1)
    assert [e.prompt_ids for e in examples] == [[5, 0]] * 4
    unbiased = 0.5 / np.sqrt(1 / 3)  # (r - mean) / std with ddof=1
    np.testing.assert_allclose([e.weight for e in examples], np.array([-1, 1, 1, -1]) * unbiased,
                               atol=1e-5)
    assert stats["train/groups_dropped"] == 1


@pytest.mark.parametrize("objective", ["grpo", "reinforce_rej"])
def test_group_objectives_leave_out_candidates_that_failed_the_response_filters(objective):
    """A truncated (or too short, or rejected) response is neither trained on nor part of its
    group's mean and std; before, every valid reward counted."""
    prompts, responses, rewards = stage_table([[1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    eligible = np.array([[True, True, True, False], [True, False, False, False]])
    examples, stats = training_examples(
        prompts, responses, rewards, chosen(np.zeros((2, 4)), eligible),
        TrainingConfig(objective=objective), 1)
    assert [(e.prompt_ids, e.response_ids[0] - 10) for e in examples] == [
        ([5, 0], 0), ([5, 0], 1), ([5, 0], 2)]
    weights = np.array([e.weight for e in examples])
    centred = np.array([1, -2, 1]) / 3  # mean of the three eligible rewards: 2/3
    expected = centred / np.std([1, 0, 1], ddof=1) if objective == "grpo" else centred
    np.testing.assert_allclose(weights, expected, rtol=1e-5)
    assert stats["train/groups_dropped"] == 1  # prompt 1: one eligible response left


def test_reward_weighted_refuses_a_negative_weight_naming_stage_and_prompt():
    prompts, responses, rewards = stage_table([[0.5, 1.0], [-0.5, 0.2]])
    mask = np.ones_like(rewards, dtype=bool)
    config = TrainingConfig(objective="reward_weighted")
    with pytest.raises(ValueError, match="stage 3, prompt p1: reward -0.5 .*weight_transform"):
        training_examples(prompts, responses, rewards, chosen(mask), config, 3)
    config.weight_transform = "minmax"
    examples, _ = training_examples(prompts, responses, rewards, chosen(mask),
                                               config, 3)
    assert [e.weight for e in examples] == [1.0, 1.0]  # weight-0 responses are left out


def test_recorded_log_probs_reach_the_examples_and_give_the_entropy():
    prompts, responses, rewards = stage_table([[0.0, 1.0]], log_probs=[-0.5, -1.5])
    mask = np.array([[False, True]])
    examples, stats = training_examples(
        prompts, responses, rewards, chosen(mask), TrainingConfig(objective="raft++"), 1)
    assert examples[0].old_log_probs == [-0.5, -1.5]
    assert stats["train/entropy"] == pytest.approx(1.0)


def test_entropy_is_absent_when_the_sampler_recorded_no_log_probs():
    prompts, responses, rewards = stage_table([[0.0, 1.0]])
    _, stats = training_examples(
        prompts, responses, rewards, chosen(np.array([[False, True]])), TrainingConfig(), 1)
    assert stats["train/entropy"] is None


# The trainer ----------------------------------------------------------------------------------

EXAMPLES = [Example([5, 6], [8, 9, 10]), Example([7], [11, 12]), Example([5], [9])]


def test_sft_objective_takes_exactly_the_step_raftlm_always_took():
    """The pre-objectives step, written out: the stage's seeded shuffle, token-pooled NLL,
    clipping, AdamW; the weights must come out bit for bit the same."""
    model = tiny_causal_lm(seed=4)
    trainer = PolicyTrainer(model, TrainingConfig(learning_rate=1e-2, micro_batch_size=4), 10,
                         Accelerator(cpu=True), pad_id=2, seed=0)
    stats = trainer.train(EXAMPLES, stage=1)

    by_hand = tiny_causal_lm(seed=4).train()
    optimizer = torch.optim.AdamW(by_hand.parameters(), lr=1e-2, weight_decay=0.0)
    order = list(EXAMPLES)
    random.Random("0:1:0").shuffle(order)  # seed 0, stage 1, epoch 0
    nll = token_nll(by_hand, collate(order, pad_id=2))
    (nll.sum() * (1 / 6)).backward()
    torch.nn.utils.clip_grad_norm_(by_hand.parameters(), 1.0)
    optimizer.step()
    assert stats["train/loss"] == pytest.approx(float(nll.detach().sum()) / 6, rel=1e-6)
    for mine, theirs in zip(model.parameters(), by_hand.parameters()):
        assert torch.equal(mine, theirs)


def test_reward_weighted_with_unit_weights_is_the_sft_loss():
    model = tiny_causal_lm(seed=1)
    batch = collate(EXAMPLES, pad_id=2)
    nll = token_nll(model, batch)
    mask = (batch["labels"][:, 1:] != IGNORE).float()
    tensors = objectives.token_tensors(EXAMPLES, nll.shape[1])
    config = TrainingConfig(objective="reward_weighted")
    loss, stats = objectives.token_loss(config, -nll, {**tensors, "mask": mask})
    assert float(loss.detach().sum()) == pytest.approx(float(nll.detach().sum()), rel=1e-6)
    assert stats == {"tokens": 6.0}


def test_token_loss_returns_its_ratio_and_kl_statistics_as_sums():
    log_probs = torch.tensor([[-1.0, -2.0, 0.0]])
    batch = {"mask": torch.tensor([[1.0, 1.0, 0.0]]), "weights": torch.tensor([1.0]),
             "old_log_probs": torch.tensor([[-1.0, -1.0, 0.0]]),
             "ref_log_probs": torch.tensor([[-1.0, -2.0, 0.0]])}
    config = TrainingConfig(objective="raft++", kl_coef=0.1)
    _, stats = objectives.token_loss(config, log_probs, batch)
    assert stats == pytest.approx({"tokens": 2.0, "kl": 0.0, "clipped": 0.0,
                                   "ratio_sum": 1 + np.exp(-1), "ratio_max": 1.0})


def preset(name):
    return objective_of(TrainingConfig(objective=name))


def test_config_objective_choices_are_the_registrys_keys():
    assert set(field_choices(TrainingConfig, "objective")) == set(OBJECTIVES)
    assert set(field_choices(TrainingConfig, "weighting")) == set(WEIGHTINGS)
    assert set(field_choices(TrainingConfig, "loss")) == set(LOSSES)
    assert {n for n in OBJECTIVES if preset(n).loss.uses_ratio} == {"raft++", "reinforce_rej",
                                                                    "grpo"}
    assert {n for n in OBJECTIVES if preset(n).weighting.group} == {"reinforce_rej", "grpo"}
    assert {n for n in OBJECTIVES if preset(n).loss.paired} == {"dpo", "rpo"}


def test_a_weighting_and_a_loss_combine_independently_of_the_preset():
    """verl picks the advantage estimator and the policy loss apart: group-normalised
    advantages with the plain weighted NLL is a row, not a new objective."""
    mixed = objective_of(TrainingConfig(objective="sft", weighting="group_normalised",
                                        loss="weighted_nll"))
    assert mixed == objectives.Objective(WEIGHTINGS["group_normalised"], LOSSES["weighted_nll"])
    assert objective_of(TrainingConfig(objective="grpo", loss="nll")).weighting.group


def test_an_import_path_names_a_weighting_of_ones_own(tmp_path):
    own = tmp_path / "mine.py"
    own.write_text("import numpy as np\nfrom raftlm.training.objectives import Weighting\n"
                   "HALF = Weighting(lambda r, c: (np.where(np.isnan(r), np.nan, 0.5), "
                   "np.ones(len(r), bool)))\nNOT_ONE = 3\n")
    config = TrainingConfig(weighting=f"{own}:HALF")
    prompts, responses, rewards = stage_table([[0.0, 1.0]])
    examples, _ = training_examples(prompts, responses, rewards,
                                    chosen(np.array([[False, True]])), config, 1)
    assert [e.weight for e in examples] == [0.5]
    with pytest.raises(ConfigError, match="training.weighting .*expected a Weighting record"):
        objective_of(TrainingConfig(weighting=f"{own}:NOT_ONE"))
    with pytest.raises(ConfigError, match="training.weighting: expected one of unit"):
        objective_of(TrainingConfig(weighting="units"))


# Config ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("setting, message", [
    ("training.objective=ppo", "training.objective: expected sft, reward_weighted"),
    ("training.clip_eps=0", "training.clip_eps: expected > 0"),
    ("training.kl_coef=-0.1", "training.kl_coef: expected >= 0"),
    ("training.dual_clip=0.5", "training.dual_clip: expected > 1"),
    ("training.weight_transform=softmax", "training.weight_transform"),
])
def test_bad_objective_settings_fail_at_load_naming_the_field(setting, message):
    with pytest.raises(ConfigError, match=message):
        RaftConfig.from_dict({"data": {"task": "arithmetic"}}, [setting])


@pytest.mark.parametrize("objective", ["grpo", "reinforce_rej"])
def test_group_objectives_refuse_one_sample_per_prompt(objective):
    config = RaftConfig.from_dict({"data": {"task": "arithmetic"}},
                                  [f"training.objective={objective}", "raft.samples_per_prompt=1"])
    with pytest.raises(ConfigError, match=f"raft.samples_per_prompt: expected >= 2 .*{objective}"):
        check_objective_config(config)
    config.training.objective = "raft++"
    check_objective_config(config)


def test_kl_penalty_without_lora_is_refused():
    with pytest.raises(ConfigError, match="training.kl_coef: expected 0 without LoRA"):
        RaftConfig.from_dict({"data": {"task": "arithmetic"}},
                             ["training.kl_coef=0.1", "model.lora.enabled=false"])


def test_sft_is_the_default_objective():
    assert RaftConfig.from_dict({"data": {"task": "arithmetic"}}).training.objective == "sft"


# End to end through raftlm.train --------------------------------------------------------------



@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("objectives")
    save_tiny_model(root / "model")
    write_digits_task(root)
    return root


def run_config(root, objective, name, stages, **training) -> dict:
    return {
        "run": {"output_dir": str(root / name), "seed": 1},
        "model": {"path": str(root / "model"), "dtype": "fp32", "lora": {"r": 4, "alpha": 8}},
        "data": {"train_file": str(root / "train.jsonl"), "eval_file": str(root / "eval.jsonl")},
        "raft": {"stages": stages, "prompts_per_stage": 5, "samples_per_prompt": 3},
        "generation": {"max_new_tokens": 6, "batch_size": 8},
        "reward": {"terms": [f"{root / 'rewards.py'}:digits"]},
        "selection": {"strategy": "top_fraction", "top_fraction": 0.34},
        "training": {"learning_rate": 1e-2, "micro_batch_size": 2, "epochs": 2,
                     "gradient_accumulation_steps": 2, "objective": objective, **training},
        "evaluation": {"sampled": True, "samples_per_prompt": 1},
        "tracking": {"report": False},
    }


@pytest.mark.parametrize("objective", [n for n in OBJECTIVES if not LOSSES[OBJECTIVES[n][1]]
                                       .paired])  # dpo, rpo: tests/test_dpo.py
def test_every_objective_trains_and_resumes_end_to_end(workspace, objective):
    raw = run_config(workspace, objective, objective, stages=1, kl_coef=0.05)
    train(RaftConfig.from_dict(raw))
    result = train(RaftConfig.from_dict(raw, ["raft.stages=2"]), resume=True)
    assert [m["stage"] for m in result.metrics] == [0, 1, 2]
    last = result.metrics[2]
    assert last["train/optimizer_steps"] > result.metrics[1]["train/optimizer_steps"]
    assert last["train/kl_penalty"] >= 0 and "eval/kl_to_initial" in last
    assert ("train/clip_fraction" in last) == preset(objective).loss.uses_ratio
    assert last["train/n_examples"] == (15 - 3 * last["train/groups_dropped"]
                                        if preset(objective).weighting.group
                                        else last["train/n_selected"])


def test_two_processes_train_grpo_with_kl_and_dual_clip_like_one(workspace):
    settings = {"kl_coef": 0.05, "dual_clip": 3.0}
    one = train(RaftConfig.from_dict(run_config(workspace, "grpo", "one", 2, **settings)))
    config_path = workspace / "two.yaml"
    raw = run_config(workspace, "grpo", "two", 1, **settings)
    config_path.write_text(RaftConfig.from_dict(raw).to_yaml())
    accelerate_launch(workspace, "--config", str(config_path))
    accelerate_launch(workspace, "--config", str(config_path), "--resume",
                      str(workspace / "two"), "--set", "raft.stages=2")
    two = [json.loads(line) for line in (workspace / "two/metrics.jsonl").open()]
    for key in ("train/loss", "train/clip_fraction", "train/ratio_mean", "train/ratio_max",
                "train/kl_penalty", "train/grad_norm"):
        assert two[2][key] == pytest.approx(one.metrics[2][key], rel=1e-4, abs=1e-6), key
    for key in ("train/n_examples", "train/groups_dropped", "train/optimizer_steps"):
        assert two[2][key] == one.metrics[2][key], key


def test_larger_task_asks_for_the_larger_of_two_distinct_numbers_with_disjoint_splits():
    from raftlm.data.tasks import builtin_task_rows

    train_rows = builtin_task_rows("larger", "train", 300, seed=0)
    eval_rows = builtin_task_rows("larger", "eval", 300, seed=0)
    assert not {r["prompt"] for r in train_rows} & {r["prompt"] for r in eval_rows}
    row = eval_rows[0]
    a, b = (int(x) for x in row["prompt"].rstrip("?").split("larger, ")[1].split(" or "))
    assert a != b and row["answer"] == str(max(a, b))


def test_multiplication_task_asks_for_two_digit_products_with_disjoint_splits():
    from raftlm.data.tasks import builtin_task_rows

    train_rows = builtin_task_rows("multiplication", "train", 500, seed=1)
    eval_rows = builtin_task_rows("multiplication", "eval", 100, seed=1)
    assert not {r["prompt"] for r in train_rows} & {r["prompt"] for r in eval_rows}
    for row in train_rows[:50]:
        a, b = (int(x) for x in row["prompt"].removeprefix("What is ").rstrip("?").split(" * "))
        assert 10 <= a <= 99 and 10 <= b <= 99 and row["answer"] == str(a * b)


# Where the round's features meet (issue 31) ----------------------------------------------------

def test_prompts_a_collector_set_aside_are_in_no_batch_statistic():
    """31.3: dynamic + advantage_scale batch: DAPO computes advantages after its filter, so
    the prompts the extra rounds set aside must not widen the batch std."""
    rewards = [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]
    prompts, responses, table = stage_table(rewards)
    config = TrainingConfig(objective="grpo", advantage_scale="batch")
    rollouts = Rollouts(prompts, responses, table, set_aside=np.array([False, False, True, True]))
    examples, _ = rank.training_examples(rollouts, table, chosen(np.zeros((4, 2))), config, 1)
    kept, _ = training_examples(prompts[:2], responses[:2], table[:2], chosen(np.zeros((2, 2))),
                                config, 1)
    np.testing.assert_allclose([e.weight for e in examples], [e.weight for e in kept])
    with_all, _ = training_examples(prompts, responses, table, chosen(np.zeros((4, 2))),
                                    config, 1)
    # the bug: the set-aside prompts' zeros shrink the batch std and inflate every advantage
    assert abs(with_all[0].weight) > abs(examples[0].weight)


def test_mask_truncated_keeps_a_cut_response_in_the_group_statistics_but_not_in_the_loss():
    """31.4: TRL's mask_truncated_completions: the truncated response still counts in its
    group's mean and std; drop_truncated (selection) removes it from both."""
    prompts, responses, table = stage_table([[1.0, 0.0, 0.0, 1.0]])
    responses[0][3].finish_reason = "length"
    config = TrainingConfig(objective="grpo", mask_truncated=True)
    examples, stats = training_examples(prompts, responses, table, chosen(np.zeros((1, 4))),
                                        config, 1)
    full, _ = training_examples(prompts, responses, table, chosen(np.zeros((1, 4))),
                                TrainingConfig(objective="grpo"), 1)
    assert [e.weight for e in examples] == [e.weight for e in full[:3]]  # same advantages
    assert len(examples) == 3 and stats["train/masked_truncated"] == 1


def test_reward_weighted_on_raw_rewards_with_the_overlong_penalty_is_refused_at_load():
    """31.9: the penalty can make a shaped reward negative; reward_weighted with
    weight_transform none would stop mid-run on a reward the user never sees."""
    settings = ["training.objective=reward_weighted", "training.overlong_buffer=2"]
    config = RaftConfig.from_dict({"data": {"task": "arithmetic"}}, settings)
    with pytest.raises(ConfigError, match="training.weight_transform: expected minmax or rank"):
        check_objective_config(config)
    config.training.weight_transform = "minmax"
    check_objective_config(config)
