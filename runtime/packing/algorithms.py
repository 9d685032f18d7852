"""Pack sequences into bins of `seq_len` tokens: `pack()` and its `PackResult`.

Guarantees of `pack(lengths, seq_len, ...)`, checked by the property tests:

- every bin is non-empty, its items' lengths (each rounded up to `pad_multiple`) sum to at
  most `seq_len`, and it holds at most `max_per_bin` items;
- every input sequence is accounted for exactly once: it is packed whole, or — only when
  it is longer than `seq_len` — handled by the `overlong` policy: `"error"` raises
  `PackingError` naming how many are too long and the longest; `"drop"` leaves it out and
  lists it in `PackResult.dropped`; `"truncate"` packs its first `seq_len` tokens;
  `"split"` cuts it into consecutive pieces of `seq_len` tokens (the last one shorter),
  each packed as an item of its own;
- `ffd` is exact first-fit decreasing over the whole dataset, `bfd` exact best-fit
  decreasing, `greedy` order-preserving next fit (the NeMo-style baseline);
- the result is a pure function of the arguments (`seed` included).

How items are identified. A packed item is a token range of one source sequence:
item j is tokens `[starts[j], starts[j] + lengths[j])` of sequence `indices[j]`. Without
splitting `starts` is all zeros and every id appears once; with `"split"` the pieces of
sequence i are the items whose `indices` equal i, and their `(starts, lengths)` tile
`[0, length_i)` exactly. Bin b holds items `offsets[b]:offsets[b + 1]`.

Invalid input (empty, non 1-D, non-integer, zero or negative lengths, seq_len < 1, an
unknown algorithm or policy) raises `PackingError` with a one-line message.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import _kernels
from .errors import PackingError

Algorithm = Literal["ffd", "bfd", "greedy"]
Overlong = Literal["error", "drop", "truncate", "split"]
ALGORITHMS: tuple[str, ...] = ("ffd", "bfd", "greedy")
OVERLONG_POLICIES: tuple[str, ...] = ("error", "drop", "truncate", "split")

# Bin ids are stored as int32 inside the kernels and rooms in an int32 tree.
_MAX_ITEMS = 2**31 - 1
_MAX_SEQ_LEN = 2**31 - 1

IntArray = NDArray[np.int64]


def _readonly(a: IntArray) -> IntArray:
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class PackResult:
    """Bins of a packing, as CSR arrays over packed items (see the module docstring).

    `indices[j]`, `starts[j]`, `lengths[j]`: source sequence id, first token and number of
    tokens of packed item j; items `offsets[b]:offsets[b + 1]` form bin b. The arrays are
    read-only. `n_input` counts the sequences given to `pack`.
    """

    indices: IntArray
    offsets: IntArray
    lengths: IntArray
    starts: IntArray
    seq_len: int
    algorithm: str
    n_input: int
    dropped: IntArray = field(default_factory=lambda: np.zeros(0, np.int64))
    n_truncated: int = 0
    n_split: int = 0
    pad_multiple: int = 1

    def __post_init__(self) -> None:
        # Cheap O(1) consistency checks only; the packing invariants are the kernels' job
        # and are covered by the property tests.
        n = self.indices.shape[0]
        if self.lengths.shape != (n,) or self.starts.shape != (n,):
            raise ValueError(
                f"indices, lengths and starts must have one entry per item: {n}, "
                f"{self.lengths.shape}, {self.starts.shape}"
            )
        if self.offsets.ndim != 1 or self.offsets.shape[0] < 1 or int(self.offsets[-1]) != n:
            raise ValueError(f"offsets must end at the number of items ({n})")
        for a in (self.indices, self.offsets, self.lengths, self.starts, self.dropped):
            a.setflags(write=False)

    # -- sizes ---------------------------------------------------------------------------

    @property
    def n_bins(self) -> int:
        return int(self.offsets.shape[0] - 1)

    @property
    def n_sequences(self) -> int:
        """Number of packed items (a split sequence counts once per piece)."""
        return int(self.indices.shape[0])

    @property
    def n_dropped(self) -> int:
        return int(self.dropped.shape[0])

    @cached_property
    def tokens(self) -> int:
        """Real tokens in all bins (padding excluded)."""
        return int(self.lengths.sum())

    @property
    def padding_tokens(self) -> int:
        return self.n_bins * self.seq_len - self.tokens

    @property
    def efficiency(self) -> float:
        """tokens / (n_bins * seq_len); 1.0 would mean no padding at all."""
        return self.tokens / (self.n_bins * self.seq_len) if self.n_bins else 0.0

    # -- per bin ---------------------------------------------------------------------------

    def bin(self, b: int) -> tuple[IntArray, IntArray, IntArray]:
        """(indices, starts, lengths) of the items of bin b, in packing order."""
        if not -self.n_bins <= b < self.n_bins:
            raise IndexError(f"bin {b} out of range for {self.n_bins} bins")
        b %= self.n_bins
        lo, hi = int(self.offsets[b]), int(self.offsets[b + 1])
        return self.indices[lo:hi], self.starts[lo:hi], self.lengths[lo:hi]

    @cached_property
    def bin_tokens(self) -> IntArray:
        """Real tokens per bin."""
        return _readonly(np.add.reduceat(self.lengths, self.offsets[:-1]).astype(np.int64))

    @cached_property
    def bin_attention(self) -> IntArray:
        """Attention cost per bin: the sum of its items' squared lengths (causal attention
        over a packed bin costs in proportion to this, not to seq_len**2)."""
        return _readonly(np.add.reduceat(self.lengths**2, self.offsets[:-1]).astype(np.int64))

    def epoch_order(self, epoch: int, seed: int = 0) -> tuple[IntArray, IntArray]:
        """The whole training order of one epoch as CSR `(positions, offsets)`: bins in the
        order of `shuffle_bins(self, epoch, seed)`, each bin's items shuffled (see
        `bin_items`). `positions` index the item arrays (`indices`, `starts`, `lengths`)."""
        return _kernels.shuffled_items(
            self.offsets, shuffle_bins(self, epoch, seed), _check_seed(seed), _check_epoch(epoch)
        )

    def bin_items(self, b: int, epoch: int, seed: int = 0) -> IntArray:
        """Positions of bin b's items, shuffled for this epoch and seed. Packing leaves a
        bin sorted by decreasing length; shuffling it keeps the first slot of every bin
        from always holding its longest sequence."""
        if not 0 <= b < self.n_bins:
            raise IndexError(f"bin {b} out of range for {self.n_bins} bins")
        pos, _ = _kernels.shuffled_items(
            self.offsets, np.array([b], np.int64), _check_seed(seed), _check_epoch(epoch)
        )
        return pos

    def summary(self) -> dict[str, Any]:
        """Plain figures for reports (JSON-serialisable)."""
        return {
            "algorithm": self.algorithm,
            "seq_len": self.seq_len,
            "n_input": self.n_input,
            "n_sequences": self.n_sequences,
            "n_bins": self.n_bins,
            "tokens": self.tokens,
            "padding_tokens": self.padding_tokens,
            "efficiency": self.efficiency,
            "n_dropped": self.n_dropped,
            "n_truncated": self.n_truncated,
            "n_split": self.n_split,
        }


def _check_seed(seed: int) -> int:
    try:
        value = operator.index(seed)
    except TypeError:
        raise PackingError(f"seed must be an integer, got {seed!r}") from None
    if value < 0 or value >= 2**63:
        raise PackingError(f"seed must be in [0, 2**63), got {value}")
    return value


def _check_epoch(epoch: int) -> int:
    try:
        value = operator.index(epoch)
    except TypeError:
        raise PackingError(f"epoch must be an integer, got {epoch!r}") from None
    if value < 0 or value >= 2**63:
        raise PackingError(f"epoch must be in [0, 2**63), got {value}")
    return value


def _positive_int(name: str, value: object, upper: int) -> int:
    if isinstance(value, bool):
        raise PackingError(f"{name} must be an integer, got {value!r}")
    try:
        v = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise PackingError(f"{name} must be an integer, got {value!r}") from None
    if v < 1:
        raise PackingError(f"{name} must be >= 1, got {v}")
    if v > upper:
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
    if arr.shape[0] > _MAX_ITEMS:
        raise PackingError(f"{what}: at most {_MAX_ITEMS} sequences, got {arr.shape[0]}")
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


def _apply_overlong(
    lens: IntArray, seq_len: int, policy: str
) -> tuple[IntArray, IntArray | None, IntArray | None, IntArray, int, int]:
    """Item lengths, item -> source id (None: identity), item starts (None: zeros),
    dropped ids, number truncated, number split."""
    empty = np.zeros(0, np.int64)
    longest = int(lens.max())
    if longest <= seq_len:
        return lens, None, None, empty, 0, 0
    over = lens > seq_len
    n_over = int(np.count_nonzero(over))
    if policy == "error":
        raise PackingError(
            f"{n_over} sequence{'s are' if n_over != 1 else ' is'} longer than "
            f"seq_len={seq_len} (longest: {longest}); raise seq_len or choose "
            "overlong='drop', 'truncate' or 'split'"
        )
    if policy == "drop":
        keep = np.flatnonzero(~over)
        if keep.shape[0] == 0:
            raise PackingError(
                f"all {lens.shape[0]} sequences are longer than seq_len={seq_len}: "
                "nothing left to pack after overlong='drop'"
            )
        return lens[keep], keep, None, np.flatnonzero(over), 0, 0
    if policy == "truncate":
        return np.minimum(lens, seq_len), None, None, empty, n_over, 0
    # split: sequence i becomes ceil(len_i / seq_len) consecutive pieces.
    pieces = (lens + (seq_len - 1)) // seq_len
    src = np.repeat(np.arange(lens.shape[0], dtype=np.int64), pieces)
    first = np.cumsum(pieces) - pieces  # item index of each sequence's first piece
    starts = (np.arange(src.shape[0], dtype=np.int64) - first[src]) * seq_len
    item_lens = np.minimum(lens[src] - starts, seq_len)
    return item_lens, src, starts, empty, 0, n_over


def pack(
    lengths: ArrayLike,
    seq_len: int,
    algorithm: str = "ffd",
    *,
    max_per_bin: int | None = None,
    overlong: str = "error",
    seed: int | None = 0,
    pad_multiple: int = 1,
) -> PackResult:
    """Pack sequences of the given lengths into bins of at most `seq_len` tokens.

    algorithm: `"ffd"` (first-fit decreasing over the whole dataset; the default),
      `"bfd"` (best-fit decreasing) or `"greedy"` (order-preserving next fit).
    max_per_bin: at most this many items per bin (None: no limit).
    overlong: what to do with sequences longer than `seq_len`: `"error"`, `"drop"`,
      `"truncate"` or `"split"` (see the module docstring).
    seed: breaks ties between equal lengths for ffd/bfd (a seeded shuffle, so dataset
      neighbours are not packed together systematically); None keeps dataset order.
      It does not change the number of bins of ffd. greedy ignores it.
    pad_multiple: every item reserves its length rounded up to this multiple; use
      `2 * cp_size` under context parallelism so that the per-sequence padding the
      collators add always fits. `seq_len` must be a multiple of it.
    """
    cap = _positive_int("seq_len", seq_len, _MAX_SEQ_LEN)
    if algorithm not in ALGORITHMS:
        raise PackingError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    if overlong not in OVERLONG_POLICIES:
        raise PackingError(
            f"unknown overlong policy {overlong!r}; choose one of {', '.join(OVERLONG_POLICIES)}"
        )
    per_bin = _MAX_ITEMS if max_per_bin is None else _positive_int("max_per_bin", max_per_bin, _MAX_ITEMS)
    multiple = _positive_int("pad_multiple", pad_multiple, cap)
    if cap % multiple:
        raise PackingError(f"seq_len={cap} must be a multiple of pad_multiple={multiple}")
    tie_seed = -1 if seed is None else _check_seed(seed)
    lens = validate_lengths(lengths)

    item_lens, src, starts, dropped, n_trunc, n_split = _apply_overlong(lens, cap, overlong)
    if src is not None and src.shape[0] > _MAX_ITEMS:
        raise PackingError(f"splitting makes {src.shape[0]} pieces, more than {_MAX_ITEMS}")
    room = item_lens if multiple == 1 else -(-item_lens // multiple) * multiple
    room = np.ascontiguousarray(room, dtype=np.int64)

    if algorithm == "ffd":
        order, offsets, packed_room = _kernels.ffd(room, cap, per_bin, tie_seed)
    elif algorithm == "bfd":
        order, offsets, packed_room = _kernels.bfd(room, cap, per_bin, tie_seed)
    else:
        order, offsets, packed_room = _kernels.greedy(room, cap, per_bin)

    packed_lens = packed_room if multiple == 1 else item_lens[order]
    indices = order if src is None else src[order]
    packed_starts = np.zeros(order.shape[0], np.int64) if starts is None else starts[order]
    return PackResult(
        indices=indices,
        offsets=offsets,
        lengths=packed_lens,
        starts=packed_starts,
        seq_len=cap,
        algorithm=algorithm,
        n_input=int(lens.shape[0]),
        dropped=dropped,
        n_truncated=n_trunc,
        n_split=n_split,
        pad_multiple=multiple,
    )


def shuffle_bins(result: PackResult, epoch: int, seed: int = 0) -> IntArray:
    """A permutation of the bin ids: the bin order of `epoch`, a pure function of
    (seed, epoch, number of bins). Bins come out of packing sorted by their longest
    sequence; training in that order would be far from random."""
    rng = np.random.default_rng([_check_seed(seed), _check_epoch(epoch), 0xB1])
    return rng.permutation(result.n_bins).astype(np.int64)
