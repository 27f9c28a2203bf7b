"""Recorded log-probs are those of the distribution sampled from: log softmax(logits / T).

Greedy decoding records log softmax(logits) (T = 1); top-k/top-p truncation is not applied to
the recorded numbers (the softmax at T, before truncation).
"""

from __future__ import annotations

import pytest
import torch

from raftlm.config import GenerationConfig
from raftlm.sampling.completion import Completion
from raftlm.sampling.generate import generate

TEXTS = ["What is 2+2?", "hi", "A longer prompt."]
SEEDS = [4, 5, 6]


@pytest.fixture(scope="module")
def prompts(tok):
    return [tok.encode(t) for t in TEXTS]


def forward_log_probs(model, prompt: list[int], completion: Completion, temperature: float
                      ) -> list[float]:
    """log softmax(logits / T) at each generated token, from one plain forward of the model."""
    ids = completion.token_ids
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0].float()
    steps = logits[len(prompt) - 1 : len(prompt) - 1 + len(ids)]
    return torch.log_softmax(steps / temperature, dim=-1).gather(
        -1, torch.tensor(ids)[:, None])[:, 0].tolist()


def assert_recorded(model, prompts, rows: list[list[Completion]], temperature: float) -> None:
    for prompt, row in zip(prompts, rows, strict=True):
        for completion in row:
            # The decode step and a plain forward round differently (~1e-6, doubled by 1 / T).
            expected = forward_log_probs(model, prompt, completion, temperature)
            assert completion.token_log_probs == pytest.approx(expected, abs=5e-5)


@pytest.mark.parametrize("backend", ["raftlm", "hf"])
@pytest.mark.parametrize("filters", [{}, {"top_k": 5, "top_p": 0.9}], ids=["plain", "truncated"])
def test_samples_at_temperature_half_record_log_softmax_of_logits_over_half(
        model, tok, prompts, backend, filters):
    config = GenerationConfig(backend=backend, temperature=0.5, max_new_tokens=8, **filters)
    rows = generate(model, tok, prompts, 3, config, seeds=SEEDS)
    assert_recorded(model, prompts, rows, temperature=0.5)


def test_the_check_tells_temperature_half_from_one(model, tok, prompts):
    rows = generate(model, tok, prompts, 3, GenerationConfig(temperature=0.5, max_new_tokens=8),
                    seeds=SEEDS)
    with pytest.raises(AssertionError):
        assert_recorded(model, prompts, rows, temperature=1.0)


@pytest.mark.parametrize("backend", ["raftlm", "hf"])
def test_greedy_decoding_records_log_softmax_at_temperature_one(model, tok, prompts, backend):
    config = GenerationConfig(backend=backend, temperature=0.5, max_new_tokens=8)
    rows = generate(model, tok, prompts, 1, config, greedy=True)
    assert_recorded(model, prompts, rows, temperature=1.0)


@pytest.mark.parametrize("backend", ["raftlm", "hf"])
def test_with_greedy_records_each_row_at_its_own_temperature(model, tok, prompts, backend):
    config = GenerationConfig(backend=backend, temperature=0.5, max_new_tokens=8)
    rows = generate(model, tok, prompts, 2, config, seeds=SEEDS, with_greedy=True)
    assert_recorded(model, prompts, [row[:1] for row in rows], temperature=1.0)
    assert_recorded(model, prompts, [row[1:] for row in rows], temperature=0.5)
