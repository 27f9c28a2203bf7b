"""raftlm's fast sampler: continuous batching over a pre-allocated KV cache.

What makes it fast (each measured with ``benchmarks/generation.py``, SmolLM2-135M, 2 CPU cores):

- The KV cache is pre-allocated, [rows, kv_heads, max_len, head_dim] per layer, and a decode step
  writes one column per row in place. HF's DynamicCache concatenates (allocates and copies) the
  whole cache at every step: on CPU that cost more than the matmuls (a 64-row fp32 step took
  2.3x as long).
- Each prompt is prefilled once, all tokens but its last, and its KV is copied into the rows of
  its K samples; the last prompt token is each row's first decode input, so no full-vocabulary
  logits are computed for prompt positions.
- Rows refill: when a sample finishes, the next (prompt, sample) takes its row, so the batch
  stays full until the queue runs dry; after that, running rows move into the slots of finished
  ones and the batch shrinks, so no step computes an idle row.
- nn.Linear weights are packed for oneDNN once per call (``_packed_linears``).
- Sampling is one exp over the vocabulary and a two-level inverse CDF: no sort, no full cumsum,
  unless top-k/top-p ask for them.

Randomness is counter-based: one uniform u = hash(seed, sample index, step) per token, and the
token is the inverse CDF of the filtered softmax at u. A sample therefore does not depend on the
other prompts in the batch, their order, or how prompts are sharded across processes.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import islice

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicLayer

Sample = tuple[list[int], str]  # (generated token ids, finish reason)


def sample(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    num_samples: int,
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
    progress=None,
) -> list[list[Sample]]:
    """Sample ``num_samples`` continuations per prompt; returns (token_ids, finish_reason) each.

    The caller sets eval mode and inference mode. ``progress``, a tqdm bar of samples, advances
    as samples finish.
    """
    _check_supported(model)
    device = next(model.parameters()).device
    # Similar lengths next to each other keep the padding of batched prefills small.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    queue = deque((i, j) for i in order for j in range(num_samples))
    results: list[list[Sample | None]] = [[None] * num_samples for _ in prompts]
    if not queue:
        return results  # type: ignore[return-value]

    width = min(batch_size, len(queue))
    cache = _SlotCache(model.config.get_text_config().num_hidden_layers,
                       max_len=max(len(p) for p in prompts) + max_new_tokens)
    prompt_kv = _PromptKV(model, prompts, num_samples, device)
    owner: list[tuple[int, int] | None] = [None] * width  # (prompt, sample) held by each row
    generated: list[list[int]] = [[] for _ in range(width)]
    pos = np.zeros(width, dtype=np.int64)  # tokens cached = position of the row's input token
    tokens = np.zeros(width, dtype=np.int64)  # the row's next input token
    row_seed = np.zeros(width, dtype=np.uint64)
    row_sample = np.zeros(width, dtype=np.uint64)
    stops = list(stop_strings)

    with _packed_linears(model, width, device):
        while queue or any(o is not None for o in owner):
            free = [r for r in range(width) if owner[r] is None]
            if queue and free:
                taken = [(r, *queue.popleft()) for r in free[: len(queue)]]
                upcoming = [i for i, _ in islice(queue, width // 4)]  # prefilled in the same call
                prompt_kv.copy_into(cache, taken, upcoming, width)
                for r, i, j in taken:
                    owner[r], generated[r] = (i, j), []
                    pos[r], tokens[r] = len(prompts[i]) - 1, prompts[i][-1]
                    row_seed[r], row_sample[r] = seeds[i], j

            logits = _decode_step(model, cache, torch.from_numpy(tokens).to(device),
                                  torch.from_numpy(pos).to(device))
            if greedy:
                chosen = logits.argmax(dim=-1)
            else:
                steps = np.array([len(g) for g in generated], dtype=np.uint64)
                u = torch.from_numpy(uniform(row_seed, row_sample, steps)).to(device)
                chosen = choose_tokens(logits, u, temperature=temperature, top_p=top_p, top_k=top_k)

            for r, token in enumerate(chosen.tolist()):
                if owner[r] is None:
                    continue
                ids = generated[r]
                ids.append(token)
                reason = _finish_reason(ids, eos_ids, stops, tokenizer, max_new_tokens)
                if reason is None:
                    pos[r] += 1
                    tokens[r] = token
                    continue
                i, j = owner[r]
                results[i][j] = (ids, reason)
                owner[r], pos[r], tokens[r] = None, 0, 0
                if progress is not None:
                    report_progress(progress, len(ids))

            running = [r for r in range(width) if owner[r] is not None]
            if not queue and len(running) < width:
                # Nothing left to refill with: idle rows still cost compute, so move the rows
                # still running into the first slots and shrink the batch.
                width = len(running)
                moves = list(zip([r for r in running if r >= width],
                                 [r for r in range(width) if owner[r] is None], strict=True))
                cache.move_rows(moves, device)
                for src, dst in moves:
                    owner[dst], generated[dst] = owner[src], generated[src]
                    pos[dst], tokens[dst] = pos[src], tokens[src]
                    row_seed[dst], row_sample[dst] = row_seed[src], row_sample[src]
                owner, generated = owner[:width], generated[:width]
                pos, tokens = pos[:width], tokens[:width]
                row_seed, row_sample = row_seed[:width], row_sample[:width]
    return results  # type: ignore[return-value]


def report_progress(bar, new_tokens: int, sequences: int = 1) -> None:
    """Advance a tqdm bar of sequences and show the token rate next to it."""
    bar.tokens = getattr(bar, "tokens", 0) + new_tokens
    bar.update(sequences)
    elapsed = bar.format_dict["elapsed"]
    if elapsed > 0:
        bar.set_postfix_str(f"{bar.tokens / elapsed:.0f} tok/s", refresh=False)


def choose_tokens(
    logits: torch.Tensor, u: torch.Tensor, *, temperature: float, top_p: float, top_k: int
) -> torch.Tensor:
    """Inverse-CDF sampling: for each row, the token whose CDF interval holds ``u``.

    Filtering follows HF's order (temperature, then top-k, then top-p). Without top-k/top-p
    nothing is sorted: the CDF runs over the vocabulary in id order, which samples the same
    distribution.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    index = None
    if top_k > 0:
        logits, index = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1)
    elif top_p < 1.0:
        logits, index = torch.sort(logits, dim=-1, descending=True)
    weights = (logits - logits.amax(dim=-1, keepdim=True)).exp_()  # softmax up to its sum
    if top_p < 1.0:
        # Keep the most likely tokens until their mass reaches top_p (the crossing one too).
        probs = weights / weights.sum(dim=-1, keepdim=True)
        weights = probs.masked_fill_(probs.cumsum(dim=-1) - probs >= top_p, 0.0)
    choice = _inverse_cdf(weights, u)
    return choice if index is None else index.gather(-1, choice[:, None])[:, 0]


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor, block: int = 256) -> torch.Tensor:
    """Per row, the first index whose cumulative weight exceeds ``u`` times the total.

    Two levels (blocks of ``block`` tokens, then tokens within the chosen block): a cumsum over
    the full vocabulary is sequential and cost more than the softmax itself.
    """
    rows, vocab = weights.shape
    if vocab % block:
        weights = torch.nn.functional.pad(weights, (0, block - vocab % block))
    blocks = weights.view(rows, -1, block)
    mass = blocks.sum(dim=-1)
    cdf = mass.cumsum(dim=-1)
    target = u[:, None].to(cdf.dtype) * cdf[:, -1:]
    chosen = _search(cdf, target)
    target = target - torch.where(chosen > 0, cdf.gather(1, (chosen - 1).clamp(min=0)), 0.0)
    inner = _search(blocks[torch.arange(rows), chosen[:, 0]].cumsum(dim=-1), target)
    return (chosen * block + inner)[:, 0]


def _search(cdf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # u < 1, but rounding can put the target at (or past) the total; staying strictly below it
    # keeps the chosen entry one of non-zero weight.
    target = torch.minimum(target, torch.nextafter(cdf[:, -1:], cdf.new_zeros(())))
    return torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)


_GOLDEN, _MIX1, _MIX2 = (np.uint64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9,
                                                0x94D049BB133111EB))


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def uniform(seed: np.ndarray, sample: np.ndarray, step: np.ndarray) -> np.ndarray:
    """A uniform in [0, 1) from (seed, sample index, step) alone: a counter-based RNG."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
        x = _splitmix(_splitmix(_splitmix(seed.astype(np.uint64)) ^ sample) ^ step)
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53


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


@contextmanager
def _packed_linears(model: torch.nn.Module, rows: int, device: torch.device) -> Iterator[None]:
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
            packed = ops._reorder_linear_weight(module.weight.detach(), rows)
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


def _check_supported(model: torch.nn.Module) -> None:
    config = model.config.get_text_config()
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise NotImplementedError(
            f"generation.backend=raftlm supports full-attention models only (this one has "
            f"{sorted(set(layer_types))}); use generation.backend=hf"
        )
    if config._attn_implementation not in ("sdpa", "eager"):
        raise NotImplementedError(
            f"generation.backend=raftlm needs sdpa or eager attention, the model uses "
            f"{config._attn_implementation!r}; use generation.backend=hf"
        )


class _PromptKV:
    """Prompt KV, computed once per prompt and copied into the rows of each of its samples.

    The prefill covers all prompt tokens but the last, which becomes the rows' first decode input.
    Prompts are right-padded in a batched prefill: a real token never attends to a later pad, so
    the KV of real tokens is exact.
    """

    def __init__(self, model, prompts: Sequence[Sequence[int]], num_samples: int,
                 device: torch.device):
        self.model, self.prompts, self.device = model, prompts, device
        self.num_samples = num_samples
        self.kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # per layer [H, n, D]
        self.left: dict[int, int] = {}  # samples of the prompt not yet admitted

    def copy_into(self, cache: _SlotCache, taken: list[tuple[int, int, int]],
                  upcoming: list[int], width: int) -> None:
        """Fill rows ``taken`` = [(row, prompt, sample)]; prefill ``upcoming`` prompts too."""
        wanted = [i for _, i, _ in taken] + upcoming
        if any(i not in self.kv and len(self.prompts[i]) > 1 for _, i, _ in taken):
            self._prefill(sorted({i for i in wanted
                                  if i not in self.kv and len(self.prompts[i]) > 1}))
        by_prompt: dict[int, list[int]] = {}
        for r, i, _ in taken:
            by_prompt.setdefault(i, []).append(r)
        for i, rows in by_prompt.items():
            if i not in self.kv:
                continue  # a one-token prompt: nothing cached
            index = torch.tensor(rows, device=self.device)
            for layer, (keys, values) in zip(cache.layers, self.kv[i], strict=True):
                layer.allocate(width, keys, values)
                layer.keys[index, :, : keys.shape[1]] = keys
                layer.values[index, :, : values.shape[1]] = values
            self.left[i] -= len(rows)
            if self.left[i] == 0:
                del self.kv[i], self.left[i]

    def _prefill(self, indices: list[int]) -> None:
        lengths = [len(self.prompts[i]) - 1 for i in indices]
        ids = torch.zeros(len(indices), max(lengths), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (i, n) in enumerate(zip(indices, lengths, strict=True)):
            ids[row, :n] = torch.tensor(self.prompts[i][:-1])
            mask[row, :n] = 1
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         use_cache=True, logits_to_keep=1)
        layers = out.past_key_values.layers
        for row, (i, n) in enumerate(zip(indices, lengths, strict=True)):
            self.kv[i] = [(layer.keys[row, :, :n], layer.values[row, :, :n]) for layer in layers]
            self.left[i] = self.num_samples


def _decode_step(model, cache: _SlotCache, tokens: torch.Tensor, pos: torch.Tensor
                 ) -> torch.Tensor:
    """One token per row at its own position; returns the next-token logits [rows, vocab]."""
    cache.pos, cache.kv_len = pos, int(pos.max()) + 1
    columns = torch.arange(cache.kv_len, device=pos.device)
    # A ready 4D mask: HF uses it as is, and each row sees exactly its own cached tokens.
    mask = (columns[None, :] <= pos[:, None])[:, None, None, :]
    if model.config.get_text_config()._attn_implementation == "eager":  # adds the mask
        dtype = model.get_input_embeddings().weight.dtype
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, torch.finfo(dtype).min)
    out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=pos[:, None],
                past_key_values=cache, use_cache=True)
    return out.logits[:, -1]


class _SlotLayer(DynamicLayer):
    """One layer's keys/values for all rows; a decode step writes each row's column in place."""

    def __init__(self, owner: _SlotCache):
        super().__init__()
        self.owner = owner

    def allocate(self, rows: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        if self.keys is not None and self.keys.shape[0] >= rows:
            return
        shape = (rows, keys.shape[-3], self.owner.max_len)
        # Zeros, not empty: masked columns still enter attention as 0 * value, so no NaN garbage.
        self.keys = keys.new_zeros(*shape, keys.shape[-1])
        self.values = values.new_zeros(*shape, values.shape[-1])
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


class _SlotCache(Cache):
    """A KV cache whose rows are independent sequences, each at its own length."""

    def __init__(self, num_layers: int, max_len: int):
        self.max_len, self.kv_len = max_len, 0
        self.pos = torch.zeros(0, dtype=torch.long)
        super().__init__(layers=[_SlotLayer(self) for _ in range(num_layers)])

    def move_rows(self, moves: list[tuple[int, int]], device: torch.device) -> None:
        """Copy row src to row dst for each (src, dst)."""
        if not moves:
            return
        src, dst = (torch.tensor(rows, device=device) for rows in zip(*moves, strict=True))
        for layer in self.layers:
            if layer.keys is not None:
                layer.keys[dst] = layer.keys[src]
                layer.values[dst] = layer.values[src]
