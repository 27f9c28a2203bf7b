"""Log-probs recorded at sampling time, and greedy + sampled decoding in one pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raftlm.config import GenerationConfig
from raftlm.sampling.generate import generate
from raftlm.training.batches import Example, response_log_probs

TEXTS = ["What is 2+2?", "hi", "A much longer prompt, to force padding.", "xyz"]


@pytest.fixture(scope="module")
def prompts(tok):
    return [tok.encode(t) for t in TEXTS]


@pytest.mark.parametrize("backend", ["raftlm", "hf"])
def test_recorded_log_probs_equal_a_teacher_forced_forward(model, tok, prompts, backend):
    # Top-k changes what is sampled, never the recorded log-prob: that of the distribution
    # sampled from before truncation, log softmax(logits / T) (the ratio objectives' pi_old).
    config = GenerationConfig(backend=backend, max_new_tokens=12, temperature=0.7, top_k=20,
                              batch_size=8)
    out = generate(model, tok, prompts, 3, config, seeds=range(len(prompts)))
    examples = [Example(p, c.token_ids) for p, row in zip(prompts, out) for c in row]
    forced = response_log_probs(model, examples, tok.pad_token_id, 4, torch.device("cpu"),
                                temperature=0.7)
    recorded = [c.token_log_probs for row in out for c in row]
    for rec, ref in zip(recorded, forced, strict=True):
        assert len(rec) == len(ref)
        np.testing.assert_allclose(rec, ref, atol=1e-4, rtol=0)


def test_greedy_completions_record_log_probs_too(model, tok, prompts):
    out = generate(model, tok, prompts, 1, GenerationConfig(max_new_tokens=8), greedy=True)
    assert all(len(c.token_log_probs) == len(c.token_ids) for row in out for c in row)


@pytest.mark.parametrize("backend", ["raftlm", "hf"])
def test_with_greedy_equals_separate_greedy_and_sampled_calls(model, tok, prompts, backend):
    config = GenerationConfig(backend=backend, max_new_tokens=10, batch_size=8)
    seeds = [11, 12, 13, 14]
    both = generate(model, tok, prompts, 3, config, seeds=seeds, with_greedy=True)
    greedy = generate(model, tok, prompts, 1, config, seeds=seeds, greedy=True)
    sampled = generate(model, tok, prompts, 3, config, seeds=seeds)
    assert [[c.token_ids for c in row] for row in both] == [
        [c.token_ids for c in g + s] for g, s in zip(greedy, sampled)
    ]
