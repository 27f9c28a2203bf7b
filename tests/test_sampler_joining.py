"""Prompts joining a running sampler call (a server's continuous batching) sample the tokens
a call of their own samples, whenever they join: into free rows, into a batch that had
shrunk, with a prompt longer than any before (the KV cache grows)."""

from __future__ import annotations

import io

import pytest
import torch

from raftlm.run.progress import decode_progress
from raftlm.sampling.fast import sample

TEXTS = ["What is 2+2?", "hi", "A much longer prompt, to force the cache to grow.", "xyz", "Z"]
SEEDS = [11, 22, 33, 44, 55]
MAX_NEW = 40  # no eos: every sample runs MAX_NEW steps, so the joining steps are known


def run(model, tok, prompts, counts, seeds, more=None, batch_size=4):
    with torch.inference_mode():
        return sample(model, tok, prompts, counts, seeds=seeds, max_new_tokens=MAX_NEW,
                      eos_ids=set(), temperature=0.9, batch_size=batch_size, more=more)


def tokens(rows):
    """Each sample's token ids and finish reason."""
    return [[(ids, reason) for ids, reason, _ in row] for row in rows]


@pytest.fixture(scope="module")
def prompts(tok):
    return [tok.encode(t) for t in TEXTS]


def test_joining_prompts_sample_as_in_a_call_of_their_own(model, tok, prompts):
    step = [0]
    joins = {3: [(prompts[2], 3, SEEDS[2])],  # into free rows: the batch widens
             # after the first two finished (step 40) and the batch shrank
             50: [(prompts[3], 2, SEEDS[3]), (prompts[4], 1, SEEDS[4])]}

    def more():
        step[0] += 1
        return joins.get(step[0], [])

    joined = run(model, tok, prompts[:2], [1, 1], SEEDS[:2], more)
    alone = [run(model, tok, [p], [n], [s], batch_size=64)[0]
             for p, n, s in zip(prompts, [1, 1, 3, 2, 1], SEEDS)]
    assert step[0] > 50
    assert tokens(joined) == tokens(alone)
    for row, row_alone in zip(joined, alone):
        for (_, _, log_probs), (_, _, log_probs_alone) in zip(row, row_alone):
            # The log-sum-exp over a batch's logits rounds with its width, as in any call.
            assert log_probs == pytest.approx(log_probs_alone, abs=1e-5)


def test_a_call_without_joining_prompts_asks_and_samples_as_before(model, tok, prompts):
    asked = []
    with_more = run(model, tok, prompts, [2] * 5, SEEDS, lambda: asked.append(1) or [])
    assert with_more == run(model, tok, prompts, [2] * 5, SEEDS)
    assert len(asked) >= MAX_NEW


def test_joining_samples_grow_the_progress_bars_total(model, tok, prompts):
    """The bar of a call that turns join counts them: it ends at N/N, never N/?."""
    joins = {3: [(prompts[2], 3, SEEDS[2])]}
    step = [0]

    def more():
        step[0] += 1
        return joins.get(step[0], [])

    bar = decode_progress(total=2, max_new_tokens=MAX_NEW, desc="rollout", file=io.StringIO())
    with torch.inference_mode():
        sample(model, tok, prompts[:2], [1, 1], seeds=SEEDS[:2], max_new_tokens=MAX_NEW,
               eos_ids=set(), temperature=0.9, batch_size=4, more=more, progress=bar)
    assert bar.total == 5 and bar.finished == 5
