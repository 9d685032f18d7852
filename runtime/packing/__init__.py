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

from pathlib import Path

from .algorithms import ALGORITHMS, OVERLONG_POLICIES, PackResult, pack, shuffle_bins
from .bounds import lower_bound_l2, lower_bound_trivial
from .collators import (
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

# The real token-length histogram of SQuAD 1.1's 88,641 training sequences at max length
# 384 (its "source" key says where it was published), shipped as package data for the
# benchmarks and tests: `load_lengths(SQUAD11_HISTOGRAM)`.
SQUAD11_HISTOGRAM = Path(__file__).with_name("data") / "squad11_len384_histogram.json"

__all__ = [
    "ALGORITHMS",
    "FORMATS",
    "IGNORE_INDEX",
    "OVERLONG_POLICIES",
    "SQUAD11_HISTOGRAM",
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
