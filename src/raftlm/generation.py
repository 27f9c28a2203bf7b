"""Sampling responses: one entry point, three backends.

``generate`` takes tokenized prompts and returns ``num_samples`` completions per prompt.
``config.backend`` picks who decodes:

- ``raftlm``: the fast sampler in ``raftlm.sampler`` (shared prefill, in-place KV cache,
  continuous batching, counter-based randomness: the same seeds give the same samples however
  prompts are batched or sharded);
- ``hf``: plain ``model.generate`` with left padding, as users usually write it;
- ``vllm``: ``raftlm.vllm_backend``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from raftlm.config import GenerationConfig
from raftlm.sampler import report_progress, sample


@dataclass
class Completion:
    text: str  # decoded response (special tokens skipped), cut right after a stop string
    token_ids: list[int]  # generated ids, with the eos or the token that completed a stop string
    finish_reason: str  # "eos" | "stop_string" | "length"


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
) -> list[list[Completion]]:
    """Sample ``num_samples`` completions for each tokenized prompt (chat template applied).

    Returns, per prompt in order, its ``num_samples`` completions. ``seeds[i]`` fixes prompt i's
    samples (raftlm backend: whatever the batching or sharding); by default they derive from
    ``torch.initial_seed()`` and the prompt index. ``greedy`` decodes by argmax.
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
    if not prompts or num_samples == 0:
        return [[] for _ in prompts]
    if config.backend == "vllm":
        from raftlm.vllm_backend import generate_vllm

        return generate_vllm(model, tokenizer, prompts, num_samples, config, seeds=seeds,
                             greedy=greedy, desc=desc, max_new_tokens=max_new)
    if config.backend not in ("raftlm", "hf"):
        raise ValueError(f"generation.backend: expected raftlm, hf or vllm, got {config.backend!r}")

    eos_ids = eos_token_ids(model, tokenizer)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(prompts) * num_samples, desc=desc, unit="seq", leave=False)
    try:
        with torch.inference_mode():
            if config.backend == "raftlm":
                raw = sample(
                    model, tokenizer, prompts, num_samples, seeds=seeds, max_new_tokens=max_new,
                    eos_ids=eos_ids, temperature=config.temperature, top_p=config.top_p,
                    top_k=config.top_k, greedy=greedy, stop_strings=config.stop_strings,
                    batch_size=config.batch_size, progress=bar,
                )
            else:
                raw = _generate_hf(model, tokenizer, prompts, num_samples, config, seeds, greedy,
                                   max_new, eos_ids, bar)
    finally:
        bar.close()
        if was_training:
            model.train()
    return [
        [_completion(tokenizer, ids, reason, config.stop_strings) for ids, reason in row]
        for row in raw
    ]


def eos_token_ids(model, tokenizer) -> set[int]:
    """The tokenizer's eos plus the model's generation-config eos (an int or a list)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_config = getattr(model, "generation_config", None)
    extra = getattr(gen_config, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif extra is not None:
        ids.update(int(e) for e in extra)
    return ids


def _generate_hf(model, tokenizer, prompts, num_samples, config, seeds, greedy, max_new, eos_ids,
                 bar) -> list[list[tuple[list[int], str]]]:
    """``model.generate`` on left-padded batches of about ``config.batch_size`` sequences."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
    per_batch = max(1, config.batch_size // max(1, num_samples))
    returns = 1 if greedy else num_samples  # HF refuses several greedy returns: they'd be equal
    options = dict(max_new_tokens=max_new, num_return_sequences=returns, pad_token_id=pad,
                   eos_token_id=sorted(eos_ids), do_sample=not greedy)
    if not greedy:
        options.update(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k)
    if config.stop_strings:
        options.update(stop_strings=list(config.stop_strings), tokenizer=tokenizer)
    results = []
    for start in range(0, len(prompts), per_batch):
        batch = prompts[start : start + per_batch]
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(batch):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        # HF samples from the global RNG; seeding per batch at least makes runs repeatable.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seeds[start])
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 **options)
        new = out[:, width:].tolist()
        new_tokens = 0
        for row in range(len(batch)):
            rows = new[row * returns : (row + 1) * returns] * (num_samples // returns)
            results.append([_cut(ids, eos_ids, config.stop_strings, tokenizer) for ids in rows])
            new_tokens += sum(len(ids) for ids, _ in results[-1])
        report_progress(bar, new_tokens, len(batch) * num_samples)
    return results


def _cut(ids: list[int], eos_ids: set[int], stops: Sequence[str], tokenizer
         ) -> tuple[list[int], str]:
    """Trim HF's padded output after the first eos or the token completing a stop string."""
    end = next((t + 1 for t, token in enumerate(ids) if token in eos_ids), None)
    if end is not None:
        ids = ids[:end]
    if stops and _stop_end(tokenizer.decode(ids, skip_special_tokens=True), stops) is not None:
        # The shortest prefix whose text holds a stop string (containment grows with length).
        low, high = 1, len(ids)
        while low < high:
            mid = (low + high) // 2
            text = tokenizer.decode(ids[:mid], skip_special_tokens=True)
            low, high = (low, mid) if _stop_end(text, stops) is not None else (mid + 1, high)
        return ids[:low], "stop_string"
    return ids, ("eos" if end is not None else "length")


def _stop_end(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string in ``text`` ends, or None."""
    ends = [text.find(s) + len(s) for s in stops if s in text]
    return min(ends) if ends else None


def _completion(tokenizer, ids: list[int], reason: str, stops: Sequence[str]) -> Completion:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if reason == "stop_string":
        end = _stop_end(text, stops)
        text = text if end is None else text[:end]
    return Completion(text=text, token_ids=list(ids), finish_reason=reason)
