"""Sampling responses: one entry point, three backends.

``generate`` takes tokenized prompts and returns ``num_samples`` completions per prompt (one
count for all, or one per prompt). ``config.backend`` picks who decodes, by name, from
``GENERATION_BACKENDS``:

- ``raftlm``: the fast sampler in ``raftlm.sampling.fast`` (shared prefill, in-place KV cache,
  continuous batching, counter-based randomness: the same seeds give the same samples however
  prompts are batched or sharded; an agent's trajectory keeps its KV between turns,
  ``raftlm.sampling.kept_kv``);
- ``hf``: plain ``model.generate`` with left padding, as users usually write it;
- ``vllm``: ``raftlm.sampling.vllm`` (its engine's prefix caching finds a trajectory's
  earlier turns itself).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from raftlm.config import GenerationConfig
from raftlm.models.distributed import gather, shard
from raftlm.run.progress import decode_progress
from raftlm.sampling import vllm as vllm_backend
from raftlm.sampling.completion import Completion, eos_token_ids, to_completion
from raftlm.sampling.fast import sample
from raftlm.sampling.hf import generate_hf
from raftlm.sampling.kept_kv import KeepKV

OnFinish = Callable[[int, int, Completion], None]
OnToken = Callable[[int, int, list[int]], None]  # (prompt, sample, its token ids so far)
# Asked between decode steps: prompts that join a running call, (prompt, count, seed) each.
More = Callable[[], Sequence[tuple[Sequence[int], int, int]]]


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
    on_finish: OnFinish | None = None,
    on_token: OnToken | None = None,
    more: More | None = None,
    keep_kv: KeepKV | None = None,
    shared_prefix: Sequence[int] | None = None,
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
    samples finished earlier (a resumed or an extended round): a backend that
    ``keeps_done`` (raftlm) returns them instead of sampling them again, which gives the same
    result since its samples depend on nothing else, and samples only the rest (entries past
    a prompt's count are ignored); the other backends sample everything again.
    ``on_token(i, j, ids)`` is called after each token of a sample that goes on (raftlm
    backend; the others report whole samples only, through ``on_finish``). ``more()`` is
    asked between decode steps, and once more before the call would end (it may wait there
    for prompts still to come), for prompts that join the call, (prompt, count, seed) each:
    they are numbered after ``prompts`` in the order they came and returned after them, each
    with what a call of its own would give (raftlm backend; the others never ask, so a caller
    keeps what it would have handed over for a later call).
    ``keep_kv`` keeps each sample's KV in its store when the sample ends, and a prompt whose
    sample is there continues from it, prefilling only its new tokens (a backend that
    ``keeps_kv``, raftlm; the others prefill every prompt whole). ``shared_prefix``: the
    tokens the raftlm backend prefills once per call (default: the chat template's before a
    user's text; a multi-turn run's with its tools, `ChatFormat.shared_prefix`).
    """
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty")
    counts = sample_counts(num_samples, len(prompts))
    if seeds is None:
        base = torch.initial_seed() % 2**62
        seeds = [base + i for i in range(len(prompts))]
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
    backend = GENERATION_BACKENDS.get(config.backend)
    if backend is None:
        raise ValueError(f"generation.backend: expected one of {', '.join(GENERATION_BACKENDS)},"
                         f" got {config.backend!r}")
    request = GenerationRequest(
        prompts=prompts, counts=counts, seeds=list(seeds), config=config, greedy=greedy,
        with_greedy=with_greedy, desc=desc,
        max_new_tokens=max_new_tokens if max_new_tokens is not None else config.max_new_tokens,
        done=dict(done or {}) if backend.keeps_done else {}, on_finish=on_finish,
        on_token=on_token, more=more, keep_kv=keep_kv if backend.keeps_kv else None,
        shared_prefix=shared_prefix)
    return backend.generate(model, tokenizer, request)


@dataclass(frozen=True)
class GenerationRequest:
    """One `generate` call, as every backend receives it (counts and seeds one per prompt)."""

    prompts: list[list[int]]
    counts: list[int]
    seeds: list[int]
    config: GenerationConfig
    greedy: bool
    with_greedy: bool
    desc: str
    max_new_tokens: int
    done: Mapping[tuple[int, int], Completion]
    on_finish: OnFinish | None
    on_token: OnToken | None = None
    more: More | None = None
    keep_kv: KeepKV | None = None
    shared_prefix: Sequence[int] | None = None  # None: the chat template's (raftlm backend)

    def per_prompt(self) -> list[int]:
        """Completions to return per prompt: the greedy one (``with_greedy``) and the samples."""
        return [count + int(self.with_greedy) for count in self.counts]


Rows = list[list[Completion]]  # per prompt, its completions
Decode = Callable[[Any, Any, GenerationRequest], Rows]  # (model, tokenizer, request) -> rows


@dataclass(frozen=True)
class GenerationBackend:
    """A way to decode: the function `generate` hands each request to, and what callers may
    ask about it without comparing backend names."""

    generate: Decode
    # Samples depend on (seed, prompt, sample index) alone: `done` samples are returned, not
    # drawn again, so a resumed or extended round gives what one uninterrupted call gives.
    keeps_done: bool
    # Raises a ConfigError saying what this backend misses on this machine (before any load).
    check_available: Callable[[], None] = lambda: None
    # Records each sampled token's log-prob (pi_old, the entropy, GVM's gradient norms).
    records_log_probs: bool = True
    # Continues a sequence from the KV a call before it kept (`keep_kv`): an agent's next turn
    # prefills its new tokens only, not the whole trajectory again.
    keeps_kv: bool = False


def _generate_raftlm(model: Any, tokenizer: Any, request: GenerationRequest) -> Rows:
    """raftlm's sampler: greedy and sampled completions in one pass, done samples kept."""
    per_prompt = request.per_prompt()
    if not any(per_prompt):
        return [[] for _ in request.prompts]
    config, on_finish = request.config, request.on_finish
    skip = {(i, j) for i, j in request.done if i < len(per_prompt) and j < per_prompt[i]}
    finished = None if on_finish is None else (
        lambda i, j, raw: on_finish(i, j, _completion(tokenizer, raw, config)))
    with _decoding(model, sum(per_prompt) - len(skip), request.max_new_tokens,
                   request.desc) as bar:
        raw = sample(
            model, tokenizer, request.prompts, per_prompt, seeds=request.seeds,
            max_new_tokens=request.max_new_tokens, eos_ids=eos_token_ids(model, tokenizer),
            temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
            greedy=request.greedy, stop_strings=config.stop_strings,
            batch_size=config.batch_size, greedy_first=int(request.with_greedy), progress=bar,
            skip=skip, on_finish=finished, on_token=request.on_token, more=request.more,
            keep_kv=request.keep_kv, shared_prefix=request.shared_prefix,
        )
    return [[request.done[(i, j)] if s is None else _completion(tokenizer, s, config)
             for j, s in enumerate(row)] for i, row in enumerate(raw)]


def _generate_hf(model: Any, tokenizer: Any, request: GenerationRequest) -> Rows:
    """HF ``model.generate``; the greedy completion of ``with_greedy`` in a pass of its own."""
    if request.with_greedy:
        return _greedy_then_sampled(_generate_hf, model, tokenizer, request)
    if not any(request.counts):
        return [[] for _ in request.prompts]
    with _decoding(model, sum(request.counts), request.max_new_tokens, request.desc) as bar:
        raw = generate_hf(model, tokenizer, request.prompts, request.counts, request.config,
                          request.seeds, request.greedy, request.max_new_tokens,
                          eos_token_ids(model, tokenizer), bar)
    rows = [[_completion(tokenizer, s, request.config) for s in row] for row in raw]
    return _report_all(rows, request.on_finish)


def _generate_vllm(model: Any, tokenizer: Any, request: GenerationRequest) -> Rows:
    """vLLM's engine; called even with nothing to sample, since its start and weight sync are
    collectives every process joins."""
    if request.with_greedy:
        return _greedy_then_sampled(_generate_vllm, model, tokenizer, request)
    rows = vllm_backend.generate_vllm(
        model, tokenizer, request.prompts, request.counts, request.config, seeds=request.seeds,
        greedy=request.greedy, desc=request.desc, max_new_tokens=request.max_new_tokens)
    return _report_all(rows, request.on_finish)


def _check_vllm() -> None:
    vllm_backend.check_vllm_available()  # never imports vLLM itself


# The generation backends by the name `generation.backend` gives (config lists these names).
GENERATION_BACKENDS: dict[str, GenerationBackend] = {
    "raftlm": GenerationBackend(_generate_raftlm, keeps_done=True, keeps_kv=True),
    "hf": GenerationBackend(_generate_hf, keeps_done=False),
    "vllm": GenerationBackend(_generate_vllm, keeps_done=False, check_available=_check_vllm,
                              records_log_probs=False),
}


def _greedy_then_sampled(backend: Decode, model: Any, tokenizer: Any, request: GenerationRequest
                         ) -> Rows:
    """``with_greedy`` for backends that decode it in a pass of its own: each prompt's greedy
    completion, then its samples."""
    alone = dataclasses.replace(request, with_greedy=False, on_finish=None)
    first = backend(model, tokenizer, dataclasses.replace(
        alone, counts=[1] * len(request.prompts), greedy=True))
    rest = backend(model, tokenizer, alone)
    return _report_all([a + b for a, b in zip(first, rest, strict=True)], request.on_finish)


@contextmanager
def _decoding(model: Any, total: int, max_new_tokens: int, desc: str) -> Iterator[Any]:
    """Eval and inference mode with a progress bar of ``total`` sequences (counted in tokens:
    `raftlm.run.progress.decode_progress`); the model's training mode comes back after."""
    was_training = model.training
    model.eval()
    bar = decode_progress(total, max_new_tokens, desc)
    try:
        with torch.inference_mode():
            yield bar
    finally:
        bar.close()
        if was_training:
            model.train()


def _completion(tokenizer: Any, raw: tuple[list[int], str, list[float] | None],
                config: GenerationConfig) -> Completion:
    ids, reason, log_probs = raw
    return to_completion(tokenizer, ids, reason, config.stop_strings, log_probs)


def _report_all(rows: Rows, on_finish: OnFinish | None) -> Rows:
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
