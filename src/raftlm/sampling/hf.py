"""The `hf` backend: plain `model.generate` on left-padded batches, as users usually write it."""

from __future__ import annotations

import torch

from raftlm.sampling.completion import cut_at_stop, report_progress


def generate_hf(model, tokenizer, prompts, num_samples, config, seeds, greedy, max_new, eos_ids,
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
            results.append([cut_at_stop(ids, eos_ids, config.stop_strings, tokenizer)
                            for ids in rows])
            new_tokens += sum(len(ids) for ids, _ in results[-1])
        report_progress(bar, new_tokens, len(batch) * num_samples)
    return results


