"""The `hf` backend: plain `model.generate` on left-padded batches, as users usually write it.

Two things make it sample what raftlm's sampler samples from the same config:

- HF's `generate` fills every setting a call leaves out from the checkpoint's
  `generation_config.json` (`repetition_penalty`, `min_p`, `no_repeat_ngram_size`, its own
  `top_k`, ...), which would act on sampling while π_old is recorded from the raw logits / T.
  Each call runs under a generation config that holds our settings and nothing else.
- HF draws every row of a batch from one global RNG, so a sample would depend on its batch. The
  token is chosen instead by a logits processor, `RowSampler`: raftlm's token choice
  (`choose_tokens`: temperature, top-k, top-p, inverse CDF) at the counter-based uniform of
  (prompt seed, sample index, step), which leaves HF one token to draw. A sample then depends
  on its prompt's seed and index alone, whatever the batch, the batch size or the shard, up to
  the model's numbers (left padding rounds a row's logits differently, so a token whose
  uniform falls within rounding of a CDF boundary can differ; rare in fp32).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from raftlm.run.progress import count_finished
from raftlm.sampling.choice import choose_tokens, uniform
from raftlm.sampling.completion import cut_at_stop


def generate_hf(model, tokenizer, prompts, num_samples: list[int], config, seeds, greedy,
                max_new, eos_ids, bar) -> list[list[tuple[list[int], str, list[float]]]]:
    """``model.generate`` on left-padded batches of about ``config.batch_size`` sequences;
    ``num_samples[i]`` samples of prompt i; returns (token ids, finish reason, log-probs of
    the ids) per sample."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
    options: dict[str, Any] = dict(
        max_new_tokens=max_new, pad_token_id=pad, eos_token_id=sorted(eos_ids),
        # Sampled rows: RowSampler picks the token from the raw logits and HF draws it; HF's
        # own warpers stay off (T = 1, no top-k/top-p), or they would filter twice.
        do_sample=not greedy, temperature=1.0, top_k=0, top_p=1.0,
        # The raw logits (HF's `scores` are after the processors).
        output_logits=True, return_dict_in_generate=True)
    if config.stop_strings:
        options.update(stop_strings=list(config.stop_strings))
    results: list[list[tuple[list[int], str, list[float]]]] = []
    for start, end in _batches(num_samples, config.batch_size):
        count = num_samples[start]
        if count == 0:
            results.extend([] for _ in range(start, end))
            continue
        batch = prompts[start:end]
        returns = 1 if greedy else count  # HF refuses several greedy returns: they'd be equal
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(batch):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        processors = LogitsProcessorList(
            [] if greedy else [RowSampler(seeds[start:end], count, width, config)])
        # HF still draws the one token left from the global RNG: leave that RNG as it was.
        with only_these_settings(model), \
                torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device),
                generation_config=GenerationConfig(**options, num_return_sequences=returns),
                logits_processor=processors, tokenizer=tokenizer)
        generated = out.sequences[:, width:]
        # Recorded under the distribution sampled from: logits / T (greedy: T = 1).
        log_probs = _token_log_probs(out.logits, generated,
                                     1.0 if greedy else config.temperature).tolist()
        new = generated.tolist()
        new_tokens = 0
        for row in range(len(batch)):
            rows = range(row * returns, (row + 1) * returns)
            cut = [(*cut_at_stop(new[r], eos_ids, config.stop_strings, tokenizer), log_probs[r])
                   for r in rows] * (count // returns)
            results.append([(ids, reason, lp[: len(ids)]) for ids, reason, lp in cut])
            new_tokens += sum(len(ids) for ids, _, _ in results[-1])
        count_finished(bar, len(batch) * count, new_tokens, decoded=False)
    return results


class RowSampler(LogitsProcessor):
    """Chooses each row's next token as raftlm's sampler does and leaves HF only that one.

    Row r of a `generate` call with ``count`` returns per prompt is sample r % count of prompt
    r // count (HF repeats each prompt ``count`` times in place); its uniform comes from (that
    prompt's seed, sample index, tokens generated so far).
    """

    def __init__(self, seeds: list[int], count: int, prompt_width: int, config: Any):
        self.seeds = np.repeat(np.array(seeds, dtype=np.uint64), count)
        self.samples = np.tile(np.arange(count, dtype=np.uint64), len(seeds))
        self.prompt_width = prompt_width
        self.filters = dict(temperature=config.temperature, top_p=config.top_p,
                            top_k=config.top_k)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        steps = np.full(len(self.seeds), input_ids.shape[1] - self.prompt_width, dtype=np.uint64)
        u = torch.from_numpy(uniform(self.seeds, self.samples, steps)).to(scores.device)
        chosen = choose_tokens(scores, u, **self.filters)
        only = torch.full_like(scores, float("-inf"))
        return only.scatter_(-1, chosen[:, None], 0.0)


@contextmanager
def only_these_settings(model: Any) -> Iterator[None]:
    """Run `generate` with the settings it is given and nothing from the checkpoint's
    generation config.

    HF fills a setting the call leaves out (None) from the model's own generation config, so
    that config is swapped for a bare one for the call (on the transformers model under a
    PEFT wrapper, whose `generate` is the one that runs).
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    usual = inner.generation_config
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = usual


def _batches(num_samples: list[int], batch_size: int) -> list[tuple[int, int]]:
    """(start, end) of runs of consecutive prompts with one sample count (one
    ``num_return_sequences`` per ``generate`` call), about ``batch_size`` sequences each."""
    batches: list[tuple[int, int]] = []
    start = 0
    while start < len(num_samples):
        count = num_samples[start]
        end = start + 1
        while (end < len(num_samples) and num_samples[end] == count
               and end - start < max(1, batch_size // max(1, count))):
            end += 1
        batches.append((start, end))
        start = end
    return batches


def _token_log_probs(step_logits: tuple[torch.Tensor, ...], generated: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """log softmax(raw logits / temperature) (fp32) of each step at the generated token:
    [rows, steps]."""
    # Step by step: stacking would hold a second [rows, steps, vocab] copy.
    columns = [torch.log_softmax(_scaled(logits.float(), temperature), dim=-1)
               .gather(-1, generated[:, t, None]) for t, logits in enumerate(step_logits)]
    return torch.cat(columns, dim=-1)


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits if temperature == 1.0 else logits / temperature
