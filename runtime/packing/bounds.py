"""Lower bounds on the number of bins any packing needs.

Guarantees: for lengths in [1, seq_len], `lower_bound_trivial <= lower_bound_l2 <=` the
optimal number of bins (so also <= what `pack` returns), computed in O(n + seq_len)
from a histogram of the lengths. They measure how far a packing is from optimal: the
bench and the CLI report `bins - L2` ("gap to L2").

L2 is Martello and Toth's bound (Knapsack Problems, 1990, §8.3.1). For a threshold k in
[0, C/2] (C = seq_len) split the items into
    J1 = {l > C - k}        — no other item of size >= k fits next to one of them,
    J2 = {C - k >= l > C/2} — one bin each, and no two share a bin,
    J3 = {C/2 >= l >= k};
then  L(k) = |J1| + |J2| + max(0, ceil((sum(J3) - (|J2| * C - sum(J2))) / C))
(the J3 items that cannot fit into the room left in the J2 bins need new bins), and
L2 = max over k of L(k). At k = 0 this is at least ceil(sum / C).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from ._checks import MAX_SEQ_LEN, positive_int, validate_lengths
from .errors import PackingError


def _histogram(lengths: ArrayLike, seq_len: int) -> tuple[np.ndarray, int]:
    cap = positive_int("seq_len", seq_len, MAX_SEQ_LEN)
    lens = validate_lengths(lengths)
    longest = int(lens.max())
    if longest > cap:
        raise PackingError(
            f"a bound needs every length <= seq_len={cap}; the longest is {longest} "
            "(bound the lengths as packed: PackResult.lengths)"
        )
    return np.bincount(lens, minlength=cap + 1).astype(np.int64), cap


def lower_bound_trivial(lengths: ArrayLike, seq_len: int) -> int:
    """ceil(sum(lengths) / seq_len)."""
    counts, cap = _histogram(lengths, seq_len)
    total = int(counts @ np.arange(cap + 1, dtype=np.int64))
    return -(-total // cap)


def lower_bound_l2(lengths: ArrayLike, seq_len: int) -> int:
    """Martello–Toth L2 lower bound on the number of bins (see the module docstring)."""
    counts, cap = _histogram(lengths, seq_len)
    sizes = np.arange(cap + 1, dtype=np.int64)
    # n_le[x] / s_le[x]: number / total length of items with length <= x, for x in 0..cap.
    n_le = np.cumsum(counts)
    s_le = np.cumsum(counts * sizes)
    half = cap // 2  # l > C/2  <=>  l >= half + 1 ;  l <= C/2  <=>  l <= half

    k = np.arange(half + 1, dtype=np.int64)  # every integer threshold in [0, C/2]
    n_j1 = n_le[cap] - n_le[cap - k]  # l in [C-k+1, C]
    n_j2 = n_le[cap - k] - n_le[half]  # l in [half+1, C-k]  (empty when C-k <= half)
    s_j2 = s_le[cap - k] - s_le[half]
    below_k = np.where(k > 0, s_le[np.maximum(k - 1, 0)], 0)
    s_j3 = s_le[half] - below_k  # l in [k, half]
    overflow = np.maximum(s_j3 - (n_j2 * cap - s_j2), 0)
    bound = n_j1 + n_j2 + -(-overflow // cap)
    total = int(s_le[cap])
    return int(max(int(bound.max()), -(-total // cap)))
