"""KV kept across sampler calls: a continued sequence prefills only what the store does not
hold, and samples what re-prefilling it whole samples (fp32, tiny model)."""

import dataclasses

import numpy as np
import torch

import raftlm.sampling.generate as generate_module
from raftlm.agents import roll_out
from raftlm.config import GenerationConfig, RaftConfig
from raftlm.data.prompts import build_prompt_set
from raftlm.sampling.generate import generate
from raftlm.sampling.kept_kv import KeepKV, KVStore

CONFIG = GenerationConfig(max_new_tokens=12, temperature=1.0)
PROMPT = [1, 40, 41, 42, 43, 44, 45, 46, 2]
OBSERVATION = [1, 50, 51, 52, 53, 2]  # what a tool appends between turns


def first_turns(model, tok, store, count=2):
    """`count` samples of PROMPT, each kept in `store` as sequence j."""
    [row] = generate(model, tok, [PROMPT], count, CONFIG, seeds=[7],
                     keep_kv=KeepKV(store, lambda i, j: j))
    return row


def next_turns(model, tok, contexts, store=None):
    keep = None if store is None else KeepKV(store, lambda r, _: r)
    rows = generate(model, tok, contexts, 1, CONFIG, seeds=[11 + r for r in range(len(contexts))],
                    keep_kv=keep)
    return [row[0] for row in rows]


def assert_same_samples(kept, prefilled):
    for a, b in zip(kept, prefilled, strict=True):
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.token_log_probs, b.token_log_probs, atol=1e-5)


def test_a_finished_sample_leaves_its_kv_for_all_its_tokens_but_the_last(tok, model):
    store = KVStore()
    row = first_turns(model, tok, store)
    for j, sample in enumerate(row):
        held = store.held[j]
        assert held.ids == PROMPT + sample.token_ids[:-1]
        assert {keys.shape[1] for keys, _ in held.layers} == {len(held.ids)}


def test_a_continued_sample_is_the_sample_of_its_whole_context_prefilled(tok, model):
    store = KVStore()
    contexts = [PROMPT + s.token_ids + OBSERVATION for s in first_turns(model, tok, store)]
    assert_same_samples(next_turns(model, tok, contexts, store), next_turns(model, tok, contexts))
    assert set(store.held) == {0, 1}  # the second turns kept in their turn


def test_a_continued_sequence_prefills_only_the_tokens_the_store_does_not_hold(tok, model):
    store = KVStore()
    contexts = [PROMPT + s.token_ids + OBSERVATION for s in first_turns(model, tok, store)]
    forwarded = []
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: forwarded.append(tuple(kwargs["input_ids"].shape)),
        with_kwargs=True)
    try:
        next_turns(model, tok, contexts, store)
    finally:
        hook.remove()
    prefills = [shape for shape in forwarded if shape[1] > 1]
    # Each row alone: the last turn's final token and the observation but its last token.
    assert prefills == [(1, len(OBSERVATION))] * 2


def test_a_turn_cut_shorter_continues_from_the_prefix_it_shares_with_the_store(tok, model):
    store = KVStore()
    contexts = [PROMPT + s.token_ids[:3] + OBSERVATION for s in first_turns(model, tok, store)]
    assert all(len(held.ids) > len(PROMPT) + 3 for held in store.held.values())
    assert_same_samples(next_turns(model, tok, contexts, store), next_turns(model, tok, contexts))


def test_the_hf_backend_takes_nothing_from_the_store_and_keeps_nothing(tok, model):
    store = KVStore()
    generate(model, tok, [PROMPT], 2, dataclasses.replace(CONFIG, backend="hf"), seeds=[7],
             keep_kv=KeepKV(store, lambda i, j: j))
    assert len(store) == 0


def test_a_store_keeps_nothing_past_its_limit_and_frees_what_it_hands_over():
    layers = [(torch.zeros(2, 4, 8), torch.zeros(2, 4, 8))]  # 512 bytes
    store = KVStore(limit_bytes=600)
    store.keep("a", [1, 2, 3, 4], layers)
    store.keep("b", [1, 2, 3, 4], layers)
    assert "b" not in store and store.size == 512
    assert store.take("a").ids == [1, 2, 3, 4] and store.size == 0
    store.keep("b", [1, 2, 3, 4], layers)
    assert "b" in store


def test_sequences_past_the_stores_limit_are_prefilled_whole_at_their_next_turn(tok, model):
    store = KVStore(limit_bytes=0)
    contexts = [PROMPT + s.token_ids + OBSERVATION for s in first_turns(model, tok, store)]
    assert len(store) == 0
    assert next_turns(model, tok, contexts, store) == next_turns(model, tok, contexts)


COUNTER = '''
class Counter:
    def reset(self, prompt, **row):
        self.steps = 0

    def step(self, action):
        self.steps += 1
        return f"step {self.steps}", None, self.steps >= 3
'''


def test_a_rollout_continuing_each_trajectorys_kv_equals_one_re_prefilling_every_turn(
        tok, model, tmp_path, monkeypatch):
    (tmp_path / "envs.py").write_text(COUNTER)
    config = RaftConfig.from_dict({
        "data": {"task": "arithmetic"}, "run": {"seed": 3},
        "generation": {"max_new_tokens": 12},
        "rollout": {"environment": f"{tmp_path / 'envs.py'}:Counter", "max_turns": 4,
                    "max_trajectory_tokens": 400}})
    rows = [{"prompt": f"What is {i} * 7?", "answer": str(7 * i)} for i in range(2)]
    records = build_prompt_set(rows, tok, prompt_field="prompt", max_prompt_tokens=4096,
                               system_prompt=None, source="test").records
    kept = roll_out(model, tok, records, [2, 2], config, 1).rows
    raftlm = generate_module.GENERATION_BACKENDS["raftlm"]
    monkeypatch.setitem(generate_module.GENERATION_BACKENDS, "raftlm",
                        dataclasses.replace(raftlm, keeps_kv=False))
    prefilled = roll_out(model, tok, records, [2, 2], config, 1).rows
    trajectories = [(a, b) for row_a, row_b in zip(kept, prefilled) for a, b in zip(row_a, row_b)]
    assert all(sum(t["role"] == "assistant" for t in a.turns) == 3 for a, _ in trajectories)
    for a, b in trajectories:
        assert (a.token_ids, a.loss_mask, a.turns) == (b.token_ids, b.loss_mask, b.turns)
        np.testing.assert_allclose(a.token_log_probs, b.token_log_probs, atol=1e-5)

