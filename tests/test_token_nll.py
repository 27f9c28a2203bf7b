"""token_nll: logits only at response positions, in chunks, exactly the full-logits loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from tiny import tiny_causal_lm

from raftlm.training import batches
from raftlm.training.batches import IGNORE, Example, collate, token_nll

EXAMPLES = [Example([5, 6, 7, 9], [8, 9, 10, 11, 12]), Example([5], [8, 13]),
            Example([7, 7], [20, 21, 22])]


def full_logits_nll(model, batch) -> torch.Tensor:
    """The definition: cross-entropy of every position's full-vocabulary logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), batch["labels"][:, 1:],
                           ignore_index=IGNORE, reduction="none")


def nll_and_grads(model, fn, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    nll = fn(model, batch)
    (nll.sum() * 0.37).backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    return nll.detach(), grads


def lora(model):
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


@pytest.mark.parametrize("wrap", [lambda m: m, lora], ids=["full", "lora"])
@pytest.mark.parametrize("logits_per_chunk", [2**24, 700], ids=["one_chunk", "chunks"])
def test_token_nll_equals_full_logits_loss_and_gradients(wrap, logits_per_chunk, monkeypatch):
    monkeypatch.setattr(batches, "LOGITS_PER_CHUNK", logits_per_chunk)
    model = wrap(tiny_causal_lm(seed=1))
    batch = collate(EXAMPLES, pad_id=2)
    nll, grads = nll_and_grads(model, token_nll, batch)
    ref_nll, ref_grads = nll_and_grads(model, full_logits_nll, batch)
    torch.testing.assert_close(nll, ref_nll, atol=1e-5, rtol=1e-5)
    for grad, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref, atol=1e-6, rtol=1e-4)


def test_the_head_sees_response_positions_only_and_chunks_bound_its_output(monkeypatch):
    model = tiny_causal_lm(seed=1)
    vocab = model.get_output_embeddings().out_features
    monkeypatch.setattr(batches, "LOGITS_PER_CHUNK", 3 * vocab)
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(o.shape))
    token_nll(model, collate(EXAMPLES, pad_id=2))
    response_tokens = sum(len(e.response_ids) for e in EXAMPLES)
    assert sum(s[0] for s in seen if len(s) == 2) == response_tokens
    assert max(s.numel() for s in map(torch.Size, seen)) <= 3 * vocab


SYSTEM = [1, 30, 31, 32, 33, 34, 35, 36, 37, 38]  # a 10-token "system prompt" every row shares
SHARED_PREFIX = [Example(SYSTEM + [5, 6, 7], [8, 9, 10, 11, 12]), Example(SYSTEM + [5], [8, 13]),
                 Example(SYSTEM + [7, 7], [20, 21, 22])]
SAME_PROMPT = [Example(SYSTEM + [5, 6], [8, 9, 10]), Example(SYSTEM + [5, 6], [8, 9, 11, 12])]


@pytest.mark.parametrize("wrap", [lambda m: m, lora], ids=["full", "lora"])
@pytest.mark.parametrize("examples, shared", [(SHARED_PREFIX, 10), (SAME_PROMPT, 11)],
                         ids=["common_system_prompt", "one_prompt_twice"])
def test_a_shared_prefix_runs_once_with_the_same_loss_and_gradients(wrap, examples, shared):
    model = wrap(tiny_causal_lm(seed=2))
    batch = collate(examples, pad_id=2)
    lengths = []
    embeddings = model.get_input_embeddings()
    embeddings.register_forward_hook(lambda m, i, o: lengths.append(tuple(i[0].shape)))
    nll, grads = nll_and_grads(model, token_nll, batch)
    width = batch["input_ids"].shape[1]
    assert lengths == [(1, shared), (len(examples), width - shared)]  # prefix once, then rows
    ref_nll, ref_grads = nll_and_grads(model, full_logits_nll, batch)
    torch.testing.assert_close(nll, ref_nll, atol=1e-5, rtol=1e-5)
    for grad, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref, atol=1e-6, rtol=1e-4)


def test_gradient_checkpointing_turns_prefix_sharing_off():
    # Checkpointed layers keep no cache, so the rows run whole, with the same loss.
    model = tiny_causal_lm(seed=2)
    # transformers 5.24 renamed it (the old name warns); the GPU machines' 5.17 has only the old
    enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
    enable()
    model.train()
    batch = collate(SHARED_PREFIX, pad_id=2)
    lengths = []
    model.get_input_embeddings().register_forward_hook(
        lambda m, i, o: lengths.append(tuple(i[0].shape)))
    nll, _ = nll_and_grads(model, token_nll, batch)
    assert lengths == [tuple(batch["input_ids"].shape)]
    ref_nll, _ = nll_and_grads(model, full_logits_nll, batch)
    torch.testing.assert_close(nll, ref_nll, atol=1e-5, rtol=1e-5)
