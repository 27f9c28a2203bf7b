"""raftlm's fast sampler: continuous batching over a pre-allocated KV cache.

This module holds the batch's rows (which (prompt, sample) each decodes) and the token choice;
`decoding.py` the model side (prefill, decode step, KV cache, attention, packed weights).

Measured with ``benchmarks/generation.py`` (SmolLM2-135M, 2 CPU cores, K=8, batch 64):

- Each prompt is prefilled once, all tokens but its last, and its KV copied into the rows of its
  K samples (prefilling per sample ran at 0.6-0.7x). The last prompt token is each row's first
  decode input, so no full-vocabulary logits are computed for prompt positions. Prompts of equal
  length are prefilled together, unpadded (fp32: 2.6x faster than one forward per prompt for
  64 arithmetic prompts on 2 cores). The chat template's turns before the user's text, the
  same in every prompt (`shared_prefix.py`), are prefilled once per call and each prompt from
  there on (the default arithmetic prompts: 24 of 40 tokens).
- Rows refill: when a sample finishes, the next (prompt, sample) takes its row, so the batch
  stays full until the queue runs dry; after that, running rows move into the slots of finished
  ones and the batch shrinks, so no step computes an idle row.
- The KV cache is pre-allocated, [rows, kv_heads, max_len, head_dim] per layer, and a decode step
  writes one column per row in place, each row at its own length (refilling needs that; HF's
  DynamicCache instead re-allocates the whole cache at every step).
- nn.Linear weights are packed for oneDNN once per call (fp32 1.5x, bf16 1.15x).
- Decode attention is our own (bf16 1.13x over SDPA, and batch-invariant, see below).
- Sampling is a softmax and an inverse CDF in vocabulary order: no sort unless top-k/top-p ask.
- Each chosen token's log-prob under the distribution it was drawn from, log softmax(z / T)
  (T = 1 for greedy rows; before top-k/top-p truncation), is recorded on the way (a logsumexp
  per row): consumers (pi_old of the ratio objectives, KL) need no second forward pass. At
  T = 1 that is the policy's own log pi.

Samples depend on (seed, sample index, step) and the prompt only, not on the batch: the uniform
u for each token is a counter-based hash of those three, the token is the inverse CDF of the
filtered softmax at u, and the model's numbers for a row do not depend on its neighbours (no
padding; our decode attention; never a one-row matmul; fp32 matmul rows computed alike whatever
the row count). So sharding or reordering prompts gives the same samples, bit for bit, in fp32.
In bf16 that holds only as far as the CPU's kernels compute rows alike: oneDNN's AMX kernels
(Intel Xeon 4th gen and later) round differently above about 32 rows, so there bf16 samples can
depend on the batch width.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from raftlm.run.progress import count_decoded, count_finished, count_joined, count_prefilled
from raftlm.sampling.choice import choose_tokens, pick_tokens, uniform
from raftlm.sampling.decoding import (
    PromptKV,
    SlotCache,
    check_supported,
    decode_step,
    packed_linears,
)
from raftlm.sampling.kept_kv import ContinuedKV, KeepKV
from raftlm.sampling.shared_prefix import template_prefix

__all__ = ["choose_tokens", "sample", "uniform"]

# (generated token ids, finish reason, log-prob of each token under the distribution sampled
# from: log softmax(logits / T), T = 1 for greedy rows, before top-k/top-p truncation)
Sample = tuple[list[int], str, list[float]]


def sample(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    num_samples: Sequence[int],
    *,
    seeds: Sequence[int],
    max_new_tokens: int,
    eos_ids: set[int],
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    greedy: bool = False,
    stop_strings: Sequence[str] = (),
    batch_size: int = 64,
    greedy_first: int = 0,
    progress=None,
    skip: Collection[tuple[int, int]] = (),
    on_finish: Callable[[int, int, Sample], None] | None = None,
    on_token: Callable[[int, int, list[int]], None] | None = None,
    more: Callable[[], Sequence[tuple[Sequence[int], int, int]]] | None = None,
    keep_kv: KeepKV | None = None,
    shared_prefix: Sequence[int] | None = None,
) -> list[list[Sample | None]]:
    """Sample ``num_samples[i]`` continuations of prompt i; returns (token_ids, finish_reason,
    token_log_probs) each.

    Sample j of prompt i draws its uniforms from (``seeds[i]``, j, step) alone, so a prompt's
    first n samples are the same whatever its count. ``greedy`` decodes every sample by argmax;
    ``greedy_first`` > 0 decodes the first ``greedy_first`` of each prompt's samples by argmax
    and samples the rest as sample indices 0, 1, ... (the same samples as a call without them):
    greedy and sampled evaluation then share each prompt's prefill and batch. The caller
    sets eval mode and inference mode. ``progress``, a tqdm bar of samples, advances as samples
    finish; ``on_finish(i, j, sample)`` is called as each finishes, ``on_token(i, j, ids)``
    after each token of a sample that goes on (ids: its tokens so far; a streaming server
    sends them as they come). (prompt, sample) pairs in
    ``skip`` (finished earlier) are not sampled: their slots stay None.

    ``more()``, asked before each step and once more before the call would end (so it may
    wait there for what is still to join), returns prompts that join the call: (prompt, count,
    seed) each, numbered after the others in the order they came, their rows admitted as rows
    free up (continuous batching across a server's requests, an agent's next turns); they
    sample what a call of their own would, since a row depends on its (seed, sample index)
    alone.

    ``keep_kv`` continues and keeps sequences across calls (`raftlm.sampling.kept_kv`): a row
    whose sequence is in its store (joining rows too) prefills only what the store does not
    hold, and every row that finishes leaves its KV there.

    ``shared_prefix``: the tokens prefilled once per call (`shared_prefix.py`), the same in
    every call of a run; default: the chat template's turns before a user's text.
    """
    check_supported(model)
    prompts, num_samples, seeds = list(prompts), list(num_samples), list(seeds)
    queue = deque((i, j) for i, count in enumerate(num_samples) for j in range(count)
                  if (i, j) not in skip)
    results: list[list[Sample | None]] = [[None] * count for count in num_samples]
    if not queue:
        return results

    def new_row(i: int, j: int) -> _Row:
        return _Row(prompt=i, sample=j, seed=seeds[i], rng_index=max(j - greedy_first, 0),
                    greedy=greedy or j < greedy_first, pos=len(prompts[i]) - 1,
                    token=prompts[i][-1])

    def finish_reason(ids: list[int]) -> str | None:
        return _finish_reason(ids, eos_ids, list(stop_strings), tokenizer, max_new_tokens)

    device = next(model.parameters()).device
    # Never fewer than two rows: a one-row matmul takes oneDNN's GEMV path, which rounds
    # differently, and a sample would then depend on whether it ran alone.
    batch = _Batch(max(2, min(batch_size, len(queue))))
    cache = SlotCache(model.config.get_text_config().num_hidden_layers,
                      max_len=max(len(p) for p in prompts) + max_new_tokens + 2)
    on_prefill = None if progress is None else (
        lambda tokens, seconds: count_prefilled(progress, tokens, seconds))
    continued = ContinuedKV(model, prompts, keep_kv, queue, device, on_prefill)
    prompt_kv = PromptKV(model, prompts, [q for q in queue if q not in continued], device,
                         on_prefill=on_prefill, shared_prefix=(
                             template_prefix(tokenizer) if shared_prefix is None
                             else shared_prefix))
    filters = dict(temperature=temperature, top_p=top_p, top_k=top_k)
    with packed_linears(model, device):
        while True:
            if more is not None:  # asked before each step, and before the call ends
                joined = _join(more(), prompts, num_samples, seeds, results, queue, prompt_kv,
                               continued)
                if joined:
                    if progress is not None:  # the bar's total counts every joined turn
                        count_joined(progress, sum(num_samples[-len(joined):]))
                    cache.grow(max(len(p) for p in joined) + max_new_tokens + 2)
                    batch.widen(max(2, min(batch_size, len(batch.running()) + len(queue))))
            if not (queue or batch.running()):
                break
            admitted = batch.admit(queue, new_row)
            if admitted:
                prompt_kv.copy_into(cache, [a for a in admitted if a[1:] not in continued],
                                    batch.width)
                continued.copy_into(cache, [a for a in admitted if a[1:] in continued],
                                    batch.width)
            logits = decode_step(model, cache, *batch.inputs(device))
            chosen, log_probs = _choose(logits, batch, filters)
            if progress is not None:
                count_decoded(progress, len(batch.running()))  # a token for each running row
            finished = batch.advance(chosen, log_probs, finish_reason)
            if on_token is not None:  # the rows left are the ones that took a token and go on
                for row in batch.rows:
                    if row is not None:
                        on_token(row.prompt, row.sample, row.ids)
            for r, row, reason in finished:
                continued.keep(cache, r, row.prompt, row.sample, row.ids)
                results[row.prompt][row.sample] = (row.ids, reason, row.log_probs)
                if on_finish is not None:
                    on_finish(row.prompt, row.sample, results[row.prompt][row.sample])
                if progress is not None:
                    count_finished(progress, 1, len(row.ids))
            if not queue:
                # Nothing left to refill with: idle rows still cost compute, so the batch
                # shrinks to the rows still running.
                cache.move_rows(batch.shrink(), device)
    return results


def _join(new: Sequence[tuple[Sequence[int], int, int]], prompts: list, num_samples: list,
          seeds: list, results: list, queue: deque, prompt_kv: PromptKV,
          continued: ContinuedKV) -> list[list[int]]:
    """Append the prompts `more()` returned to the call's lists and queue; returns them. A
    joining sample whose sequence the store holds (an agent's next turn) continues from it."""
    joined = []
    for prompt, count, seed in new:
        if not prompt:
            raise ValueError("a joining prompt is empty")
        i = len(prompts)
        prompts.append(list(prompt))
        num_samples.append(count)
        seeds.append(seed)
        results.append([None] * count)
        queue.extend((i, j) for j in range(count))
        fresh = count - sum(continued.add(i, j) for j in range(count))
        if fresh:
            prompt_kv.add(i, fresh)
        joined.append(prompts[i])
    return joined


@dataclass
class _Row:
    """One (prompt, sample) being decoded: everything a row of the batch carries.

    A row is created whole on admission and moved whole on compaction, so no per-row field can
    fall out of step with the others.
    """

    prompt: int  # i
    sample: int  # j, the sample's index among its prompt's samples
    seed: int  # the prompt's seed
    rng_index: int  # the sample index the uniforms are drawn for (greedy ones not counted)
    greedy: bool
    pos: int  # tokens cached = position of the next input token
    token: int  # the next input token
    ids: list[int] = field(default_factory=list)  # generated so far
    log_probs: list[float] = field(default_factory=list)  # one per generated id


class _Batch:
    """The rows decoded together, each holding a `_Row` or free (None)."""

    def __init__(self, width: int):
        self.rows: list[_Row | None] = [None] * width

    @property
    def width(self) -> int:
        return len(self.rows)

    def running(self) -> list[int]:
        return [r for r, row in enumerate(self.rows) if row is not None]

    def admit(self, queue: deque[tuple[int, int]], new_row: Callable[[int, int], _Row]
              ) -> list[tuple[int, int, int]]:
        """Fill free rows, lowest first, from the head of ``queue``; returns the
        (row, prompt, sample) admitted."""
        free = [r for r, row in enumerate(self.rows) if row is None]
        admitted = [(r, *queue.popleft()) for r in free[: len(queue)]]
        for r, i, j in admitted:
            self.rows[r] = new_row(i, j)
        return admitted

    def inputs(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's next input token and its position (0 and 0 for a free row)."""
        tokens = np.array([0 if row is None else row.token for row in self.rows], dtype=np.int64)
        pos = np.array([0 if row is None else row.pos for row in self.rows], dtype=np.int64)
        return torch.from_numpy(tokens).to(device), torch.from_numpy(pos).to(device)

    def choice_inputs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per row: greedy, seed, sample index and step of the uniforms (free rows: greedy)."""
        rows = [_FREE if row is None else row for row in self.rows]
        return (np.array([row.greedy for row in rows], dtype=bool),
                np.array([row.seed for row in rows], dtype=np.uint64),
                np.array([row.rng_index for row in rows], dtype=np.uint64),
                np.array([len(row.ids) for row in rows], dtype=np.uint64))

    def advance(self, chosen: torch.Tensor, log_probs: torch.Tensor,
                finish_reason: Callable[[list[int]], str | None]
                ) -> list[tuple[int, _Row, str]]:
        """Append each running row's chosen token; free the rows that finished and return
        them with their slots and finish reasons."""
        finished = []
        for r, (token, log_prob) in enumerate(zip(chosen.tolist(), log_probs.tolist())):
            row = self.rows[r]
            if row is None:
                continue
            row.ids.append(token)
            row.log_probs.append(log_prob)
            reason = finish_reason(row.ids)
            if reason is None:
                row.pos, row.token = row.pos + 1, token
            else:
                finished.append((r, row, reason))
                self.rows[r] = None
        return finished

    def widen(self, width: int) -> None:
        """Add free rows up to `width` (prompts joined a batch that had shrunk)."""
        self.rows.extend([None] * (width - self.width))

    def shrink(self) -> list[tuple[int, int]]:
        """Move the running rows into the lowest slots and drop the free rows past them (never
        below two rows); returns the (source, destination) moves the KV cache must follow."""
        running = self.running()
        width = max(len(running), 2)
        if width >= self.width:
            return []
        free = [r for r in range(width) if self.rows[r] is None]
        moves = list(zip([r for r in running if r >= width], free))
        for src, dst in moves:
            self.rows[dst] = self.rows[src]
        del self.rows[width:]
        return moves


# What a free row feeds the token choice: its output is discarded.
_FREE = _Row(prompt=-1, sample=-1, seed=0, rng_index=0, greedy=True, pos=0, token=0)


def _choose(logits: torch.Tensor, batch: _Batch, filters: dict[str, Any]
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's next token and its log-prob under the distribution it was drawn from:
    log softmax(z / T) for sampled rows, log softmax(z) for greedy ones; before top-k/top-p."""
    greedy, *rng = batch.choice_inputs()
    chosen = pick_tokens(logits, greedy, *rng, **filters)
    scaled = logits.float()
    if filters["temperature"] != 1.0:
        temperature = np.where(greedy, 1.0, filters["temperature"]).astype(np.float32)
        scaled = scaled / torch.from_numpy(temperature).to(scaled.device)[:, None]
    # One reduction over the vocabulary, no [rows, vocab] output.
    log_probs = scaled.gather(-1, chosen[:, None]) - torch.logsumexp(scaled, -1, keepdim=True)
    return chosen, log_probs[:, 0]


def _finish_reason(ids: list[int], eos_ids: set[int], stops: list[str], tokenizer,
                   max_new_tokens: int) -> str | None:
    if ids[-1] in eos_ids:
        return "eos"
    if stops:
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if any(s in text for s in stops):
            return "stop_string"
    if len(ids) >= max_new_tokens:
        return "length"
    return None
