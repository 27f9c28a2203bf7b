"""Input checks of the NumPy RAFT core (`core.py`): every error names where the bad entry is,
as "stage t, prompt p, response k, token l"."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

_LEVELS = ("stage", "prompt", "response", "token")


def loc(*index: int) -> str:
    """'stage 1, prompt 0, response 2' for index (1, 0, 2)."""
    return ", ".join(f"{name} {int(i)}" for name, i in zip(_LEVELS, index, strict=False))


def is_real(x: object) -> bool:
    """True for real numbers, NumPy scalars included; bools are flags, not numbers."""
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def check_positive_int(value: object, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def check_fraction(value: object, name: str) -> float:
    if not is_real(value):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if not 0 < value <= 1:  # also rejects NaN
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return float(value)


def as_sequence(obj: object, where: str) -> Sequence[Any]:
    """`obj` if it is a (non-string) sequence or a non-scalar array, else TypeError."""
    if isinstance(obj, np.ndarray) and obj.ndim > 0:
        return obj  # type: ignore[return-value]
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        return obj
    raise TypeError(f"{where}: expected a sequence, got {type(obj).__name__}")


def real_vector(values: object, where: str, item: str) -> np.ndarray:
    """`values` as a 1-D float64 array; TypeError naming the first non-real entry."""
    values = as_sequence(values, where)
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError):  # nested ragged lists: the scan below names the culprit
        arr = None
    if arr is not None and arr.ndim == 1 and arr.dtype.kind in "iuf":
        return arr.astype(np.float64, copy=False)
    out = np.empty(len(values), dtype=np.float64)
    for i, x in enumerate(values):
        if not is_real(x):
            raise TypeError(f"{where}, {item} {i}: expected a real number, got {x!r}")
        try:
            out[i] = float(x)
        except OverflowError as err:  # e.g. a Python int beyond float range
            raise ValueError(f"{where}, {item} {i}: {x!r} is out of float range") from err
    return out


def counts_match(n_lp: int, n_rw: int, where: str, noun: str) -> None:
    if n_lp != n_rw:
        raise ValueError(f"{where}: {n_lp} {noun} of log-probabilities but {n_rw} of rewards")
    if n_lp == 0:
        raise ValueError(f"{where}: no {noun}")


def reward_error(index: tuple[int, ...], value: float) -> ValueError:
    return ValueError(f"{loc(*index)}: reward is {value} (rewards must be finite)")


def log_prob_error(index: tuple[int, ...], value: float) -> ValueError:
    rule = "must be finite" if not math.isfinite(value) else "must be <= 0"
    return ValueError(f"{loc(*index)}: log-probability is {value} ({rule})")
