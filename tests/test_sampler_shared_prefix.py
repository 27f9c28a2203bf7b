"""The chat template's shared prefix is prefilled once per sampler call, and each templated
prompt from there on: the same samples as prefilling every prompt whole (fp32, tiny model),
still independent of batching and sharding, and prompts without the prefix as before."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from raftlm.config import GenerationConfig
from raftlm.data.prompts import render_chat
from raftlm.sampling import fast
from raftlm.sampling.decoding import PromptKV, SlotCache
from raftlm.sampling.generate import generate
from raftlm.sampling.shared_prefix import template_prefix

# Lengths differ, and two pairs share one (prefilled together on top of the prefix).
TEXTS = ["What is 12 + 7?", "What is 3 + 45?", "hi", "Is 9 larger than 11?", "ab", "cd"]
SEEDS = [3, 14, 15, 92, 65, 35]


def config(**overrides) -> GenerationConfig:
    return GenerationConfig(**{"max_new_tokens": 12, "temperature": 0.9, **overrides})


@pytest.fixture(scope="module")
def prompts(tok):
    return [render_chat(text, tok)[1] for text in TEXTS]


@pytest.fixture
def prefilled_whole(monkeypatch):
    """Switch the shared prefix off for the test's calls: every prompt prefilled whole."""
    def switch_off():
        monkeypatch.setattr(fast, "template_prefix", lambda tokenizer: [])
    return switch_off


def completions(out):
    return [[(c.token_ids, c.finish_reason) for c in row] for row in out]


def log_probs(out):
    return [np.concatenate([c.token_log_probs for c in row]) for row in out]


def test_the_prefix_is_what_the_template_puts_before_the_users_text(tok, prompts):
    prefix = template_prefix(tok)
    assert prefix == tok.encode("<|im_start|>user\n")
    assert all(p[: len(prefix)] == prefix for p in prompts)


def test_a_tokenizer_without_a_template_has_no_prefix(tok):
    plain = tok.__class__(tokenizer_object=tok.backend_tokenizer, unk_token="<unk>")
    assert template_prefix(plain) == []


def test_the_prefix_is_prefilled_once_and_each_prompt_past_it(model, tok, prompts):
    prefilled: list[int] = []
    queue = [(i, 0) for i in range(len(prompts))]
    kv = PromptKV(model, prompts, queue, torch.device("cpu"),
                  on_prefill=lambda tokens, seconds: prefilled.append(tokens),
                  shared_prefix=template_prefix(tok))
    with torch.inference_mode():
        kv.copy_into(SlotCache(2, max_len=64), [(r, i, 0) for r, (i, _) in enumerate(queue)],
                     len(queue))
    shared = len(template_prefix(tok))
    assert prefilled[0] == shared
    assert sum(prefilled) == shared + sum(len(p) - 1 - shared for p in prompts)


@pytest.mark.parametrize("settings", [dict(greedy=True), dict()], ids=["greedy", "sampled"])
def test_prefix_and_whole_prefill_give_the_same_tokens(model, tok, prompts, prefilled_whole,
                                                       settings):
    shared = generate(model, tok, prompts, 3, config(), seeds=SEEDS, **settings)
    prefilled_whole()
    whole = generate(model, tok, prompts, 3, config(), seeds=SEEDS, **settings)
    assert completions(shared) == completions(whole)
    for a, b in zip(log_probs(shared), log_probs(whole), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_samples_with_the_prefix_do_not_depend_on_batching_or_sharding(model, tok, prompts,
                                                                       dtype):
    model = copy.deepcopy(model).to(dtype)
    full = completions(generate(model, tok, prompts, 4, config(batch_size=64), seeds=SEEDS))
    reordered = completions(generate(model, tok, prompts[::-1], 4, config(batch_size=3),
                                     seeds=SEEDS[::-1]))
    halves = [completions(generate(model, tok, prompts[k::2], 4, config(batch_size=5),
                                   seeds=SEEDS[k::2])) for k in (0, 1)]
    assert reordered[::-1] == full
    assert halves[0] == full[0::2] and halves[1] == full[1::2]
    alone = completions(generate(model, tok, [prompts[3]], 4, config(batch_size=1),
                                 seeds=[SEEDS[3]]))
    assert alone[0] == full[3]


def test_prompts_without_the_prefix_sample_as_before(model, tok, prompts, prefilled_whole):
    # Raw text, the prefix plus one token (nothing to prefill past it), and a templated prompt
    # in one call: only the last takes the shared prefix.
    prefix = template_prefix(tok)
    mixed = [tok.encode("What is 2+2?"), prefix + tok.encode("Z"), prompts[0]]
    seeds = [7, 8, 9]
    with_prefix = generate(model, tok, mixed, 3, config(), seeds=seeds)
    prefilled_whole()
    whole = generate(model, tok, mixed, 3, config(), seeds=seeds)
    assert completions(with_prefix) == completions(whole)
    for a, b in zip(log_probs(with_prefix)[:2], log_probs(whole)[:2], strict=True):
        np.testing.assert_array_equal(a, b)  # the same computation: bit for bit



def test_a_tool_runs_prompts_share_its_tool_prompt_and_sample_as_whole(model, tok,
                                                                        prefilled_whole):
    from raftlm.agents.chat_format import ChatFormat
    from raftlm.agents.tools import load_tools

    chat = ChatFormat(tok, load_tools(["calculator"]))
    prefix = chat.shared_prefix()
    tool_prompts = [chat.prompt_ids(text) for text in TEXTS]
    assert len(prefix) > 10 * len(template_prefix(tok))  # the tool prompt, not just a header
    assert all(p[: len(prefix)] == prefix and len(p) > len(prefix) for p in tool_prompts)
    assert chat.shared_prefix("Be brief.") != prefix  # the run's system prompt is part of it
    shared = generate(model, tok, tool_prompts, 2, config(), seeds=SEEDS, shared_prefix=prefix)
    halves = [generate(model, tok, tool_prompts[k::2], 2, config(batch_size=3),
                       seeds=SEEDS[k::2], shared_prefix=prefix) for k in (0, 1)]
    assert completions(halves[0]) == completions(shared)[0::2]
    assert completions(halves[1]) == completions(shared)[1::2]
    prefilled_whole()
    whole = generate(model, tok, tool_prompts, 2, config(), seeds=SEEDS, shared_prefix=[])
    assert completions(shared) == completions(whole)
