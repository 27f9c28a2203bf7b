"""SFT on selected responses: masking, token pooling, optimizer and schedule."""

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from tiny import tiny_causal_lm

from raftlm.config import TrainingConfig
from raftlm.core import token_pooled_nll
from raftlm.training.batches import IGNORE, Example, collate, response_log_probs, token_nll
from raftlm.training.trainer import PolicyTrainer


def test_collate_masks_prompt_and_padding_tokens():
    batch = collate([Example([5, 6, 7], [8, 9]), Example([5], [8])], pad_id=2)
    assert batch["labels"].tolist() == [
        [IGNORE, IGNORE, IGNORE, 8, 9],
        [IGNORE, 8, IGNORE, IGNORE, IGNORE],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]


def test_loss_counts_response_tokens_only():
    """The summed NLL equals -log p of the response tokens, computed independently."""
    model = tiny_causal_lm()
    prompt, response = [5, 6, 7], [8, 9, 10]
    nll = token_nll(model, collate([Example(prompt, response)], pad_id=2))
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0]
    log_probs = torch.log_softmax(logits, dim=-1)
    expected = -sum(log_probs[len(prompt) - 1 + i, tok] for i, tok in enumerate(response))
    assert float(nll.sum().detach()) == pytest.approx(float(expected), rel=1e-5)
    assert (nll[0, : len(prompt) - 1] == 0).all()


def test_prompt_tokens_receive_no_gradient():
    """Gradients w.r.t. the prompt's target logits are zero: prompt tokens are not imitated."""
    model = tiny_causal_lm()
    batch = collate([Example([5, 6, 7], [8, 9])], pad_id=2)
    logits = model(input_ids=batch["input_ids"]).logits.detach().requires_grad_(True)
    targets = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE, reduction="sum"
    )
    loss.backward()
    per_position = logits.grad[0].abs().sum(-1)
    assert (per_position[:2] == 0).all() and (per_position[2:4] > 0).all()


def test_response_log_probs_match_the_pooled_loss_definition():
    model = tiny_causal_lm()
    examples = [Example([5, 6], [8, 9, 10, 11]), Example([5, 6, 7], [8])]
    log_probs = response_log_probs(model, examples, 2, batch_size=1, device=torch.device("cpu"))
    assert [len(lp) for lp in log_probs] == [4, 1]
    batched = response_log_probs(model, examples, 2, batch_size=2, device=torch.device("cpu"))
    for one, two in zip(log_probs, batched):
        np.testing.assert_allclose(one, two, atol=1e-5)
    pooled = token_pooled_nll(log_probs)
    assert pooled == pytest.approx(-np.concatenate(log_probs).mean(), abs=1e-6)


def test_training_lowers_the_loss_of_the_selected_responses():
    model = tiny_causal_lm()
    config = TrainingConfig(learning_rate=1e-2, epochs=5, micro_batch_size=2)
    trainer = PolicyTrainer(model, config, total_steps=100, accelerator=Accelerator(cpu=True),
                         pad_id=2, seed=0)
    examples = [Example([5, 6], [8, 9, 10]), Example([7], [11, 12])]
    before = token_pooled_nll(response_log_probs(model, examples, 2, 2, torch.device("cpu")))
    stats = trainer.train(examples, stage=1)
    after = token_pooled_nll(response_log_probs(model, examples, 2, 2, torch.device("cpu")))
    assert after < before - 0.5
    assert stats["train/optimizer_steps"] == 5
    assert stats["tokens/trained"] == 5 * 5


def test_gradient_accumulation_equals_one_big_batch():
    """Token-pooled normalisation: 2 micro-batches x 1 accumulate to the same step as 1 x 2."""
    examples = [Example([5, 6], [8, 9, 10, 11]), Example([7], [12])]
    weights = []
    for micro, accum in [(2, 1), (1, 2)]:
        model = tiny_causal_lm(seed=3)
        config = TrainingConfig(learning_rate=1e-2, micro_batch_size=micro,
                                gradient_accumulation_steps=accum, max_grad_norm=0)
        trainer = PolicyTrainer(model, config, 10, Accelerator(cpu=True), pad_id=2, seed=0)
        trainer.train(examples, stage=1)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(weights[0], weights[1], atol=3e-5, rtol=1e-4)


def test_schedule_spans_the_run_across_stages():
    model = tiny_causal_lm()
    config = TrainingConfig(learning_rate=1.0, lr_scheduler="linear", micro_batch_size=1)
    trainer = PolicyTrainer(model, config, total_steps=4, accelerator=Accelerator(cpu=True),
                         pad_id=2, seed=0)
    examples = [Example([5], [8]), Example([6], [9])]
    first = trainer.train(examples, stage=1)
    second = trainer.train(examples, stage=2)
    assert first["train/lr"] == pytest.approx(0.5)
    assert second["train/lr"] == pytest.approx(0.0)


def test_trainer_state_round_trip_restores_optimizer_and_schedule():
    config = TrainingConfig(learning_rate=0.1, lr_scheduler="cosine", micro_batch_size=1)
    first = PolicyTrainer(tiny_causal_lm(), config, 10, Accelerator(cpu=True), 2, 0)
    first.train([Example([5], [8])], stage=1)
    second = PolicyTrainer(tiny_causal_lm(), config, 10, Accelerator(cpu=True), 2, 0)
    second.load_state_dict(first.state_dict())
    assert second.step == 1
    assert second.scheduler.get_last_lr() == first.scheduler.get_last_lr()
    assert len(second.optimizer.state_dict()["state"]) > 0


def test_bf16_autocast_computes_every_step_with_the_current_weights():
    """Autocast caches its bf16 copy of each trainable weight while its context is open: a
    context spanning several optimizer steps would keep the first step's weights. Two steps
    in one call must equal two calls of one step each (each necessarily on fresh weights)."""
    example = [Example([5, 6, 7], [8, 9, 10, 11])]
    weights = {}
    for name, autocast, calls, epochs in [("one call", True, 1, 2), ("two calls", True, 2, 1),
                                          ("fp32", False, 2, 1)]:
        model = tiny_causal_lm(seed=4)
        config = TrainingConfig(learning_rate=1e-2, epochs=epochs, micro_batch_size=1,
                                bf16_autocast=autocast)
        trainer = PolicyTrainer(model, config, 10, Accelerator(cpu=True), pad_id=2, seed=0)
        for stage in range(1, calls + 1):
            trainer.train(example, stage=stage)
        weights[name] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.equal(weights["one call"], weights["two calls"])
    assert not torch.equal(weights["two calls"], weights["fp32"])  # bf16 was in use


@pytest.mark.parametrize("max_grad_norm", [0.0, 1e6])
def test_the_gradient_norm_is_reported_whether_or_not_it_is_clipped(max_grad_norm):
    """31.18: with clipping off (max_grad_norm 0) train/grad_norm read 0."""
    config = TrainingConfig(learning_rate=1e-3, micro_batch_size=2, max_grad_norm=max_grad_norm)
    trainer = PolicyTrainer(tiny_causal_lm(), config, 10, Accelerator(cpu=True), pad_id=2, seed=0)
    stats = trainer.train([Example([5, 6], [8, 9, 10]), Example([7], [11, 12])], stage=1)
    assert stats["train/grad_norm"] > 0
