"""The `hf` backend: plain `model.generate` on left-padded batches, as users usually write it."""

from __future__ import annotations

import torch

from raftlm.sampling.completion import cut_at_stop, report_progress


def generate_hf(model, tokenizer, prompts, num_samples: list[int], config, seeds, greedy,
                max_new, eos_ids, bar) -> list[list[tuple[list[int], str, list[float]]]]:
    """``model.generate`` on left-padded batches of about ``config.batch_size`` sequences;
    ``num_samples[i]`` samples of prompt i; returns (token ids, finish reason, log-probs of
    the ids) per sample."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
    options = dict(max_new_tokens=max_new, pad_token_id=pad, eos_token_id=sorted(eos_ids),
                   do_sample=not greedy,
                   # The raw logits (HF's `scores` are after temperature/top-k/top-p).
                   output_logits=True, return_dict_in_generate=True)
    if not greedy:
        options.update(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k)
    if config.stop_strings:
        options.update(stop_strings=list(config.stop_strings), tokenizer=tokenizer)
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
        # HF samples from the global RNG; seeding per batch at least makes runs repeatable.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seeds[start])
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 num_return_sequences=returns, **options)
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
        report_progress(bar, new_tokens, len(batch) * count)
    return results


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
