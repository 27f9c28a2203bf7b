"""The ratio and KL objectives in the trainer (issue 17): the sampling temperature, dropout,
overflow and non-finite steps; and the knobs ported from TRL / verl (loss aggregation,
clip-higher, advantage scale, overlong penalty), each against its NumPy reference."""

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from test_objectives import chosen, stage_table, training_examples
from tiny import tiny_causal_lm, tiny_llama_config
from transformers import LlamaForCausalLM

import raftlm
from raftlm.config import GenerationConfig, RaftConfig, TrainingConfig
from raftlm.core import objectives as ref
from raftlm.stage.rank import shaped_rewards
from raftlm.stage.rollouts import Rollout, Rollouts
from raftlm.training import losses, objectives
from raftlm.training.batches import (
    IGNORE,
    Example,
    TrainingExample,
    collate,
    response_log_probs,
    token_nll,
)
from raftlm.training.trainer import NonFiniteLossError, PolicyTrainer

CPU = torch.device("cpu")
EXAMPLES = [Example([5, 6], [8, 9, 10]), Example([7], [11, 12]), Example([5], [9])]


def lora_model(seed=0, dropout=0.0):
    """A tiny Llama with a LoRA adapter whose B is random (not zero), so pi != pi_0."""
    model = tiny_causal_lm(seed=seed)
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False,
                        target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def with_old(model, examples, temperature, weight=1.0):
    """TrainingExamples whose pi_old is `model` at `temperature` (what a sampler records)."""
    old = response_log_probs(model, examples, 2, 8, CPU, temperature)
    return [TrainingExample(e.prompt_ids, e.response_ids, weight, lp.tolist())
            for e, lp in zip(examples, old)]


def trainer_for(model, generation=None, **training):
    config = TrainingConfig(**{"learning_rate": 1e-2, "micro_batch_size": 8, **training})
    return PolicyTrainer(model, config, 10, Accelerator(cpu=True), pad_id=2, seed=0,
                      generation=generation)


def parameters(model):
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


# pi_old, the clip, and seed 000 on a real model -----------------------------------------------

def test_ratio_objective_starts_at_ratio_one_from_a_forward_pass_of_pi_old():
    model = tiny_causal_lm(seed=2)
    examples = [TrainingExample(e.prompt_ids, e.response_ids, 1.0) for e in EXAMPLES]
    config = TrainingConfig(objective="raft++", learning_rate=1e-2, micro_batch_size=4)
    trainer = PolicyTrainer(model, config, 10, Accelerator(cpu=True), pad_id=2, seed=0)
    stats = trainer.train(examples, stage=1)
    assert stats["train/ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert stats["train/clip_fraction"] == 0.0
    assert all(len(e.old_log_probs) == len(e.response_ids) for e in examples)


def test_several_passes_move_the_ratio_and_clip_it():
    model = tiny_causal_lm(seed=2)
    examples = [TrainingExample(e.prompt_ids, e.response_ids, 1.0) for e in EXAMPLES]
    config = TrainingConfig(objective="raft++", learning_rate=5e-2, micro_batch_size=4,
                            epochs=6)
    stats = PolicyTrainer(model, config, 10, Accelerator(cpu=True), 2, 0).train(examples, 1)
    assert stats["train/ratio_max"] > 1.2
    assert stats["train/clip_fraction"] > 0


# Seed 000 on a real model ---------------------------------------------------------------------

def test_reward_weighted_moves_log_probs_like_the_bandit_reference():
    """One prompt, one-token responses: raft_iteration adds lr * reward to the logit of each
    kept token; a gradient step of the reward-weighted objective on a tiny Llama (uniform
    output at the start) changes the log-probs in the same direction and proportion."""
    vocab, k, lr, rng_seed = 16, 8, 1e-5, 0  # small steps: compare first-order moves
    zero_logits = np.zeros((1, vocab))
    reward = lambda prompt, token: float(token % 5) / 4  # noqa: E731
    out = raftlm.raft_iteration(zero_logits, ["p"], reward, n_candidates=k, top_fraction=0.5,
                                lr=lr, rng=np.random.default_rng(rng_seed))
    bandit = torch.log_softmax(torch.tensor(out["updated_logits"][0]), -1) + np.log(vocab)

    # The same draws and the same kept set, as training examples weighted by their reward.
    tokens = np.random.default_rng(rng_seed).choice(vocab, size=k, p=np.full(vocab, 1 / vocab))
    rewards = [reward("p", int(tok)) for tok in tokens]
    kept = np.argsort(rewards)[-k // 2:]
    examples = [TrainingExample([1, 3], [int(tokens[i])], rewards[i]) for i in kept]

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab, tie_word_embeddings=False)).double()
    torch.nn.init.zeros_(model.lm_head.weight)  # uniform policy, as the zero logits
    batch = collate(examples, pad_id=2)
    nll = token_nll(model, batch)
    mask = (batch["labels"][:, 1:] != IGNORE).double()
    weights = objectives.token_tensors(examples, nll.shape[1])["weights"].double()
    loss = losses.weighted_nll(-nll, weights, mask).sum() / mask.sum()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 1e-4 * p.grad
        moved = torch.log_softmax(model(torch.tensor([[1, 3]])).logits[0, -1], -1)
    moved = moved + np.log(vocab)
    ratio = moved[bandit.abs() > 1e-9] / bandit[bandit.abs() > 1e-9]
    assert float(ratio.min()) > 0  # same direction for every token
    assert float(ratio.std() / ratio.mean()) < 1e-3  # same proportion


# Temperature ----------------------------------------------------------------------------------

@pytest.mark.parametrize("full_logits", [False, True])
def test_token_nll_at_a_temperature_is_that_of_the_scaled_logits(full_logits, monkeypatch):
    model = tiny_causal_lm(seed=1)
    if full_logits:  # the path of models whose head is not a plain projection
        monkeypatch.setattr("raftlm.training.batches._plain_output_head", lambda m: None)
    prompt, response = [5, 6, 7], [8, 9, 10]
    nll = token_nll(model, collate([Example(prompt, response)], pad_id=2), temperature=0.5)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0]
    log_probs = torch.log_softmax(logits / 0.5, dim=-1)
    expected = -sum(log_probs[len(prompt) - 1 + i, tok] for i, tok in enumerate(response))
    assert float(nll.detach().sum()) == pytest.approx(float(expected), rel=1e-5)


def test_ratio_objective_trains_at_the_sampling_temperature():
    """pi_old recorded at T = 0.5 (the sampler's softmax(z / T)): at the first step rho = 1.
    Before, pi was taken at T = 1 and rho was far from 1 on every token."""
    model = tiny_causal_lm(seed=2)
    examples = with_old(model, EXAMPLES, temperature=0.5)
    trainer = trainer_for(model, GenerationConfig(temperature=0.5), objective="raft++")
    stats = trainer.train(examples, stage=1)
    assert stats["train/ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert stats["train/ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert stats["train/clip_fraction"] == 0.0


def test_ratio_objectives_fallback_pi_old_is_at_the_sampling_temperature():
    model = tiny_causal_lm(seed=2)
    examples = [TrainingExample(e.prompt_ids, e.response_ids) for e in EXAMPLES]
    trainer_for(model, GenerationConfig(temperature=0.5), objective="grpo",
                learning_rate=1e-9).train(examples, stage=1)
    at_t = response_log_probs(model, EXAMPLES, 2, 8, CPU, temperature=0.5)
    for example, expected in zip(examples, at_t):
        np.testing.assert_allclose(example.old_log_probs, expected, atol=1e-5)


def test_kl_term_compares_pi_and_pi_0_at_the_sampling_temperature():
    model = lora_model(seed=3)
    examples = with_old(model, EXAMPLES, temperature=0.5)
    batch = collate(EXAMPLES, pad_id=2)
    mask = (batch["labels"][:, 1:] != IGNORE).numpy()
    with torch.no_grad():
        pi = -token_nll(model, batch, temperature=0.5).numpy()
        with model.disable_adapter():
            pi_0 = -token_nll(model, batch, temperature=0.5).numpy()
    trainer = trainer_for(model, GenerationConfig(temperature=0.5), objective="raft++",
                          kl_coef=0.1)
    stats = trainer.train(examples, stage=1)  # one step: the penalty before any update
    assert stats["train/kl_penalty"] == pytest.approx(ref.k3_kl(pi, pi_0, mask), rel=1e-4)


def test_sft_keeps_the_plain_nll_whatever_the_sampling_temperature():
    losses_by_t = []
    for temperature in (1.0, 0.5):
        trainer = trainer_for(tiny_causal_lm(seed=4), GenerationConfig(temperature=temperature))
        losses_by_t.append(trainer.train(EXAMPLES, stage=1)["train/loss"])
    assert losses_by_t[0] == losses_by_t[1]


def test_top_p_with_a_ratio_objective_warns_once_at_construction(capsys):
    generation = GenerationConfig(temperature=0.7, top_p=0.9)
    trainer_for(tiny_causal_lm(), generation, objective="grpo")
    trainer_for(tiny_causal_lm(), generation, objective="sft")
    out = capsys.readouterr().out
    assert out.count("warning: training.objective=grpo with generation.top_p=0.9") == 1


# Dropout --------------------------------------------------------------------------------------

@pytest.mark.parametrize("objective, kl_coef", [("raft++", 0.0), ("sft", 0.1)])
def test_dropout_is_off_for_ratio_and_kl_objectives(objective, kl_coef):
    """LoRA dropout 0.5: pi in train mode equals pi_old (eval mode), rho = 1 at step 1."""
    model = lora_model(seed=5, dropout=0.5)
    examples = with_old(model, EXAMPLES, temperature=1.0)
    stats = trainer_for(model, objective=objective, kl_coef=kl_coef).train(examples, stage=1)
    dropouts = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and set(dropouts) == {0.0}
    if objective == "raft++":
        assert stats["train/ratio_mean"] == pytest.approx(1.0, abs=1e-5)
        assert stats["train/clip_fraction"] == 0.0


def test_sft_without_kl_keeps_the_configured_dropout():
    model = lora_model(seed=5, dropout=0.5)
    trainer_for(model)
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.5}


# Overflow and non-finite steps ----------------------------------------------------------------

def test_log_ratio_and_k3_are_clamped_as_verl_does():
    log_probs, old = np.array([[-0.1, -0.2]]), np.array([[-100.0, -0.2]])
    mask, adv = np.ones((1, 2)), np.array([-1.0])
    expected = ref.clipped_ratio_loss(log_probs, old, adv, mask, 0.2)
    loss, ratio, _ = losses.clipped_ratio_loss(torch.tensor(log_probs, dtype=torch.float32),
                                               torch.tensor(old, dtype=torch.float32),
                                               torch.tensor(adv, dtype=torch.float32),
                                               torch.tensor(mask, dtype=torch.float32), 0.2)
    assert torch.isfinite(loss).all() and float(ratio.max()) == pytest.approx(np.exp(20), rel=1e-5)
    assert float(loss.mean()) == pytest.approx(expected["loss"], rel=1e-5)
    k3 = losses.k3_kl(torch.tensor([[-100.0]]), torch.tensor([[0.0]]), torch.ones(1, 1))
    assert float(k3) == ref.k3_kl(np.array([[-100.0]]), np.array([[0.0]]), np.ones((1, 1))) == 10


def test_a_tiny_pi_old_with_a_negative_advantage_trains_without_nan():
    """Before the clamp: rho = exp(97) = inf in fp32, loss inf, NaN gradients, NaN weights."""
    model = tiny_causal_lm(seed=6)
    examples = [TrainingExample(e.prompt_ids, e.response_ids, -1.0, [-100.0] * len(e.response_ids))
                for e in EXAMPLES]
    stats = trainer_for(model, objective="grpo").train(examples, stage=1)
    assert np.isfinite(stats["train/loss"]) and torch.isfinite(parameters(model)).all()


def test_a_non_finite_loss_stops_the_step_naming_the_stage_and_leaves_the_weights():
    model = tiny_causal_lm(seed=7)
    examples = [TrainingExample(e.prompt_ids, e.response_ids, 1.0,
                                [float("nan")] * len(e.response_ids)) for e in EXAMPLES]
    trainer = trainer_for(model, objective="raft++")
    before = parameters(model)
    with pytest.raises(NonFiniteLossError, match=r"^stage 3: the training loss is not finite"):
        trainer.train(examples, stage=3)
    assert torch.equal(parameters(model), before) and trainer.step == 0
    assert all(p.grad is None for p in model.parameters())


# Knobs: loss aggregation, clip-higher, advantage scale, overlong penalty ----------------------

@pytest.mark.parametrize("mode", ref.LOSS_AGGREGATIONS)
def test_loss_aggregation_over_micro_batches_matches_the_numpy_reference(mode):
    rng = np.random.default_rng(1)
    per_token = rng.uniform(0, 2, (5, 7))
    mask = (np.arange(7)[None, :] < np.array([7, 2, 4, 1, 5])[:, None]).astype(float)
    per_token *= mask
    total = sum(float(losses.aggregate(torch.tensor(per_token[rows]), torch.tensor(mask[rows]),
                                       mode, norm_tokens=9))
                for rows in (slice(0, 2), slice(2, 5)))  # two micro-batches of one step
    denominator = losses.step_denominator(mode, tokens=int(mask.sum()), sequences=5)
    expected = ref.aggregate_loss(per_token, mask, mode, norm_tokens=9)
    assert total / denominator == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("mode", ["seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_trainer_reports_the_aggregated_loss_of_its_step(mode):
    model = tiny_causal_lm(seed=8)
    batch = collate(EXAMPLES, pad_id=2)
    with torch.no_grad():
        nll = token_nll(model, batch).numpy()
    mask = (batch["labels"][:, 1:] != IGNORE).numpy()
    trainer = trainer_for(model, GenerationConfig(max_new_tokens=6), loss_aggregation=mode)
    stats = trainer.train(EXAMPLES, stage=1)
    assert stats["train/loss"] == pytest.approx(ref.aggregate_loss(nll, mask, mode, 6), rel=1e-5)


def test_clip_higher_widens_only_the_upper_clip_and_matches_the_numpy_reference():
    rng = np.random.default_rng(0)
    log_probs = -rng.uniform(0.1, 3.0, (3, 6))
    old = log_probs + rng.normal(0, 0.4, (3, 6))
    old[0, 0] = log_probs[0, 0] - np.log(1.25)  # rho = 1.25 with A > 0: inside clip-higher
    mask, adv = np.ones((3, 6)), np.array([1.0, -0.5, 2.0])
    as_t = [torch.tensor(a, dtype=torch.float64) for a in (log_probs, old, adv, mask)]
    loss, _, clipped = losses.clipped_ratio_loss(*as_t, clip_eps=0.2, clip_eps_high=0.28)
    expected = ref.clipped_ratio_loss(log_probs, old, adv, mask, 0.2, clip_eps_high=0.28)
    assert float(loss.mean()) == pytest.approx(expected["loss"], rel=1e-12)
    assert float(clipped.double().mean()) == pytest.approx(expected["clip_fraction"])
    symmetric = ref.clipped_ratio_loss(log_probs, old, adv, mask, 0.2)
    assert expected["clip_fraction"] < symmetric["clip_fraction"]
    assert TrainingConfig().clip_eps_high is None  # defaults to clip_eps


@pytest.mark.parametrize("scale", ref.ADVANTAGE_SCALES)
def test_grpo_advantages_follow_the_configured_scale(scale):
    rewards = [[0.0, 1.0, 1.0, 0.5], [2.0, 0.0, 0.0, 0.0]]
    prompts, responses, table = stage_table(rewards)
    config = TrainingConfig(objective="grpo", advantage_scale=scale)
    examples, _ = training_examples(prompts, responses, table,
                                    chosen(np.zeros((2, 4))), config, 1)
    expected, _ = ref.group_advantages(table, scale=scale, ddof=1)
    np.testing.assert_allclose([e.weight for e in examples], expected.flatten())


def test_overlong_penalty_falls_linearly_over_the_buffer_before_max_new_tokens():
    rewards = np.array([[1.0, 1.0, 1.0, np.nan]])
    rollouts = Rollouts([None], [[Rollout("", [0] * n, "eos") for n in (10, 13, 16, 16)]],
                        rewards)

    def shaped(**training):
        return shaped_rewards(rollouts, RaftConfig(generation=GenerationConfig(max_new_tokens=16),
                                                   training=TrainingConfig(**training)))

    # expected length 16 - 4 = 12: 10 -> 0, 13 -> -1/4 * 0.5, 16 -> -4/4 * 0.5
    np.testing.assert_allclose(shaped(overlong_buffer=4, overlong_penalty=0.5),
                               [[1.0, 0.875, 0.5, np.nan]])
    np.testing.assert_array_equal(shaped(), rewards)


@pytest.mark.parametrize("objective", [n for n in objectives.OBJECTIVES if not objectives.LOSSES[
    objectives.OBJECTIVES[n][1]].paired])  # dpo, rpo: tests/test_dpo.py
def test_tokens_a_loss_mask_marks_0_get_no_loss_under_every_objective(objective):
    """A tool's output inside a response (loss mask 0) is context, never a target: it gets no
    loss and counts in no token total, whatever the objective."""
    masked = TrainingExample([1, 3], [5, 6, 7], 0.5, [-1.0, -1.0, -1.0], loss_mask=[1, 0, 1])
    batch = collate([masked], pad_id=0)
    assert batch["labels"][0].tolist() == [IGNORE, IGNORE, 5, IGNORE, 7]
    nll = token_nll(tiny_causal_lm(), batch)
    mask = (batch["labels"][:, 1:] != IGNORE).float()
    tensors = {**objectives.token_tensors([masked], nll.shape[1]), "mask": mask}
    loss, stats = objectives.token_loss(TrainingConfig(objective=objective), -nll, tensors)
    loss = loss.detach()
    assert stats["tokens"] == 2.0
    assert float(loss[0, 2]) == 0.0 and float(loss[0, 1]) != 0.0 and float(loss[0, 3]) != 0.0
    unmasked = collate([TrainingExample([1, 3], [5, 6, 7])], pad_id=0)
    assert unmasked["labels"][0].tolist() == [IGNORE, IGNORE, 5, 6, 7]  # no mask: all trained


# The sampler-training gap and the rollout correction (issues 31.18, 35) ------------------------

@pytest.mark.parametrize("mode, expected", [
    ("token_truncate", [[1.0, 3.0, np.exp(-1.0), 1.0]]),
    ("token_mask", [[1.0, 0.0, np.exp(-1.0), 1.0]]),
    ("sequence_truncate", [[5 / np.e] * 3 + [1.0]]),  # the product 5 * e^-1, under the cap
    ("sequence_mask", [[5 / np.e] * 3 + [1.0]]),
    ("none", [[1.0, 1.0, 1.0, 1.0]]),
])
def test_rollout_correction_weights_by_hand(mode, expected):
    if mode.startswith("sequence"):  # and a cap below the product: capped, or dropped
        capped = ref.rollout_correction(np.log([[0.5, 0.5]]), np.log([[0.1, 0.1]]),
                                        np.ones((1, 2)), mode, 3.0)
        assert capped.tolist() == ([[3.0, 3.0]] if mode.endswith("truncate") else [[0.0, 0.0]])
    """rho = pi_old(train) / pi_sampler: token 1 is 5x likelier under training (above the cap
    3), token 2 e^-1 as likely; token 0 has no sampler record (NaN: rho 1); token 3 is not the
    model's (mask 0: weight 1, in no sequence product)."""
    train = np.array([[-1.0, np.log(0.5), -2.0, -9.0]])
    sampler = np.array([[np.nan, np.log(0.1), -1.0, 0.0]])
    mask = np.array([[1, 1, 1, 0]])
    np.testing.assert_allclose(ref.rollout_correction(train, sampler, mask, mode, 3.0), expected)


def test_recomputing_pi_old_measures_the_gap_to_the_sampler_and_corrects_by_it():
    model = tiny_causal_lm()
    exact = with_old(model, EXAMPLES, 1.0)
    stats = trainer_for(model, objective="raft++", old_log_probs="recompute").train(exact, 1)
    assert stats["train/pi_old_gap"] < 1e-5 and abs(stats["train/pi_old_kl"]) < 1e-5  # fp32
    off = with_old(tiny_causal_lm(), EXAMPLES, 1.0)
    for example in off:  # a sampler whose kernels disagree: 3 nats less likely on one token
        example.old_log_probs[0] -= 3.0
    stats = trainer_for(tiny_causal_lm(), objective="raft++", old_log_probs="recompute",
                        rollout_correction="token_mask").train(off, 1)
    assert stats["train/pi_old_gap"] == pytest.approx(3 * 3.0 / 6, rel=1e-3)  # of 6 tokens
    assert stats["train/rollout_correction_zeroed"] == pytest.approx(3 / 6)  # e^3 > cap 3
    assert [e.correction[0] for e in off] == [0.0, 0.0, 0.0]


def test_a_bf16_sampler_shows_its_gap_where_fp32_shows_none():
    """The gap metric tells when it matters: a bf16 decode against the fp32 training forward."""
    model = tiny_causal_lm()
    half = tiny_causal_lm().to(torch.bfloat16)
    recorded = with_old(half, EXAMPLES, 1.0)
    stats = trainer_for(model, objective="grpo", old_log_probs="recompute").train(recorded, 1)
    assert stats["train/pi_old_gap"] > 1e-4


def test_recompute_and_correction_are_refused_where_they_mean_nothing():
    with pytest.raises(raftlm.config.ConfigError, match="training.old_log_probs: expected "
                                                        "sampler for training.objective=sft"):
        objectives.check_objective_config(RaftConfig.from_dict(
            {"data": {"task": "arithmetic"}}, ["training.old_log_probs=recompute"]))
    with pytest.raises(raftlm.config.ConfigError, match="training.rollout_correction: expected "
                                                        "none"):
        objectives.check_objective_config(RaftConfig.from_dict(
            {"data": {"task": "arithmetic"}},
            ["training.objective=grpo", "training.rollout_correction=token_truncate"]))
