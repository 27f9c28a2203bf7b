"""Sampling responses: one entry point, three backends.

``generate`` takes tokenized prompts and returns ``num_samples`` completions per prompt (one
count for all, or one per prompt).
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
    num_samples: int | Sequence[int],
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
    """Sample completions for each tokenized prompt (chat template applied): ``num_samples``
    each, or ``num_samples[i]`` for prompt i.

    Returns, per prompt in order, its completions. ``seeds[i]`` fixes prompt i's samples; by
    default they derive from ``torch.initial_seed()`` and the prompt index. On the raftlm
    backend sample j of prompt i depends on (``seeds[i]``, j) alone, whatever the batching,
    sharding or counts: a prompt's first n samples are the same for any count >= n.
    ``greedy`` decodes by argmax. ``with_greedy`` puts the greedy completion first in each
    prompt's list, before its samples (the raftlm backend decodes both in one pass, sharing
    the prefill). Completions carry ``token_log_probs`` (raftlm and hf backends).
    ``on_finish(i, j, completion)`` is called as each sample finishes. ``done[(i, j)]`` are
    samples finished earlier (a resumed or an extended round): the raftlm backend returns them
    instead of sampling them again, which gives the same result since its samples depend on
    nothing else, and samples only the rest (entries past a prompt's count are ignored); the
    other backends seed per batch, so they sample everything again.
    """
    max_new = max_new_tokens if max_new_tokens is not None else config.max_new_tokens
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty")
    counts = sample_counts(num_samples, len(prompts))
    if seeds is None:
        base = torch.initial_seed() % 2**62
        seeds = [base + i for i in range(len(prompts))]
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
    if not prompts or not with_greedy and not any(counts):
        return [[] for _ in prompts]
    if with_greedy and (greedy or config.backend != "raftlm"):
        first = generate(model, tokenizer, prompts, 1, config, seeds=seeds, greedy=True,
                         desc=desc, max_new_tokens=max_new)
        rest = generate(model, tokenizer, prompts, counts, config, seeds=seeds,
                        greedy=greedy, desc=desc, max_new_tokens=max_new)
        return [a + b for a, b in zip(first, rest, strict=True)]
    if config.backend == "vllm":
        from raftlm.sampling.vllm import generate_vllm

        rows = generate_vllm(model, tokenizer, prompts, counts, config, seeds=seeds,
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
    per_prompt = [count + int(with_greedy) for count in counts]
    skip = {(i, j) for i, j in (done or ()) if i < len(prompts) and j < per_prompt[i]}
    bar = progress(total=sum(per_prompt) - len(skip), desc=desc, unit="seq", leave=False)
    try:
        with torch.inference_mode():
            if config.backend == "raftlm":
                raw = sample(
                    model, tokenizer, prompts, per_prompt, seeds=seeds, max_new_tokens=max_new,
                    eos_ids=eos_ids, temperature=config.temperature, top_p=config.top_p,
                    top_k=config.top_k, greedy=greedy, stop_strings=config.stop_strings,
                    batch_size=config.batch_size, greedy_first=int(with_greedy), progress=bar,
                    skip=skip, on_finish=finished,
                )
            else:
                raw = generate_hf(model, tokenizer, prompts, counts, config, seeds, greedy,
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


def generate_sharded(model: Any, tokenizer: Any, prompts: list[list[int]],
                     num_samples: int | Sequence[int], config: Any, *,
                     seeds: Sequence[int] | None = None, **options: Any) -> list:
    """`generate` with the prompts split over processes and the completions
    gathered back. Pass `seeds` (one per prompt) for samples independent of the split."""
    counts = sample_counts(num_samples, len(prompts))
    mine = shard(range(len(prompts)))
    local_seeds = None if seeds is None else [seeds[i] for i in mine]
    # Called even for an empty share: a backend may join collectives (vLLM's engine start).
    local = generate(model, tokenizer, [prompts[i] for i in mine], [counts[i] for i in mine],
                     config, seeds=local_seeds, **options)
    return gather(local)


def sample_counts(num_samples: int | Sequence[int], num_prompts: int) -> list[int]:
    """One sample count per prompt from ``num_samples`` (one count for all, or one each)."""
    counts = ([num_samples] * num_prompts if isinstance(num_samples, (int, np.integer))
              else list(num_samples))
    if len(counts) != num_prompts:
        raise ValueError(f"num_samples: got {len(counts)} counts for {num_prompts} prompts")
    for i, count in enumerate(counts):
        if not isinstance(count, (int, np.integer)) or isinstance(count, bool) or count < 0:
            raise ValueError(f"num_samples[{i}]: expected a count >= 0, got {count!r}")
    return [int(count) for count in counts]


def sample_seeds(run_seed: int, stage: int, prompt_ids: list[int]) -> list[int]:
    """One sampling seed per prompt from (run seed, stage, prompt id): independent of batching
    and sharding, so a prompt gets the same candidates however the work is split."""
    return [
        int(np.random.SeedSequence([run_seed, stage, pid]).generate_state(1, np.uint64)[0] >> 1)
        for pid in prompt_ids
    ]
