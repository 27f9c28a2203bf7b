"""Sampling responses: one entry point, three backends.

``generate`` takes tokenized prompts and returns ``num_samples`` completions per prompt.
``config.backend`` picks who decodes:

- ``raftlm``: the fast sampler in ``raftlm.sampling.fast`` (shared prefill, in-place KV cache,
  continuous batching, counter-based randomness: the same seeds give the same samples however
  prompts are batched or sharded);
- ``hf``: plain ``model.generate`` with left padding, as users usually write it;
- ``vllm``: ``raftlm.sampling.vllm``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from raftlm.config import GenerationConfig
from raftlm.models.distributed import gather, shard
from raftlm.run.progress import progress
from raftlm.sampling.completion import Completion, eos_token_ids, to_completion
from raftlm.sampling.fast import sample
from raftlm.sampling.hf import generate_hf


def generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    num_samples: int,
    config: GenerationConfig,
    *,
    seeds: Sequence[int] | None = None,
    greedy: bool = False,
    desc: str = "generate",
    max_new_tokens: int | None = None,
    with_greedy: bool = False,
    done: Mapping[tuple[int, int], Completion] | None = None,
    on_finish: Callable[[int, int, Completion], None] | None = None,
) -> list[list[Completion]]:
    """Sample ``num_samples`` completions for each tokenized prompt (chat template applied).

    Returns, per prompt in order, its ``num_samples`` completions. ``seeds[i]`` fixes prompt i's
    samples (raftlm backend: whatever the batching or sharding); by default they derive from
    ``torch.initial_seed()`` and the prompt index. ``greedy`` decodes by argmax.
    ``with_greedy`` puts the greedy completion first in each prompt's list, before the
    ``num_samples`` samples (the raftlm backend decodes both in one pass, sharing the prefill).
    Completions carry ``token_log_probs`` (raftlm and hf backends).
    ``on_finish(i, j, completion)`` is called as each sample finishes. ``done[(i, j)]`` are
    samples finished earlier (resume): the raftlm backend returns them instead of sampling them
    again, which gives the same result since its samples depend on nothing else; the other
    backends seed per batch, so they sample everything again.
    """
    max_new = max_new_tokens if max_new_tokens is not None else config.max_new_tokens
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty")
    if seeds is None:
        base = torch.initial_seed() % 2**62
        seeds = [base + i for i in range(len(prompts))]
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
    if not prompts or num_samples + with_greedy == 0:
        return [[] for _ in prompts]
    if with_greedy and (greedy or config.backend != "raftlm"):
        first = generate(model, tokenizer, prompts, 1, config, seeds=seeds, greedy=True,
                         desc=desc, max_new_tokens=max_new)
        rest = generate(model, tokenizer, prompts, num_samples, config, seeds=seeds,
                        greedy=greedy, desc=desc, max_new_tokens=max_new)
        return [a + b for a, b in zip(first, rest, strict=True)]
    if config.backend == "vllm":
        from raftlm.sampling.vllm import generate_vllm

        rows = generate_vllm(model, tokenizer, prompts, num_samples, config, seeds=seeds,
                             greedy=greedy, desc=desc, max_new_tokens=max_new)
        return _report_all(rows, on_finish)
    if config.backend not in ("raftlm", "hf"):
        raise ValueError(f"generation.backend: expected raftlm, hf or vllm, got {config.backend!r}")

    eos_ids = eos_token_ids(model, tokenizer)
    done = done if config.backend == "raftlm" else {}
    finished = None if on_finish is None else (
        lambda i, j, raw: on_finish(i, j, _completion(tokenizer, raw, config)))
    was_training = model.training
    model.eval()
    per_prompt = num_samples + int(with_greedy)
    bar = progress(total=len(prompts) * per_prompt, desc=desc, unit="seq", leave=False)
    try:
        with torch.inference_mode():
            if config.backend == "raftlm":
                raw = sample(
                    model, tokenizer, prompts, per_prompt, seeds=seeds, max_new_tokens=max_new,
                    eos_ids=eos_ids, temperature=config.temperature, top_p=config.top_p,
                    top_k=config.top_k, greedy=greedy, stop_strings=config.stop_strings,
                    batch_size=config.batch_size, greedy_first=int(with_greedy), progress=bar,
                    skip=set(done or ()), on_finish=finished,
                )
            else:
                raw = generate_hf(model, tokenizer, prompts, num_samples, config, seeds, greedy,
                                   max_new, eos_ids, bar)
    finally:
        bar.close()
        if was_training:
            model.train()
    rows = [[done[(i, j)] if sample is None else _completion(tokenizer, sample, config)
             for j, sample in enumerate(row)] for i, row in enumerate(raw)]
    return rows if config.backend == "raftlm" else _report_all(rows, on_finish)


def _completion(tokenizer: Any, raw: tuple[list[int], str, list[float] | None],
                config: GenerationConfig) -> Completion:
    ids, reason, log_probs = raw
    return to_completion(tokenizer, ids, reason, config.stop_strings, log_probs)


def _report_all(rows: list[list[Completion]],
                on_finish: Callable[[int, int, Completion], None] | None) -> list[list[Completion]]:
    """Backends without a per-sample hook report their samples once they all are done."""
    if on_finish is not None:
        for i, row in enumerate(rows):
            for j, completion in enumerate(row):
                on_finish(i, j, completion)
    return rows


def generate_sharded(model: Any, tokenizer: Any, prompts: list[list[int]], num_samples: int,
                     config: Any, *, seeds: Sequence[int] | None = None, **options: Any) -> list:
    """`generate` with the prompts split over processes and the completions
    gathered back. Pass `seeds` (one per prompt) for samples independent of the split."""
    mine = shard(range(len(prompts)))
    local_seeds = None if seeds is None else [seeds[i] for i in mine]
    # Called even for an empty share: a backend may join collectives (vLLM's engine start).
    local = generate(model, tokenizer, [prompts[i] for i in mine], num_samples, config,
                     seeds=local_seeds, **options)
    return gather(local)


def sample_seeds(run_seed: int, stage: int, prompt_ids: list[int]) -> list[int]:
    """One sampling seed per prompt from (run seed, stage, prompt id): independent of batching
    and sharding, so a prompt gets the same candidates however the work is split."""
    return [
        int(np.random.SeedSequence([run_seed, stage, pid]).generate_state(1, np.uint64)[0] >> 1)
        for pid in prompt_ids
    ]
