"""Generation: raftlm samples like HF (greedy, distributions, stops) and depends only on seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import tiny_llama_config
from transformers import LlamaForCausalLM
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from raftlm.config import GenerationConfig
from raftlm.sampling.completion import Completion
from raftlm.sampling.fast import choose_tokens, uniform
from raftlm.sampling.generate import generate

TEXTS = ["What is 2+2?", "hi", "A much longer prompt, to force padding.", "xyz", "Z"]


@pytest.fixture(scope="module")
def prompts(tok):
    return [tok.encode(t) for t in TEXTS]


def config(**overrides) -> GenerationConfig:
    return GenerationConfig(**{"max_new_tokens": 12, **overrides})


def clone(model: LlamaForCausalLM) -> LlamaForCausalLM:
    copy = LlamaForCausalLM(model.config).eval()
    copy.load_state_dict(model.state_dict())
    return copy


def hf_greedy(model, prompt: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    """Reference: HF greedy on the prompt alone (no padding at all)."""
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=2, **kwargs)
    return out[0, len(prompt):].tolist()


def ids_of(result: list[list[Completion]]) -> list[list[list[int]]]:
    return [[c.token_ids for c in row] for row in result]


@pytest.mark.parametrize("batch_size", [64, 2])
def test_greedy_equals_hf_greedy_for_prompts_of_different_lengths(model, tok, prompts,
                                                                  batch_size):
    out = generate(model, tok, prompts, 2, config(max_new_tokens=20, batch_size=batch_size),
                   greedy=True)
    assert [[c.token_ids for c in row] for row in out] == [[hf_greedy(model, p, 20)] * 2
                                                           for p in prompts]


def test_greedy_with_eager_attention_equals_hf_greedy(model, tok, prompts):
    eager = LlamaForCausalLM(tiny_llama_config(len(tok), initializer_range=0.3,
                                               attn_implementation="eager")).eval()
    eager.load_state_dict(model.state_dict())
    out = generate(eager, tok, prompts, 1, config(), greedy=True)
    assert [row[0].token_ids for row in out] == [hf_greedy(eager, p, 12) for p in prompts]


def test_hf_backend_greedy_with_left_padding_equals_unpadded_greedy(model, tok, prompts):
    out = generate(model, tok, prompts, 1, config(max_new_tokens=20, backend="hf"), greedy=True)
    assert [row[0].token_ids for row in out] == [hf_greedy(model, p, 20) for p in prompts]


def test_greedy_with_lora_model_equals_hf_greedy(model, tok, prompts):
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(
        LlamaForCausalLM(model.config).eval(),
        peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    ).eval()
    out = generate(lora, tok, prompts, 1, config(), greedy=True)
    assert [row[0].token_ids for row in out] == [hf_greedy(lora, p, 12) for p in prompts]


def test_bf16_model_samples_valid_tokens(model, tok, prompts):
    half = clone(model).to(torch.bfloat16)
    out = generate(half, tok, prompts, 3, config(), seeds=[0, 1, 2, 3, 4])
    assert all(len(c.token_ids) == 12 or c.finish_reason == "eos" for row in out for c in row)
    assert all(0 <= t < len(tok) for row in out for c in row for t in c.token_ids)


def reference_probs(model, prefix: list[int], temperature=1.0, top_k=0, top_p=1.0) -> np.ndarray:
    """The next-token distribution after HF's own logits warpers."""
    with torch.no_grad():
        logits = model(torch.tensor([prefix])).logits[:, -1].float()
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    return torch.softmax(warpers(torch.tensor([prefix]), logits), -1)[0].numpy()


def chi_square_ok(counts: np.ndarray, probs: np.ndarray) -> bool:
    """Pearson chi-square against ``probs``, far from rejection (about 5 sigma)."""
    assert counts[probs == 0].sum() == 0, "sampled a token the filters removed"
    expected = probs * counts.sum()
    big = expected >= 5  # merge sparse bins so the chi-square approximation holds
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat, dof = ((obs - exp) ** 2 / exp).sum(), len(obs) - 1
    return stat < dof + 5 * np.sqrt(2 * dof)


@pytest.mark.parametrize(
    "settings",
    [
        dict(temperature=1.0),
        dict(temperature=0.7),
        dict(temperature=1.5, top_k=8),
        dict(temperature=1.0, top_p=0.8),
        dict(temperature=0.8, top_k=20, top_p=0.9),
    ],
    ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()),
)
def test_first_token_follows_the_filtered_softmax(model, tok, prompts, settings):
    n = 20000
    out = generate(model, tok, [prompts[0]], n, config(max_new_tokens=1, batch_size=4096,
                                                       **settings), seeds=[7])
    counts = np.bincount([c.token_ids[0] for c in out[0]], minlength=len(tok))
    assert chi_square_ok(counts, reference_probs(model, prompts[0], **settings))


def test_first_token_test_detects_a_wrong_temperature(model, tok, prompts):
    out = generate(model, tok, [prompts[0]], 20000,
                   config(max_new_tokens=1, batch_size=4096, temperature=0.7), seeds=[7])
    counts = np.bincount([c.token_ids[0] for c in out[0]], minlength=len(tok))
    assert not chi_square_ok(counts, reference_probs(model, prompts[0], temperature=1.0))


def test_second_token_follows_the_conditional_softmax(model, tok, prompts):
    out = generate(model, tok, [prompts[1]], 20000, config(max_new_tokens=2, batch_size=4096),
                   seeds=[3])
    firsts = np.array([c.token_ids[0] for c in out[0]])
    common = int(np.bincount(firsts).argmax())
    seconds = [c.token_ids[1] for c in out[0] if c.token_ids[0] == common]
    assert len(seconds) > 2000
    counts = np.bincount(seconds, minlength=len(tok))
    assert chi_square_ok(counts, reference_probs(model, prompts[1] + [common]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_seeds_give_same_samples_whatever_the_batching(model, tok, prompts, dtype):
    model = clone(model).to(dtype)
    seeds = [11, 22, 33, 44, 55]
    full = ids_of(generate(model, tok, prompts, 5, config(batch_size=64), seeds=seeds))
    reordered = ids_of(generate(model, tok, prompts[::-1], 5, config(batch_size=3),
                                seeds=seeds[::-1]))
    alone = ids_of(generate(model, tok, [prompts[2]], 5, config(batch_size=1), seeds=[33]))
    first = ids_of(generate(model, tok, [prompts[2]], 1, config(), seeds=[33]))
    assert reordered[::-1] == full
    assert alone[0] == full[2]
    assert first[0][0] == full[2][0]


def test_prompts_of_one_length_prefilled_together_sample_as_alone(model, tok):
    # Equal lengths: the sampler prefills these prompts in one forward (fp32).
    rng = np.random.default_rng(0)
    same_length = [rng.integers(3, len(tok), size=9).tolist() for _ in range(6)]
    seeds = list(range(100, 106))
    together = ids_of(generate(model, tok, same_length, 3, config(batch_size=8), seeds=seeds))
    alone = [ids_of(generate(model, tok, [p], 3, config(batch_size=8), seeds=[s]))[0]
             for p, s in zip(same_length, seeds)]
    assert together == alone
    greedy = ids_of(generate(model, tok, same_length, 1, config(), greedy=True))
    assert [row[0] for row in greedy] == [hf_greedy(model, p, 12) for p in same_length]


def test_samples_of_one_prompt_differ_and_seeds_matter(model, tok, prompts):
    a = ids_of(generate(model, tok, [prompts[0]], 4, config(), seeds=[1]))[0]
    b = ids_of(generate(model, tok, [prompts[0]], 4, config(), seeds=[2]))[0]
    assert len({tuple(ids) for ids in a}) == 4
    assert a != b


def test_default_seeds_follow_torch_manual_seed(model, tok, prompts):
    torch.manual_seed(5)
    a = ids_of(generate(model, tok, prompts, 2, config()))
    torch.manual_seed(5)
    assert ids_of(generate(model, tok, prompts, 2, config())) == a


def with_extra_eos(model, token: int) -> LlamaForCausalLM:
    """A copy of ``model`` whose generation config adds ``token`` as an eos id."""
    copy = clone(model)
    copy.generation_config.eos_token_id = [2, token]
    return copy


def fresh_token_at(ids: list[int], start: int) -> tuple[int, int]:
    """The first position >= start whose token did not occur before, and that token."""
    t = next(t for t in range(start, len(ids)) if ids[t] not in ids[:t])
    return t, ids[t]


@pytest.mark.parametrize("backend", ["raftlm", "hf"])
def test_eos_stops_and_is_kept_in_token_ids(model, tok, prompts, backend):
    ref = hf_greedy(model, prompts[0], 20)
    t, eos = fresh_token_at(ref, 3)
    stopping = with_extra_eos(model, eos)
    [[done]] = generate(stopping, tok, [prompts[0]], 1, config(max_new_tokens=20,
                                                                backend=backend), greedy=True)
    assert done.finish_reason == "eos"
    assert done.token_ids == ref[: t + 1]
    assert done.text == tok.decode(ref[: t + 1], skip_special_tokens=True)


def test_sampled_completions_end_at_their_first_eos(model, tok, prompts):
    ref = hf_greedy(model, prompts[0], 20)
    stopping = with_extra_eos(model, fresh_token_at(ref, 1)[1])
    eos = set(stopping.generation_config.eos_token_id)
    out = generate(stopping, tok, prompts, 16, config(temperature=2.0), seeds=[0, 1, 2, 3, 4])
    reasons = {c.finish_reason for row in out for c in row}
    assert reasons == {"eos", "length"}
    for c in (c for row in out for c in row):
        assert all(t not in eos for t in c.token_ids[:-1])
        assert (c.token_ids[-1] in eos) == (c.finish_reason == "eos")
        assert c.finish_reason == "eos" or len(c.token_ids) == 12


@pytest.mark.parametrize("backend", ["raftlm", "hf"])
def test_stop_string_cuts_text_and_tokens_like_hf(model, tok, prompts, backend):
    ref = hf_greedy(model, prompts[0], 20)
    text = tok.decode(ref, skip_special_tokens=True)
    t, _ = fresh_token_at(ref, 4)
    stop = tok.decode(ref[t - 1 : t + 1])  # two characters, the second one new
    [[done]] = generate(model, tok, [prompts[0]], 1,
                        config(max_new_tokens=20, backend=backend, stop_strings=[stop]),
                        greedy=True)
    assert done.finish_reason == "stop_string"
    assert done.token_ids == ref[: t + 1]
    assert done.text == text[: text.index(stop) + len(stop)]


@pytest.mark.parametrize("backend", ["raftlm", "hf"])
def test_max_new_tokens_ends_with_reason_length(model, tok, prompts, backend):
    out = generate(model, tok, prompts, 2, config(backend=backend), max_new_tokens=5,
                   greedy=True)
    assert all(len(c.token_ids) == 5 and c.finish_reason == "length" for r in out for c in r)


def test_hf_backend_returns_num_samples_completions_per_prompt(model, tok, prompts):
    out = generate(model, tok, prompts[:3], 4, config(backend="hf", batch_size=5), seeds=[1, 2, 3])
    assert [len(row) for row in out] == [4, 4, 4]
    assert all(isinstance(c, Completion) and c.finish_reason in {"eos", "length"}
               for row in out for c in row)


def test_generation_leaves_the_model_modules_unpatched(model, tok, prompts):
    generate(model, tok, prompts[:1], 2, config(max_new_tokens=2))
    assert not any("forward" in vars(m) for m in model.modules())


def test_generation_restores_training_mode(model, tok, prompts):
    model.train()
    try:
        generate(model, tok, prompts[:1], 1, config(max_new_tokens=2))
        assert model.training
    finally:
        model.eval()


def test_inverse_cdf_never_picks_a_zero_probability_token():
    logits = torch.tensor([[0.0, -float("inf"), 1.0, -float("inf")]] * 3)
    u = torch.tensor([0.0, 0.5, 1 - 2**-53], dtype=torch.float64)
    chosen = choose_tokens(logits, u, temperature=1.0, top_p=1.0, top_k=0).tolist()
    assert chosen == [0, 2, 2]


def test_counter_based_uniforms_are_deterministic_and_distinct():
    seed, sample, step = (np.array(v, dtype=np.uint64) for v in ([1, 1, 1, 2], [0, 1, 0, 0],
                                                                  [0, 0, 1, 0]))
    u = uniform(seed, sample, step)
    assert np.array_equal(u, uniform(seed, sample, step))
    assert len(set(u.tolist())) == 4 and ((u >= 0) & (u < 1)).all()
    many = uniform(np.zeros(100000, np.uint64), np.zeros(100000, np.uint64),
                   np.arange(100000, dtype=np.uint64))
    assert abs(many.mean() - 0.5) < 0.005

