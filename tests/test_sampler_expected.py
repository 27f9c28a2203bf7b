"""The raftlm sampler's samples are pinned: fixed model, prompts, seeds and settings give these.

`sampler_expected.json` holds what the sampler returned before its row state was rewritten
(token ids, finish reasons, recorded log-probs, the order samples finished in); the log-probs
of the cases at T != 1 were rewritten once since, when they became log softmax(logits / T)
(ids, reasons and order unchanged; T = 1 log-probs unchanged, bit for bit). The cases
make rows finish at different steps, so admission, refill and compaction all run. On the
machine kind that wrote the file (torch version and CPU capability recorded in it) the
comparison is exact, bit for bit; elsewhere fp32 kernels may round differently, so log-probs
are compared to 1e-5. Rewrite it only for an intended change of the samples:

    .venv/bin/python tests/test_sampler_expected.py --write
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tiny import tiny_llama_config, tiny_tokenizer
from transformers import LlamaForCausalLM

from raftlm.config import GenerationConfig
from raftlm.sampling.completion import Completion
from raftlm.sampling.generate import generate

EXPECTED = Path(__file__).with_name("sampler_expected.json")
TEXTS = ["What is 2+2?", "hi", "A much longer prompt, to force padding.", "xyz", "Z",
         "abcdefgh", "12345678", "ABCDEFGH"]  # the last three share a length: one prefill
EXTRA_EOS = "e .a"  # frequent characters as extra eos ids: samples end at many lengths
SEEDS = [5, 17, 3, 99, 2**40 + 7, 0, 123456789, 8]
PLACEHOLDER = Completion(text="earlier", token_ids=[7], finish_reason="eos",
                         token_log_probs=[-1.0])

# name -> (samples per prompt, GenerationConfig overrides, other generate() arguments)
CASES: dict[str, tuple[int, dict[str, Any], dict[str, Any]]] = {
    "plain": (3, {}, {}),
    "refill_and_compact": (4, {"batch_size": 3}, {}),
    "temperature_top_k": (3, {"temperature": 0.7, "top_k": 8, "batch_size": 5}, {}),
    "temperature_top_p": (3, {"temperature": 1.3, "top_p": 0.9, "batch_size": 4}, {}),
    "top_k_top_p": (2, {"temperature": 0.8, "top_k": 20, "top_p": 0.9}, {}),
    "greedy": (2, {"batch_size": 2}, {"greedy": True}),
    "with_greedy": (3, {"batch_size": 4}, {"with_greedy": True}),
    "done_skipped": (3, {"batch_size": 4},
                     {"done": {(0, 1): PLACEHOLDER, (2, 0): PLACEHOLDER, (2, 2): PLACEHOLDER}}),
    "stop_string": (3, {"stop_strings": ["ab", "7"], "batch_size": 6}, {}),
    "one_row": (2, {"batch_size": 1}, {}),
}


def machine() -> str:
    return f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}"


def tiny_setup() -> tuple[LlamaForCausalLM, Any, list[list[int]]]:
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tok), initializer_range=0.3)).eval()
    model.generation_config.eos_token_id = [2, *(tok.convert_tokens_to_ids(c) for c in EXTRA_EOS)]
    return model, tok, [tok.encode(t) for t in TEXTS]


def run_case(model, tok, prompts: list[list[int]], name: str) -> dict[str, Any]:
    """One case's samples, as JSON-ready lists."""
    num_samples, overrides, options = CASES[name]
    finished: list[list[int]] = []
    out = generate(model, tok, prompts, num_samples,
                   GenerationConfig(**{"max_new_tokens": 16, **overrides}), seeds=SEEDS,
                   on_finish=lambda i, j, _: finished.append([i, j]), **options)
    return {
        "ids": [[c.token_ids for c in row] for row in out],
        "reasons": [[c.finish_reason for c in row] for row in out],
        "log_probs": [[c.token_log_probs for c in row] for row in out],
        "finish_order": finished,
    }


@pytest.fixture(scope="module")
def setup():
    return tiny_setup()


@pytest.fixture(scope="module")
def expected() -> dict[str, Any]:
    return json.loads(EXPECTED.read_text())


@pytest.mark.parametrize("name", list(CASES))
def test_samples_equal_the_pinned_ones(setup, expected, name):
    got, want = run_case(*setup, name), expected["cases"][name]
    assert got["ids"] == want["ids"]
    assert got["reasons"] == want["reasons"]
    assert got["finish_order"] == want["finish_order"]
    if expected["machine"] == machine():
        assert got["log_probs"] == want["log_probs"]  # bit for bit (JSON floats round-trip)
    else:
        for got_row, want_row in zip(got["log_probs"], want["log_probs"], strict=True):
            for a, b in zip(got_row, want_row, strict=True):
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_cases_end_at_many_lengths(expected):
    # The cases exercise refill and compaction only if rows finish at different steps.
    lengths = {len(ids) for row in expected["cases"]["refill_and_compact"]["ids"] for ids in row}
    reasons = {r for case in expected["cases"].values() for row in case["reasons"] for r in row}
    assert len(lengths) >= 5
    assert reasons == {"eos", "length", "stop_string"}


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    model, tok, prompts = tiny_setup()
    cases = {name: run_case(model, tok, prompts, name) for name in CASES}
    EXPECTED.write_text(json.dumps({"machine": machine(), "cases": cases}) + "\n")
    print(f"wrote {EXPECTED}")
