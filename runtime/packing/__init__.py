"""Sequence packing: bins of `seq_len` tokens, their training order, and their tensors.

    lengths ──pack()──▶ PackResult ──PackedSampler──▶ per-rank steps ──collate()──▶ tensors
    (load_lengths)      (ffd | bfd | greedy,          (shuffled per epoch,         (varlen | thd |
                         numba kernels)                balanced across dp ranks)    segment_ids | padded)

Each module states its guarantees: `algorithms` (every sequence packed exactly once or
accounted for by the overlong policy, capacity respected), `bounds` (lower bounds on the
number of bins), `sampler` (every bin once per epoch across ranks, same step count on
every rank, exact mid-epoch resume), `collate` (labels already shifted, never across a
sequence boundary), `lengths` (length files). Every input problem is a `PackingError`.
"""

from .algorithms import ALGORITHMS, OVERLONG_POLICIES, PackResult, pack, shuffle_bins
from .bounds import lower_bound_l2, lower_bound_trivial
from .collate import (
    FORMATS,
    IGNORE_INDEX,
    collate,
    collate_padded,
    collate_segment_ids,
    collate_thd,
    collate_varlen,
)
from .errors import PackingError
from .lengths import load_lengths
from .sampler import Imbalance, PackedSampler, Remainder

__all__ = [
    "ALGORITHMS",
    "FORMATS",
    "IGNORE_INDEX",
    "OVERLONG_POLICIES",
    "Imbalance",
    "PackResult",
    "PackedSampler",
    "PackingError",
    "Remainder",
    "collate",
    "collate_padded",
    "collate_segment_ids",
    "collate_thd",
    "collate_varlen",
    "load_lengths",
    "lower_bound_l2",
    "lower_bound_trivial",
    "pack",
    "shuffle_bins",
]
