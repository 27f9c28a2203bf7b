"""KV kept between sampler calls, so a sequence continued later — an agent's trajectory after
its tool answered — prefills only the tokens it does not hold yet.

A caller that continues sequences (`raftlm.agents.roll_out`) keeps one `KVStore` for its calls
and hands each call a `KeepKV`: which stored sequence sample j of prompt i is. A row that
finishes leaves its KV in the store (every token but its last, which it never fed); a row whose
sequence is in the store starts from that KV: the longest prefix its prompt shares with the
held tokens is copied in, and only the rest (the last turn's final token and the observation)
is prefilled on top, one forward per row. The store holds one entry per sequence between
calls; an admitted row takes its entry out, so a sequence's KV lives in the store or in a
batch row, never in both. A store holds at most `limit_bytes` (default `KEEP_BYTES`); a sequence
that would pass it is not kept and is prefilled whole at its next turn (the same tokens up to
rounding, see below): a stage of many long trajectories (SmolLM2-135M in fp32: 46 KB a token)
never holds more than that between turns.

The continued KV equals re-prefilling the whole sequence up to the kernels' rounding: the held
part was written by decode steps, a re-prefill computes it in one forward (fp32 on CPU: the
same tokens, log-probs within 1e-5 on the tests' tiny model). A row still depends on its own
sequence alone, never on its batch: the prefill on top is a forward of that row by itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache

from raftlm.models.loading import cache_keyword, forward_cache
from raftlm.sampling.decoding import SlotCache

KEEP_BYTES = 8 * 2**30
LayerKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values) [kv_heads, n, dim]


@dataclass
class Held:
    """One sequence's KV: of `ids`, position by position."""

    ids: list[int]
    layers: LayerKV


@dataclass
class KVStore:
    """Sequences' KV between sampler calls, by the caller's key (a trajectory's (prompt,
    sample)). The caller drops a sequence it will not continue."""

    limit_bytes: int = KEEP_BYTES
    held: dict[Hashable, Held] = field(default_factory=dict)
    size: int = 0  # bytes held

    def keep(self, key: Hashable, ids: list[int], layers: LayerKV) -> None:
        """Hold a sequence's KV (replacing what `key` held), unless that passes the limit."""
        self.drop(key)
        size = sum(k.nbytes + v.nbytes for k, v in layers)
        if self.size + size <= self.limit_bytes:
            self.held[key] = Held(ids, layers)
            self.size += size

    def take(self, key: Hashable) -> Held | None:
        """Hand over a sequence's KV (None when not held); the store forgets it."""
        held = self.held.pop(key, None)
        if held is not None:
            self.size -= sum(k.nbytes + v.nbytes for k, v in held.layers)
        return held

    def drop(self, key: Hashable) -> None:
        """Forget a sequence that will not be continued."""
        self.take(key)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.held

    def __len__(self) -> int:
        return len(self.held)


@dataclass(frozen=True)
class KeepKV:
    """A sampler call's use of a store: sample j of prompt i (indices of the call) is stored
    sequence `key(i, j)`, continued from the store when there and kept there when it ends.
    Keys are distinct within a call (one row per sequence)."""

    store: KVStore
    key: Callable[[int, int], Hashable]


class ContinuedKV:
    """A sampler call's side of `KeepKV`: which of its (prompt, sample) rows continue a stored
    sequence, their KV copied in on admission, and every finished row's KV kept (nothing
    without a `KeepKV`)."""

    def __init__(self, model: torch.nn.Module, prompts: Sequence[Sequence[int]],
                 keep: KeepKV | None, queue: Collection[tuple[int, int]], device: torch.device,
                 on_prefill: Callable[[int, float], None] | None = None):
        self.model, self.prompts, self.keep_kv, self.device = model, prompts, keep, device
        self.on_prefill = on_prefill  # (tokens, seconds) of each prefill on top of a store's KV
        self.rows: set[tuple[int, int]] = set()
        for row in queue:
            self.add(*row)

    def add(self, i: int, j: int) -> bool:
        """Whether sample j of prompt i continues a stored sequence (then it is one of the
        call's continued rows)."""
        held = self.keep_kv is not None and self.keep_kv.key(i, j) in self.keep_kv.store
        if held:
            self.rows.add((i, j))
        return held

    def __contains__(self, row: tuple[int, int]) -> bool:
        return row in self.rows

    def copy_into(self, cache: SlotCache, taken: list[tuple[int, int, int]], width: int
                  ) -> None:
        """Fill each batch row of ``taken`` = [(row, prompt, sample)] with its sequence's KV:
        the store's, and the prompt's tokens past it prefilled on top."""
        for r, i, j in taken:
            held = self.keep_kv.store.take(self.keep_kv.key(i, j))
            if len(self.prompts[i]) == 1:
                continue  # nothing to cache: the only token is the first decode input
            start = time.perf_counter()
            layers, prefilled = continued_kv(self.model, held, self.prompts[i], self.device)
            cache.fill([r], layers, width)
            if prefilled and self.on_prefill is not None:
                self.on_prefill(prefilled, time.perf_counter() - start)

    def keep(self, cache: SlotCache, r: int, i: int, j: int, ids: list[int]) -> None:
        """Keep the KV of batch row r, sample j of prompt i, which finished with `ids`: every
        token but the last, which was never fed."""
        if self.keep_kv is not None:
            length = len(self.prompts[i]) + len(ids) - 1
            self.keep_kv.store.keep(self.keep_kv.key(i, j), list(self.prompts[i]) + ids[:-1],
                                    cache.row_kv(r, length))


def continued_kv(model: torch.nn.Module, held: Held, prompt: Sequence[int],
                 device: torch.device) -> tuple[LayerKV, int]:
    """The KV of `prompt[:-1]` (its last token is the row's first decode input): the held KV of
    the prefix the prompt shares with `held.ids`, the rest prefilled on top of it; and how many
    tokens that prefilled."""
    n = len(prompt) - 1
    same = _common_prefix(held.ids, prompt, n)
    layers = [(keys[:, :same], values[:, :same]) for keys, values in held.layers]
    if same == n:
        return layers, 0
    options = {}
    if same:
        options[cache_keyword(model)] = DynamicCache([(k[None], v[None]) for k, v in layers])
    ids = torch.tensor([list(prompt[same:n])], device=device)
    positions = torch.arange(same, n, device=device)[None]
    out = model(input_ids=ids, position_ids=positions, use_cache=True, logits_to_keep=1,
                **options)
    return [(layer.keys[0], layer.values[0]) for layer in forward_cache(out).layers], n - same


def _common_prefix(held: list[int], prompt: Sequence[int], limit: int) -> int:
    """How many leading tokens, at most `limit`, the two share (a turn cut to the trajectory's
    budget holds fewer tokens than the row that sampled it)."""
    limit = min(limit, len(held))
    for k in range(limit):
        if held[k] != prompt[k]:
            return k
    return limit
