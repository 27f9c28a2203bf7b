"""Generation backends live in one table, `GENERATION_BACKENDS`, that `generate` dispatches on."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny import tiny_llama_config, tiny_tokenizer
from transformers import LlamaForCausalLM

import raftlm.sampling.vllm as vllm_backend
from raftlm.config import ConfigError, GenerationConfig
from raftlm.sampling.completion import Completion
from raftlm.sampling.generate import (
    GENERATION_BACKENDS,
    GenerationBackend,
    GenerationRequest,
    generate,
)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(len(tok), initializer_range=0.3)).eval()


def test_config_backend_choices_equal_the_registry_keys():
    backend = next(f for f in dataclasses.fields(GenerationConfig) if f.name == "backend")
    choices = backend.metadata["choices"]
    assert len(choices) == len(set(choices))
    assert set(choices) == set(GENERATION_BACKENDS)
    assert backend.default in GENERATION_BACKENDS


def test_generate_hands_the_request_to_the_registered_backend(model, tok, monkeypatch):
    seen: list[GenerationRequest] = []

    def echo(model, tokenizer, request):
        seen.append(request)
        return [[Completion(text="", token_ids=[n], finish_reason="length")] * n
                for n in request.counts]

    monkeypatch.setitem(GENERATION_BACKENDS, "echo", GenerationBackend(echo, keeps_done=False))
    config = GenerationConfig(backend="echo", max_new_tokens=5)
    out = generate(model, tok, [[3, 4], [5]], [2, 1], config, seeds=[7, 8], desc="x")
    assert [[c.token_ids for c in row] for row in out] == [[[2], [2]], [[1]]]
    [request] = seen
    assert (request.counts, request.seeds, request.max_new_tokens) == ([2, 1], [7, 8], 5)


def test_an_unknown_backend_is_refused_naming_the_known_ones(model, tok):
    with pytest.raises(ValueError, match="generation.backend: expected one of raftlm, hf, vllm"):
        generate(model, tok, [[3, 4]], 1, GenerationConfig(backend="nope"))


def test_only_a_backend_that_keeps_done_samples_returns_them(model, tok):
    placeholder = Completion(text="earlier", token_ids=[5], finish_reason="eos")
    done = {(0, 0): placeholder}
    assert GENERATION_BACKENDS["raftlm"].keeps_done and not GENERATION_BACKENDS["hf"].keeps_done
    for name in GENERATION_BACKENDS.keys() - {"vllm"}:
        [[first, _]] = generate(model, tok, [[3, 4, 5]], 2,
                                GenerationConfig(backend=name, max_new_tokens=4), seeds=[1],
                                done=done)
        assert (first is placeholder) == GENERATION_BACKENDS[name].keeps_done


def test_hf_backend_with_greedy_reports_every_completion(model, tok):
    reported: list[tuple[int, int]] = []
    out = generate(model, tok, [[3, 4], [5, 6, 7]], [2, 1],
                   GenerationConfig(backend="hf", max_new_tokens=4), seeds=[1, 2],
                   with_greedy=True, on_finish=lambda i, j, _: reported.append((i, j)))
    assert [len(row) for row in out] == [3, 2]
    assert sorted(reported) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]


def test_vllm_availability_is_asked_of_its_registry_entry(monkeypatch):
    monkeypatch.setattr(vllm_backend.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="vllm is not installed"):
        GENERATION_BACKENDS["vllm"].check_available()
    GENERATION_BACKENDS["raftlm"].check_available()  # always available: returns quietly
