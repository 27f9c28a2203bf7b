"""The model side of raftlm's sampler: prefill, one decode step, the in-place KV cache.

`fast.sample` decides which (prompt, sample) each row holds and which token it takes; this module
computes the logits: each prompt's KV once (`PromptKV`; the chat template's shared prefix once
per call), copied into the rows of its samples; a decode step of one token per row, each row at
its own length, over a pre-allocated cache (`SlotCache`); attention whose result for a row does
not depend on the other rows; nn.Linear weights packed for oneDNN once per call
(`packed_linears`).
"""

from __future__ import annotations

import functools
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from raftlm.models.loading import attention_kinds, cache_keyword, forward_cache


@contextmanager
def packed_linears(model: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """On CPU, run the model's nn.Linear layers on oneDNN weights packed once for this call.

    The default CPU path re-lays out the weight on every call; at decode batch sizes that cost
    about a quarter of fp32 decoding. Packing takes ~0.3 s for 135 M parameters and holds a copy
    of the linear weights until the call ends.
    """
    ops = torch.ops.mkldnn
    usable = (device.type == "cpu" and torch.backends.mkldnn.is_available()
              and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise"))
    dtypes = set()
    if usable:
        dtypes = {torch.float32} | ({torch.bfloat16} if ops._is_mkldnn_bf16_supported() else set())
    # Exact nn.Linear only (not quantized subclasses), and none whose forward someone else
    # already wraps (accelerate hooks): ours is removed again at the end.
    modules = [m for m in model.modules() if type(m) is torch.nn.Linear
               and m.weight.dtype in dtypes and "forward" not in vars(m)]
    patched = []
    try:
        for module in modules:
            # A fixed batch hint: with a hint of 1, fp32 one-row products round differently.
            packed = ops._reorder_linear_weight(module.weight.detach(), 64)
            module.forward = functools.partial(_packed_linear, module, packed)
            patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward  # back to nn.Linear.forward


def _packed_linear(module: torch.nn.Linear, packed: torch.Tensor, x: torch.Tensor
                   ) -> torch.Tensor:
    if x.dtype != module.weight.dtype:  # e.g. an fp32 head on bf16 activations
        return torch.nn.functional.linear(x, module.weight, module.bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, module.bias, "none", [], "")


def check_supported(model: torch.nn.Module) -> None:
    kinds = attention_kinds(model)
    if kinds - {"full_attention"}:
        raise NotImplementedError(
            f"generation.backend=raftlm supports full-attention models only (this one has "
            f"{sorted(kinds)}); use generation.backend=hf"
        )


class PromptKV:
    """Prompt KV, computed once per prompt and copied into the rows of each of its samples.

    The prefill covers all prompt tokens but the last, which becomes the rows' first decode input.
    Prompts of one length are prefilled together, up to `PREFILL_TOKENS` per forward, in the
    order their rows are admitted: no padding, so each prompt's KV is what a forward of it alone
    gives wherever the kernels compute every row of a matmul alike (fp32 on CPU: checked by the
    tests). CPU bf16 kernels do not (oneDNN switches kernels by row count), so there each prompt
    is prefilled alone and a prompt's samples never depend on its neighbours.

    A prompt that starts with ``shared_prefix`` (the chat template's turns before the user's
    text, `raftlm.sampling.shared_prefix`) prefills only its tokens after it, on top of the
    prefix's KV, which a forward of the prefix alone computes once per call. Whether a prompt
    starts with it depends on the prompt alone, so its KV still does not depend on the call.
    ``on_prefill(tokens, seconds)`` hears of each prefill forward (a progress bar's rate).
    """

    def __init__(self, model, prompts: Sequence[Sequence[int]], queue: Collection[tuple[int, int]],
                 device: torch.device, on_prefill: Callable[[int, float], None] | None = None,
                 shared_prefix: Sequence[int] = ()):
        self.model, self.prompts, self.device = model, prompts, device
        self.on_prefill = on_prefill
        self.shared_prefix = list(shared_prefix)
        self.shared_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # [1, H, n, D]
        self.kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # per layer [H, n, D]
        self.left: dict[int, int] = {}  # rows of the prompt not yet admitted
        # Prompts not prefilled, per (prompt length, tokens taken from the shared prefix).
        self.waiting: dict[tuple[int, int], deque[int]] = {}
        for i, _ in queue:
            self.add(i, 1)
        dtype = next(model.parameters()).dtype
        self.together = not (device.type == "cpu" and dtype != torch.float32)

    def add(self, i: int, rows: int) -> None:
        """`rows` more rows of prompt i will be admitted (after those of every earlier prompt)."""
        self.left[i] = self.left.get(i, 0) + rows
        if self.left[i] == rows:
            self.waiting.setdefault(self._group(i), deque()).append(i)

    def copy_into(self, cache: SlotCache, taken: list[tuple[int, int, int]], width: int
                  ) -> None:
        """Fill the rows of ``taken`` = [(row, prompt, sample)] with their prompts' KV."""
        by_prompt: dict[int, list[int]] = {}
        for r, i, _ in taken:
            by_prompt.setdefault(i, []).append(r)
        for i, rows in by_prompt.items():
            self.left[i] -= len(rows)
            if len(self.prompts[i]) == 1:
                continue  # nothing to cache: the only token is the first decode input
            if i not in self.kv:
                self._prefill(i)
            cache.fill(rows, self.kv[i], width)
            if self.left[i] == 0:
                del self.kv[i]

    def _group(self, i: int) -> tuple[int, int]:
        """Prompt i's length, and how many of its first tokens take their KV from the shared
        prefix: all of it when the prompt starts with it and has tokens to prefill past it."""
        prompt, shared = self.prompts[i], len(self.shared_prefix)
        starts = len(prompt) - 1 > shared > 0 and list(prompt[:shared]) == self.shared_prefix
        return len(prompt), shared if starts else 0

    def _prefill(self, i: int) -> None:
        # Prompts are admitted in order, so `i` heads the queue of its group.
        length, shared = self._group(i)
        waiting = self.waiting[(length, shared)]
        assert waiting[0] == i
        # Counted in whole prompts, the shared prefix too: each holds that much KV until admitted.
        n = max(1, PREFILL_TOKENS // (length - 1)) if self.together else 1
        group = [waiting.popleft() for _ in range(min(n, len(waiting)))]
        ids = torch.tensor([self.prompts[j][shared:-1] for j in group], device=self.device)
        start = time.perf_counter()
        options = self._from_shared_prefix(len(group), length - 1) if shared else {}
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **options)
        for b, j in enumerate(group):
            self.kv[j] = [(layer.keys[b], layer.values[b]) for layer in forward_cache(out).layers]
        if self.on_prefill is not None:
            self.on_prefill(ids.numel(), time.perf_counter() - start)

    def _from_shared_prefix(self, rows: int, end: int) -> dict[str, object]:
        """A forward's arguments that go on from the shared prefix's KV, for `rows` sequences
        up to position `end`; the prefix itself is prefilled the first time."""
        shared = len(self.shared_prefix)
        if self.shared_kv is None:
            start = time.perf_counter()
            out = self.model(input_ids=torch.tensor([self.shared_prefix], device=self.device),
                             use_cache=True, logits_to_keep=1)
            self.shared_kv = [(layer.keys, layer.values) for layer in forward_cache(out).layers]
            if self.on_prefill is not None:
                self.on_prefill(shared, time.perf_counter() - start)
        # The cache concatenates the new positions onto a copy of the prefix for each row.
        cache = DynamicCache([(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1))
                              for keys, values in self.shared_kv])
        positions = torch.arange(shared, end, device=self.device).expand(rows, -1)
        return {cache_keyword(self.model): cache, "position_ids": positions}


# Prompt tokens per prefill forward: large enough for full-speed matmuls, small enough that the
# KV held for prompts not yet admitted stays a small part of the cache.
PREFILL_TOKENS = 4096


def decode_step(model, cache: SlotCache, tokens: torch.Tensor, pos: torch.Tensor
                 ) -> torch.Tensor:
    """One token per row at its own position; returns the next-token logits [rows, vocab]."""
    # At least 3 key columns: fp32 products with 1 or 2 keys round differently (see below).
    cache.pos, cache.kv_len = pos, max(int(pos.max()) + 1, 3)
    columns = torch.arange(cache.kv_len, device=pos.device)
    # A ready 4D mask: HF passes it through as is; each row sees exactly its own cached tokens.
    mask = (columns[None, :] <= pos[:, None])[:, None, None, :]
    config = model.config.get_text_config()
    usual, config._attn_implementation = config._attn_implementation, _DECODE_ATTENTION
    try:
        out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=pos[:, None],
                    **{cache_keyword(model): cache}, use_cache=True)
    finally:
        config._attn_implementation = usual
    return out.logits[:, -1]


def _decode_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor, scaling: float, **kwargs):
    """Attention of one query token per row whose result does not depend on the other rows.

    SDPA's CPU kernels, and a plain q @ k.T in fp32, round differently with the key length (the
    longest row in the batch), so a row's output depended on its neighbours. Here each score
    is a row of k @ q.T (rows of a matmul are computed alike, given 3 or more rows), and the key
    length only adds trailing zero weights to the weighted sum of values.
    """
    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    # Query heads sharing a kv head (HF's repeat_kv order) become columns of one matmul.
    query = query.reshape(rows, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(key, query.transpose(-1, -2)).transpose(-1, -2).float() * scaling
    weights = torch.softmax(scores.masked_fill_(~attention_mask, float("-inf")), dim=-1)
    out = torch.matmul(weights.to(value.dtype), value)  # [rows, kv_heads, group, dim]
    return out.reshape(rows, 1, heads, dim), None


_DECODE_ATTENTION = "raftlm_decode"
AttentionInterface.register(_DECODE_ATTENTION, _decode_attention)


class _SlotLayer(DynamicLayer):
    """One layer's keys/values for all rows; a decode step writes each row's column in place."""

    def __init__(self, owner: SlotCache):
        super().__init__()
        self.owner = owner

    def allocate(self, rows: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        length = self.owner.max_len
        old_keys, old_values = self.keys, self.values
        if old_keys is not None:
            if old_keys.shape[0] >= rows and old_keys.shape[2] >= length:
                return
            rows = max(rows, old_keys.shape[0])
        shape = (rows, keys.shape[-3], length)
        # Zeros, not empty: masked columns still enter attention as 0 * value, so no NaN garbage.
        self.keys = keys.new_zeros(*shape, keys.shape[-1])
        self.values = values.new_zeros(*shape, values.shape[-1])
        if old_keys is not None:  # grown for joining prompts: the running rows keep their KV
            self.keys[: old_keys.shape[0], :, : old_keys.shape[2]] = old_keys
            self.values[: old_values.shape[0], :, : old_values.shape[2]] = old_values
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        o = self.owner
        rows = key_states.shape[0]
        self.allocate(rows, key_states, value_states)
        index = torch.arange(rows, device=key_states.device)
        self.keys[index, :, o.pos] = key_states[:, :, 0]
        self.values[index, :, o.pos] = value_states[:, :, 0]
        return self.keys[:rows, :, : o.kv_len], self.values[:rows, :, : o.kv_len]

    def get_seq_length(self) -> int:
        return self.owner.kv_len


class SlotCache(Cache):
    """A KV cache whose rows are independent sequences, each at its own length."""

    def __init__(self, num_layers: int, max_len: int):
        self.max_len, self.kv_len = max_len, 0
        self.pos = torch.zeros(0, dtype=torch.long)
        super().__init__(layers=[_SlotLayer(self) for _ in range(num_layers)])

    def grow(self, max_len: int) -> None:
        """Make room for `max_len` positions per row (a longer prompt joined the call); the
        layers grow, keeping their contents, at their next allocation."""
        self.max_len = max(self.max_len, max_len)

    def fill(self, rows: list[int], layers: list[tuple[torch.Tensor, torch.Tensor]], width: int
             ) -> None:
        """Copy one sequence's KV (per layer keys and values [kv_heads, n, head_dim]) into
        `rows`, the cache holding `width` rows."""
        index = torch.tensor(rows, device=layers[0][0].device)
        for layer, (keys, values) in zip(self.layers, layers, strict=True):
            layer.allocate(width, keys, values)
            layer.keys[index, :, : keys.shape[1]] = keys
            layer.values[index, :, : values.shape[1]] = values

    def row_kv(self, row: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A copy of `row`'s KV at its first `length` positions, per layer."""
        return [(layer.keys[row, :, :length].clone(), layer.values[row, :, :length].clone())
                for layer in self.layers]

    def move_rows(self, moves: list[tuple[int, int]], device: torch.device) -> None:
        """Copy row src to row dst for each (src, dst)."""
        if not moves:
            return
        src, dst = (torch.tensor(rows, device=device) for rows in zip(*moves, strict=True))
        for layer in self.layers:
            if layer.keys is not None:
                layer.keys[dst] = layer.keys[src]
                layer.values[dst] = layer.values[src]
