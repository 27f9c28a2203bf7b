"""How the fast sampler picks tokens: inverse-CDF sampling from counter-based uniforms.

The uniform for a token depends on (seed, sample index, step) alone, so a sample does not
depend on how prompts are batched or sharded.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def pick_tokens(logits: torch.Tensor, greedy: np.ndarray, seed: np.ndarray,
                sample_index: np.ndarray, steps: np.ndarray, **filters: Any) -> torch.Tensor:
    """Each row's next token: argmax for greedy rows, inverse-CDF sampling for the others at
    the uniform of (seed, sample index, step: tokens generated so far)."""
    if greedy.all():
        return logits.argmax(dim=-1)
    u = torch.from_numpy(uniform(seed, sample_index, steps)).to(logits.device)
    chosen = choose_tokens(logits, u, **filters)
    if greedy.any():
        chosen = torch.where(torch.from_numpy(greedy).to(logits.device),
                             logits.argmax(dim=-1), chosen)
    return chosen


def choose_tokens(
    logits: torch.Tensor, u: torch.Tensor, *, temperature: float, top_p: float, top_k: int
) -> torch.Tensor:
    """Inverse-CDF sampling: for each row, the token whose CDF interval holds ``u``.

    Filtering follows HF's order (temperature, then top-k, then top-p). Without top-k/top-p
    nothing is sorted: the CDF runs over the vocabulary in id order, which samples the same
    distribution.
    """
    logits = logits.float()  # HF also samples from fp32 logits
    if temperature != 1.0:
        logits = logits / temperature
    index = None
    if top_k > 0:
        logits, index = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1)
    elif top_p < 1.0:
        logits, index = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        # Keep the most likely tokens until their mass reaches top_p (the crossing one too).
        probs = probs.masked_fill_(probs.cumsum(dim=-1) - probs >= top_p, 0.0)
    choice = _inverse_cdf(probs, u)
    return choice if index is None else index.gather(-1, choice[:, None])[:, 0]


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose cumulative probability exceeds ``u`` times the total."""
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    # u < 1, but rounding can put u * total at (or past) the total; staying strictly below it
    # keeps the chosen token one of non-zero probability.
    below_total = torch.nextafter(total, torch.zeros_like(total))
    target = torch.minimum(u[:, None].to(cdf.dtype) * total, below_total)
    return torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)[:, 0]


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
