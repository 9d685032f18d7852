"""Argument checks shared by the packing modules.

Guarantee: each function returns the value in canonical form (a Python int, an int64
array) or raises `PackingError` with a one-line message naming the argument and the value.
"""

from __future__ import annotations

import operator

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .errors import PackingError

# Item positions and bin ids are int32 inside the kernels.
MAX_ITEMS = 2**31 - 1
# Best-fit keeps one bin stack per possible room and the counting sort one bucket per
# length: O(seq_len) memory. 2**24 tokens (16.7M) leaves room for any context length.
MAX_SEQ_LEN = 2**24

IntArray = NDArray[np.int64]


def check_seed(seed: int) -> int:
    """A seed: an integer in [0, 2**63)."""
    try:
        value = operator.index(seed)
    except TypeError:
        raise PackingError(f"seed must be an integer, got {seed!r}") from None
    if value < 0 or value >= 2**63:
        raise PackingError(f"seed must be in [0, 2**63), got {value}")
    return value


def check_epoch(epoch: int) -> int:
    """An epoch: an integer in [0, 2**63)."""
    try:
        value = operator.index(epoch)
    except TypeError:
        raise PackingError(f"epoch must be an integer, got {epoch!r}") from None
    if value < 0 or value >= 2**63:
        raise PackingError(f"epoch must be in [0, 2**63), got {value}")
    return value


def positive_int(name: str, value: object, upper: int) -> int:
    """An integer (not a bool) in [1, upper]."""
    return int_at_least(name, value, 1, upper)


def int_at_least(name: str, value: object, low: int, upper: int | None = None) -> int:
    """An integer (not a bool) in [low, upper] (no upper bound when None)."""
    if isinstance(value, bool):
        raise PackingError(f"{name} must be an integer, got {value!r}")
    try:
        v = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise PackingError(f"{name} must be an integer, got {value!r}") from None
    if v < low:
        raise PackingError(f"{name} must be >= {low}, got {v}")
    if upper is not None and v > upper:
        raise PackingError(f"{name} must be <= {upper}, got {v}")
    return v


def validate_lengths(lengths: ArrayLike, what: str = "lengths") -> IntArray:
    """`lengths` as a 1-D int64 array of positive values, or `PackingError`."""
    try:
        arr = np.asarray(lengths)
    except (ValueError, TypeError, OverflowError) as e:
        raise PackingError(f"{what} must be a 1-D array of integers: {e}") from None
    if arr.ndim != 1:
        raise PackingError(f"{what} must be 1-D, got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise PackingError(f"{what} is empty: nothing to pack")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise PackingError(f"{what} must be integers, got a {arr.dtype} array")
    if arr.shape[0] > MAX_ITEMS:
        raise PackingError(f"{what}: at most {MAX_ITEMS} sequences, got {arr.shape[0]}")
    if arr.dtype == np.uint64 and int(arr.max()) >= 2**63:
        raise PackingError(f"{what}: a length does not fit in int64 ({int(arr.max())})")
    out = arr.astype(np.int64, copy=False)
    low = int(out.min())
    if low < 1:
        bad = np.flatnonzero(out < 1)
        raise PackingError(
            f"{what} must be >= 1: {bad.shape[0]} are not (first at index {int(bad[0])}: "
            f"{int(out[bad[0]])})"
        )
    return out
