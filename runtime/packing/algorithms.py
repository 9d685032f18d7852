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

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import _kernels
from ._checks import MAX_ITEMS, MAX_SEQ_LEN, check_epoch, check_seed, positive_int, validate_lengths
from .bounds import lower_bound_l2, lower_bound_trivial
from .errors import PackingError

ALGORITHMS: tuple[str, ...] = ("ffd", "bfd", "greedy")
OVERLONG_POLICIES: tuple[str, ...] = ("error", "drop", "truncate", "split")

IntArray = NDArray[np.int64]


def _readonly(a: IntArray) -> IntArray:
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class PackResult:
    """Bins of a packing, as CSR arrays over packed items (see the module docstring).

    `indices[j]`, `starts[j]`, `lengths[j]`: source sequence id, first token and number of
    tokens of packed item j; items `offsets[b]:offsets[b + 1]` form bin b; inside a bin,
    items come in packing order (decreasing length for ffd/bfd: see `bin_items` for the
    shuffled training order). `n_input` counts the sequences given to `pack`; `dropped`
    lists the ids left out by overlong="drop"; `n_truncated` / `n_split` count the
    sequences truncated / split; every item reserved its length rounded up to
    `pad_multiple`. The arrays are read-only.
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

    def _per_bin_sum(self, values: IntArray) -> IntArray:
        if self.n_bins == 0:
            return _readonly(np.zeros(0, np.int64))
        # reduceat is exact here because no bin is empty.
        return _readonly(np.add.reduceat(values, self.offsets[:-1]).astype(np.int64))

    @cached_property
    def bin_tokens(self) -> IntArray:
        """Real tokens per bin."""
        return self._per_bin_sum(self.lengths)

    @cached_property
    def bin_attention(self) -> IntArray:
        """Attention cost per bin: the sum of its items' squared lengths (causal attention
        over a packed bin costs in proportion to this, not to seq_len**2)."""
        return self._per_bin_sum(self.lengths**2)

    def epoch_order(self, epoch: int, seed: int = 0) -> tuple[IntArray, IntArray]:
        """The whole training order of one epoch as CSR `(positions, offsets)`: bins in the
        order of `shuffle_bins(self, epoch, seed)`, each bin's items shuffled (see
        `bin_items`). `positions` index the item arrays (`indices`, `starts`, `lengths`)."""
        return _kernels.shuffled_items(
            self.offsets, shuffle_bins(self, epoch, seed), check_seed(seed), check_epoch(epoch)
        )

    def bin_items(self, b: int, epoch: int, seed: int = 0) -> IntArray:
        """Positions of bin b's items, shuffled for this epoch and seed. Packing leaves a
        bin sorted by decreasing length; shuffling it keeps the first slot of every bin
        from always holding its longest sequence."""
        if not 0 <= b < self.n_bins:
            raise IndexError(f"bin {b} out of range for {self.n_bins} bins")
        pos, _ = _kernels.shuffled_items(
            self.offsets, np.array([b], np.int64), check_seed(seed), check_epoch(epoch)
        )
        return pos

    @cached_property
    def l2_bound(self) -> int:
        """Martello–Toth L2 lower bound on the bins any packing of these items needs."""
        return lower_bound_l2(self.lengths, self.seq_len) if self.n_sequences else 0

    @property
    def gap_to_l2(self) -> int:
        """Bins above the L2 bound (0: provably optimal)."""
        return self.n_bins - self.l2_bound

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
            "l1_bound": lower_bound_trivial(self.lengths, self.seq_len) if self.n_sequences else 0,
            "l2_bound": self.l2_bound,
            "gap_to_l2": self.gap_to_l2,
        }


@dataclass(frozen=True)
class _Items:
    """What the kernels pack: items 0..n-1 are the input sequences, read through the
    kernels' `over` rule (CLIP: truncate, SKIP: drop); items n.. are the extra pieces of
    split sequences, with their source id and first token."""

    lens: IntArray
    over: int
    extra_src: IntArray
    extra_start: IntArray
    dropped: IntArray
    n_truncated: int
    n_split: int


def _split_in_order(lens: IntArray, seq_len: int, n_over: int) -> _Items:
    # For greedy, which keeps dataset order: every sequence's pieces are consecutive items.
    # Items are numbered n.. so that all of them go through the piece map in `pack`.
    pieces = (lens + (seq_len - 1)) // seq_len
    src = np.repeat(np.arange(lens.shape[0], dtype=np.int64), pieces)
    first = np.cumsum(pieces) - pieces
    starts = (np.arange(src.shape[0], dtype=np.int64) - np.repeat(first, pieces)) * seq_len
    item_lens = np.concatenate(
        [np.zeros(lens.shape[0], np.int64), np.minimum(lens[src] - starts, seq_len)]
    )
    empty = np.zeros(0, np.int64)
    return _Items(item_lens, _kernels.CLIP, src, starts, empty, 0, n_over)


def _apply_overlong(lens: IntArray, seq_len: int, policy: str, ordered: bool) -> _Items:
    # Items keep the input positions, so that the kernels' output order already is
    # `indices`, and truncate/drop happen inside the kernels: no id map, no copy of the
    # lengths on the hot path.
    empty = np.zeros(0, np.int64)
    longest = int(lens.max())
    if longest <= seq_len:
        return _Items(lens, _kernels.CLIP, empty, empty, empty, 0, 0)
    over = lens > seq_len
    n_over = int(np.count_nonzero(over))
    if policy == "error":
        raise PackingError(
            f"{n_over} sequence{'s are' if n_over != 1 else ' is'} longer than "
            f"seq_len={seq_len} (longest: {longest}); raise seq_len or choose "
            "overlong='drop', 'truncate' or 'split'"
        )
    if policy == "drop":
        if n_over == lens.shape[0]:
            raise PackingError(
                f"all {n_over} sequences are longer than seq_len={seq_len}: "
                "nothing left to pack with overlong='drop'"
            )
        return _Items(lens, _kernels.SKIP, empty, empty, np.flatnonzero(over), 0, 0)
    if policy == "truncate":
        return _Items(lens, _kernels.CLIP, empty, empty, empty, n_over, 0)
    if ordered:
        return _split_in_order(lens, seq_len, n_over)
    # split: sequence i keeps its first seq_len tokens as item i (CLIP); its further
    # pieces, ceil(len_i / seq_len) - 1 of them, become items n, n+1, ...
    long_ids = np.flatnonzero(over)
    long_lens = lens[long_ids]
    extra = (long_lens - 1) // seq_len  # pieces beyond the first
    src = np.repeat(long_ids, extra)
    first = np.cumsum(extra) - extra
    piece = np.arange(src.shape[0], dtype=np.int64) - np.repeat(first, extra) + 1
    starts = piece * seq_len
    item_lens = np.empty(lens.shape[0] + src.shape[0], np.int64)
    item_lens[: lens.shape[0]] = lens
    np.minimum(np.repeat(long_lens, extra) - starts, seq_len, out=item_lens[lens.shape[0] :])
    return _Items(item_lens, _kernels.CLIP, src, starts, empty, 0, n_over)


def _run_kernel(
    algorithm: str, room: IntArray, cap: int, over: int, per_bin: int, tie_seed: int
) -> tuple[IntArray, IntArray, IntArray]:
    """(item positions in bin order, bin offsets, their lengths) from one kernel."""
    n = room.shape[0]
    # The per-item buffers come from numpy, which maps them with huge pages (see _kernels).
    if algorithm == "greedy":
        out = np.empty(n, np.int64)
        out_len = np.empty(n, np.int64)
        offsets_buf = np.empty(n + 1, np.int64)
        n_bins, m = _kernels.greedy(room, cap, over, per_bin, offsets_buf, out, out_len)
        offsets = offsets_buf[: n_bins + 1].copy()
        if m < n:  # dropped items: do not keep the unused tail alive
            out, out_len = out[:m].copy(), out_len[:m].copy()
        return out, offsets, out_len
    order = np.empty(n, np.int32)
    start, count = _kernels.sort_desc(room, cap, over, tie_seed, order)
    if algorithm == "ffd":
        # A leaf per bin FFD may open; numpy's zeros are pages mapped on first touch, and
        # FFD touches the leaves of run starts only (see _kernels).
        leaves = max(_kernels.ffd_bins_bound(count, cap, per_bin), 1)
        tree = np.zeros(2 << (leaves - 1).bit_length(), np.int32)
        placed, n_placed, n_bins = _kernels.ffd(start, count, cap, per_bin, tree)
        del tree
    else:
        placed, n_placed, n_bins = _kernels.bfd(start, count, cap, per_bin)
    # The placements fix every bin's size before any item is written: the CSR arrays are
    # allocated at their final sizes.
    offsets = np.empty(n_bins + 1, np.int64)
    _kernels.bin_offsets(placed, n_placed, offsets)
    m = int(offsets[-1])
    out = np.empty(m, np.int64)
    out_len = np.empty(m, np.int64)
    _kernels.bin_items(placed, n_placed, order, offsets, out, out_len)
    return out, offsets, out_len


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

    lengths: 1-D integer array-like, one length (>= 1) per sequence; seq_len: bin capacity
    in tokens, 1 <= seq_len <= 2**24.

    algorithm: `"ffd"` (first-fit decreasing over the whole dataset; the default),
      `"bfd"` (best-fit decreasing) or `"greedy"` (order-preserving next fit).
    max_per_bin: at most this many items per bin (None: no limit).
    overlong: what to do with sequences longer than `seq_len`: `"error"`, `"drop"`,
      `"truncate"` or `"split"` (see the module docstring).
    seed: breaks ties between equal lengths for ffd/bfd (a seeded shuffle, so dataset
      neighbours are not packed together systematically); None keeps dataset order.
      Equal lengths are interchangeable, so it never changes the bins' sizes, only which
      of the equal-length sequences fill them. greedy ignores it.
    pad_multiple: every item reserves its length rounded up to this multiple; use
      `2 * cp_size` under context parallelism so that the per-sequence padding the
      collators add always fits. `seq_len` must be a multiple of it.
    """
    cap = positive_int("seq_len", seq_len, MAX_SEQ_LEN)
    if algorithm not in ALGORITHMS:
        raise PackingError(
            f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}"
        )
    if overlong not in OVERLONG_POLICIES:
        raise PackingError(
            f"unknown overlong policy {overlong!r}; choose one of {', '.join(OVERLONG_POLICIES)}"
        )
    per_bin = (
        MAX_ITEMS if max_per_bin is None else positive_int("max_per_bin", max_per_bin, MAX_ITEMS)
    )
    multiple = positive_int("pad_multiple", pad_multiple, cap)
    if cap % multiple:
        raise PackingError(f"seq_len={cap} must be a multiple of pad_multiple={multiple}")
    tie_seed = -1 if seed is None else check_seed(seed)
    lens = validate_lengths(lengths)

    items = _apply_overlong(lens, cap, overlong, ordered=algorithm == "greedy")
    if items.lens.shape[0] > MAX_ITEMS:
        raise PackingError(f"splitting makes {items.lens.shape[0]} pieces, more than {MAX_ITEMS}")
    room = np.ascontiguousarray(items.lens)
    if not room.flags.writeable:  # numba compiles read-only arrays as another type
        room = room.copy()
    if multiple > 1:
        # Rounding up may push a length of exactly seq_len - r above seq_len: clip first.
        room = -(-np.minimum(room, cap) // multiple) * multiple
        if items.over == _kernels.SKIP:
            room[items.dropped] = 0

    order, offsets, packed_room = _run_kernel(algorithm, room, cap, items.over, per_bin, tie_seed)
    packed_lens = packed_room if multiple == 1 else np.minimum(items.lens[order], cap)
    n = lens.shape[0]
    starts = np.zeros(order.shape[0], np.int64)
    if items.extra_src.shape[0]:
        # Map split pieces (items >= n) back to their source sequence and first token.
        # `order` is the kernel's fresh array: rewrite it in place.
        piece = np.flatnonzero(order >= n)
        extra = order[piece] - n
        order[piece] = items.extra_src[extra]
        starts[piece] = items.extra_start[extra]
    return PackResult(
        indices=order,
        offsets=offsets,
        lengths=packed_lens,
        starts=starts,
        seq_len=cap,
        algorithm=algorithm,
        n_input=int(n),
        dropped=items.dropped,
        n_truncated=items.n_truncated,
        n_split=items.n_split,
        pad_multiple=multiple,
    )


def shuffle_bins(result: PackResult, epoch: int, seed: int = 0) -> IntArray:
    """A permutation of the bin ids: the bin order of `epoch`, a pure function of
    (seed, epoch, number of bins). Bins come out of packing sorted by their longest
    sequence; training in that order would be far from random."""
    rng = np.random.default_rng([check_seed(seed), check_epoch(epoch), 0xB1])
    return rng.permutation(result.n_bins).astype(np.int64)
