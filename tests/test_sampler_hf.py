"""The `hf` backend samples what the config says, per row: the checkpoint's generation config
does not act on it, and a sample depends on its prompt's seed and index, not on its batch."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from raftlm.config import GenerationConfig
from raftlm.sampling.generate import generate

TEXTS = ["What is 2+2?", "hi", "A much longer prompt, to force padding.", "xyz", "Z"]
SEEDS = [11, 22, 33, 44, 55]


@pytest.fixture(scope="module")
def prompts(tok):
    return [tok.encode(t) for t in TEXTS]


def config(**overrides) -> GenerationConfig:
    return GenerationConfig(**{"backend": "hf", "max_new_tokens": 12, **overrides})


def ids(model, tok, prompts, seeds, count=3, **settings) -> list[list[list[int]]]:
    rows = generate(model, tok, prompts, count, config(**settings), seeds=seeds)
    return [[c.token_ids for c in row] for row in rows]


@pytest.fixture
def opinionated(model):
    """The model with a checkpoint generation config that would change every sample."""
    copy = LlamaForCausalLM(model.config).eval()
    copy.load_state_dict(model.state_dict())
    copy.generation_config.update(repetition_penalty=5.0, no_repeat_ngram_size=1, min_p=0.3,
                                  top_k=3, temperature=0.2, suppress_tokens=[2])
    return copy


@pytest.mark.parametrize("settings", [dict(), dict(temperature=0.7, top_p=0.9)])
def test_the_checkpoints_generation_config_does_not_act_on_sampling(
        model, opinionated, tok, prompts, settings):
    assert ids(opinionated, tok, prompts, SEEDS, **settings) == ids(
        model, tok, prompts, SEEDS, **settings)
    assert opinionated.generation_config.repetition_penalty == 5.0  # left as it was


def test_greedy_ignores_the_checkpoints_generation_config(model, opinionated, tok, prompts):
    greedy = generate(opinionated, tok, prompts, 1, config(), seeds=SEEDS, greedy=True)
    reference = generate(model, tok, prompts, 1, config(backend="raftlm"), seeds=SEEDS,
                         greedy=True)
    assert [r[0].token_ids for r in greedy] == [r[0].token_ids for r in reference]


@pytest.mark.parametrize("settings", [dict(), dict(temperature=0.8, top_k=20, top_p=0.9)])
def test_samples_depend_on_seed_and_index_not_on_batch_or_shard(model, tok, prompts, settings):
    together = ids(model, tok, prompts, SEEDS, batch_size=64, **settings)
    one_by_one = ids(model, tok, prompts, SEEDS, batch_size=1, **settings)
    shards = (ids(model, tok, prompts[:2], SEEDS[:2], batch_size=6, **settings)
              + ids(model, tok, prompts[2:], SEEDS[2:], batch_size=6, **settings))
    first_only = ids(model, tok, prompts, SEEDS, count=1, **settings)
    assert one_by_one == together
    assert shards == together
    assert [row[:1] for row in together] == first_only
    assert len({tuple(s) for row in together for s in row}) > len(prompts)  # they do differ


def test_hf_and_raftlm_backends_draw_the_same_samples_from_one_config(model, tok, prompts):
    settings = dict(temperature=0.8, top_p=0.9)
    hf = ids(model, tok, prompts, SEEDS, **settings)
    raftlm = ids(model, tok, prompts, SEEDS, backend="raftlm", **settings)
    assert hf == raftlm


def test_sampling_leaves_the_global_rng_as_it_was(model, tok, prompts):
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    ids(model, tok, prompts[:2], SEEDS[:2])
    assert torch.rand(1) == expected
