"""Fixtures shared by the test modules."""

import pytest
import torch
from tiny import save_tiny_model, tiny_llama_config, tiny_tokenizer
from transformers import LlamaForCausalLM


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama and its tokenizer saved in a folder, made once per test module."""
    return save_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def tok():
    """The tiny character-level tokenizer."""
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    """A tiny random Llama in eval mode; its larger init (0.3) gives peaked, varied next-token
    distributions, which the sampler tests need. A module defining its own `model` wins."""
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(len(tok), initializer_range=0.3)).eval()


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Every test starts with no AcceleratorState: accelerate keeps one per process, and a test
    that trains in bf16 would otherwise refuse the fp32 Accelerator of every later test."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
