"""Ragged sample counts: `num_samples` may give each prompt its own count, in every backend.

On the raftlm backend sample j of prompt i depends on (seeds[i], j) alone, so a count only
says how many of a prompt's samples to draw, and a second round can extend a first one.
"""

from __future__ import annotations

import sys
import types

import pytest

import raftlm.sampling.generate as generate_module
import raftlm.sampling.vllm as vllm_backend
from raftlm.config import GenerationConfig
from raftlm.sampling.completion import Completion
from raftlm.sampling.generate import generate, generate_sharded

TEXTS = ["What is 2+2?", "hi", "A longer prompt.", "xyz"]
SEEDS = [11, 22, 33, 44]


@pytest.fixture(scope="module")
def prompts(tok):
    return [tok.encode(t) for t in TEXTS]


def config(**overrides) -> GenerationConfig:
    return GenerationConfig(**{"max_new_tokens": 8, **overrides})


def ids_of(rows: list[list[Completion]]) -> list[list[list[int]]]:
    return [[c.token_ids for c in row] for row in rows]


def test_each_prompt_gets_its_own_count(model, tok, prompts):
    out = generate(model, tok, prompts, [3, 1, 0, 2], config(), seeds=SEEDS)
    assert [len(row) for row in out] == [3, 1, 0, 2]


def test_a_prompts_first_samples_do_not_depend_on_its_count(model, tok, prompts):
    ragged = ids_of(generate(model, tok, prompts[:2], [3, 5], config(), seeds=SEEDS[:2]))
    three = ids_of(generate(model, tok, prompts[:2], 3, config(), seeds=SEEDS[:2]))
    five = ids_of(generate(model, tok, prompts[:2], 5, config(), seeds=SEEDS[:2]))
    assert ragged[0] == three[0] == five[0][:3]
    assert ragged[1] == five[1]


def test_done_samples_are_returned_and_only_the_rest_are_sampled(model, tok, prompts):
    first = generate(model, tok, prompts, 2, config(), seeds=SEEDS)
    done = {(i, j): c for i, row in enumerate(first) for j, c in enumerate(row)}
    sampled: list[tuple[int, int]] = []
    extended = generate(model, tok, prompts, [4, 2, 3, 5], config(), seeds=SEEDS, done=done,
                        on_finish=lambda i, j, _: sampled.append((i, j)))
    assert sorted(sampled) == [(0, 2), (0, 3), (2, 2), (3, 2), (3, 3), (3, 4)]
    assert all(extended[i][j] is c for (i, j), c in done.items())
    fresh = generate(model, tok, prompts, [4, 2, 3, 5], config(), seeds=SEEDS)
    assert ids_of(extended) == ids_of(fresh)
    assert ([[c.token_log_probs for c in row] for row in extended]
            == [[c.token_log_probs for c in row] for row in fresh])


def test_done_past_a_prompts_count_is_left_out(model, tok, prompts):
    placeholder = Completion(text="x", token_ids=[5], finish_reason="eos")
    out = generate(model, tok, prompts[:2], [1, 0], config(), seeds=SEEDS[:2],
                   done={(0, 0): placeholder, (0, 3): placeholder, (1, 0): placeholder})
    assert out == [[placeholder], []]


def test_all_counts_zero_gives_empty_lists(model, tok, prompts):
    assert generate(model, tok, prompts, [0, 0, 0, 0], config(), seeds=SEEDS) == [[]] * 4


def test_with_greedy_puts_the_greedy_answer_before_each_prompts_samples(model, tok, prompts):
    both = generate(model, tok, prompts, [2, 0, 1, 3], config(), seeds=SEEDS, with_greedy=True)
    greedy = generate(model, tok, prompts, 1, config(), greedy=True)
    sampled = generate(model, tok, prompts, [2, 0, 1, 3], config(), seeds=SEEDS)
    assert ids_of([row[:1] for row in both]) == ids_of(greedy)
    assert ids_of([row[1:] for row in both]) == ids_of(sampled)


@pytest.mark.parametrize("counts, message", [
    ([1, 2], "got 2 counts for 4 prompts"),
    ([1, -1, 0, 0], r"num_samples\[1\]: expected a count >= 0, got -1"),
    ([1, 2.5, 0, 0], r"num_samples\[1\]: expected a count >= 0, got 2.5"),
])
def test_bad_counts_are_refused_naming_the_item(model, tok, prompts, counts, message):
    with pytest.raises(ValueError, match=message):
        generate(model, tok, prompts, counts, config(), seeds=SEEDS)


@pytest.mark.parametrize("greedy", [False, True])
def test_hf_backend_takes_a_count_per_prompt(model, tok, prompts, greedy):
    counts = [2, 0, 3, 3]
    out = generate(model, tok, prompts, counts, config(backend="hf", batch_size=6),
                   seeds=SEEDS, greedy=greedy)
    assert [len(row) for row in out] == counts
    assert all(c.token_log_probs is not None and len(c.token_log_probs) == len(c.token_ids)
               for row in out for c in row)
    if greedy:
        assert len({tuple(c.token_ids) for c in out[2]}) == 1


def test_sharded_generation_keeps_each_prompts_count(model, tok, prompts, monkeypatch):
    counts = [3, 0, 1, 2]
    whole = ids_of(generate(model, tok, prompts, counts, config(), seeds=SEEDS))
    parts = []
    for start, end in [(0, 3), (3, 4)]:  # two processes' contiguous shares
        monkeypatch.setattr(generate_module, "shard",
                            lambda items, a=start, b=end: list(items)[a:b])
        monkeypatch.setattr(generate_module, "gather", list)
        parts += generate_sharded(model, tok, prompts, counts, config(), seeds=SEEDS)
    assert ids_of(parts) == whole


class _FakeEngine:
    """Stands in for vLLM's engine: returns n outputs per prompt, each the prompt's last id."""

    def __init__(self):
        self.calls = []

    def sync(self, model):
        return None

    @property
    def llm(self):
        return self

    def generate(self, prompts, params, **kwargs):
        self.calls.append((prompts, params))
        output = types.SimpleNamespace
        return [output(outputs=[output(token_ids=[p["prompt_token_ids"][-1], 2],
                                       finish_reason="stop", stop_reason=2)] * kw["n"])
                for p, kw in zip(prompts, params, strict=True)]


@pytest.mark.parametrize("greedy", [False, True])
def test_vllm_backend_asks_each_prompts_count_and_skips_zero(model, tok, prompts, monkeypatch,
                                                             greedy):
    engine = _FakeEngine()
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=dict))
    monkeypatch.setattr(vllm_backend, "check_vllm_available", lambda: None)
    monkeypatch.setattr(vllm_backend, "_engine_for", lambda model, config: engine)
    out = generate(model, tok, prompts, [2, 0, 3, 1], config(backend="vllm"), seeds=SEEDS,
                   greedy=greedy)
    assert [len(row) for row in out] == [2, 0, 3, 1]
    [(sent, params)] = engine.calls
    assert [p["prompt_token_ids"] for p in sent] == [prompts[0], prompts[2], prompts[3]]
    assert [p["seed"] for p in params] == [11, 33, 44]
    assert [p["n"] for p in params] == ([1, 1, 1] if greedy else [2, 3, 1])
    assert [row[0].token_ids[0] for row in out if row] == [prompts[i][-1] for i in (0, 2, 3)]
