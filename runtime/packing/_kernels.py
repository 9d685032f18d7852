"""Numba kernels: the hot loops of the packing pipeline.

What every kernel here guarantees, given what the callers in this package ensure first
(`lens` is int64 with lens[i] >= 0, cap < 2**31, max_per_bin >= 1):

- an item's length is `lens[i]`, except that above `cap` it is `cap` when `over` is
  CLIP (truncation) and 0 when `over` is SKIP; an item of length 0 is left out (dropped),
  so the overlong policies cost no extra pass or array;
- the packing kernels fill a CSR layout (`greedy` directly; `ffd` and `bfd` place the
  items `sort_desc` sorted, then `bin_offsets` and `bin_items` write the placements out):
  bin b holds the item positions `out[offsets[b]:offsets[b + 1]]`, `out_len[j]` is the
  length of item `out[j]`; every
  item of length >= 1 appears exactly once, no other does; no bin is empty, no bin's
  lengths sum above `cap`, no bin holds more than `max_per_bin` items; bins are numbered
  in the order they were opened;
- results are pure functions of the arguments (the seed included): no global RNG state;
- the large arrays (one or two words per item or bin, FFD's tree with a leaf per bin it
  may open) are allocated by the caller, with numpy: numpy asks Linux for transparent huge
  pages on large arrays and gets its zeros as untouched pages, while an array allocated
  inside a numba function is faulted in 4 KiB pages (and np.zeros there writes every
  one), which at 16M items costs about as much as the packing itself;
- every kernel is compiled with `cache=True`, so the JIT cost is paid once per machine and
  later processes load the machine code from `__pycache__`.

Complexities: `ffd` and `bfd` are O(n + cap + p * log(bins or cap)) for p placements (at
most n, usually thousands). A counting sort replaces the comparison sort. Placing then
works on groups of bins, not on items: the first-fit (or best-fit) bin for a length is
the first of a group of bins in one state, each of which takes the same number of items
of that length, so a length visits a few groups, and a group is placed in one step (a
placement). FFD keeps its groups as runs of consecutive bins with a max segment tree over
their first bins; BFD keeps per-room stacks of segments of bins with a count tree over
rooms. On 16M SQuAD lengths at seq_len 384 (7.3M bins) each makes about 600 placements:
the O(n) parts (the sort, writing the CSR arrays from the placements) are the whole cost.
"""

from __future__ import annotations

import numba
import numpy as np
from numpy.typing import NDArray

CLIP = 0  # lengths above cap count as cap (overlong="truncate")
SKIP = 1  # lengths above cap count as 0, i.e. dropped (overlong="drop")

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@numba.njit(cache=True)
def _splitmix64(x: np.uint64) -> np.uint64:  # pragma: no cover - compiled
    # SplitMix64 finaliser: a fixed, documented bijection, so streams do not depend on the
    # numpy or numba version (np.random inside njit would).
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@numba.njit(cache=True)
def _below(state: np.uint64, bound: int) -> np.int64:  # pragma: no cover - compiled
    # Uniform-enough integer in [0, bound) for bound < 2**31: 31 random bits scaled down
    # (multiply-shift instead of modulo; the bias is below 2**-31 * bound).
    return np.int64(((state >> np.uint64(33)) * np.uint64(bound)) >> np.uint64(31))


@numba.njit(cache=True)
def mix_seed(a: int, b: int, c: int) -> np.uint64:  # pragma: no cover
    """Derive one 64-bit stream state from three integers (seed, epoch, bin)."""
    h = _splitmix64(np.uint64(a))
    h = _splitmix64(h ^ np.uint64(b))
    return _splitmix64(h ^ np.uint64(c))


@numba.njit(cache=True)
def _length(lens: NDArray[np.int64], i: int, cap: int, over: int) -> int:  # pragma: no cover
    x = lens[i]
    if x > cap:
        return cap if over == CLIP else 0
    return x


@numba.njit(cache=True)
def _shuffle_range(
    values: NDArray[np.int32] | NDArray[np.int64], lo: int, hi: int, state: np.uint64
) -> np.uint64:  # pragma: no cover - compiled
    # Fisher-Yates over values[lo:hi]; returns the advanced stream state.
    for i in range(hi - 1, lo, -1):
        state = _splitmix64(state)
        j = lo + _below(state, i - lo + 1)
        t = values[i]
        values[i] = values[j]
        values[j] = t
    return state


@numba.njit(cache=True)
def sort_desc(
    lens: NDArray[np.int64], cap: int, over: int, seed: int, order: NDArray[np.int32]
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:  # pragma: no cover
    """Counting sort by decreasing length, O(n + cap) instead of O(n log n): fills `order`
    with the item positions, longest first, the dropped (length 0) last; returns (start,
    count), the items of length L being order[start[L]:start[L] + count[L]]. Equal
    lengths keep input order when seed < 0, otherwise they are shuffled with the seed, so
    that neighbours in the dataset (often near-duplicates) do not all land in one bin."""
    n = lens.shape[0]
    count = np.zeros(cap + 1, np.int64)
    for i in range(n):
        count[_length(lens, i, cap, over)] += 1
    start = np.zeros(cap + 2, np.int64)
    pos = 0
    for length in range(cap, -1, -1):  # length 0 last: items the caller drops
        start[length] = pos
        pos += count[length]
    fill = start.copy()
    for i in range(n):
        length = _length(lens, i, cap, over)
        order[fill[length]] = i
        fill[length] += 1
    if seed >= 0:
        state = mix_seed(seed, 0x5EED, 0)
        for length in range(cap, 0, -1):
            if count[length] > 1:
                state = _shuffle_range(order, start[length], start[length] + count[length], state)
    return start, count


@numba.njit(cache=True)
def _tree_set(
    tree: NDArray[np.int32], size: int, leaf: int, value: int
) -> None:  # pragma: no cover
    # Point update of a max tree; stops as soon as an ancestor's maximum is unchanged.
    i = size + leaf
    tree[i] = value
    i >>= 1
    while i >= 1:
        m = max(tree[2 * i], tree[2 * i + 1])
        if tree[i] == m:
            break
        tree[i] = m
        i >>= 1


@numba.njit(cache=True)
def _first_fit_from(
    tree: NDArray[np.int32], size: int, lo: int, need: int
) -> int:  # pragma: no cover
    # Leftmost leaf >= lo whose value is >= need; the caller ensures one exists (tree[1] >=
    # need and every leaf left of lo is < need). Climb until a right sibling qualifies, then
    # descend to its leftmost qualifying leaf.
    i = size + lo
    if tree[i] >= need:
        return lo
    while i > 1:
        if (i & 1) == 0 and tree[i + 1] >= need:
            i += 1
            while i < size:
                i = 2 * i if tree[2 * i] >= need else 2 * i + 1
            return i - size
        i >>= 1
    return -1


# A placement is one step of FFD/BFD over groups of bins: `each` items of one length go
# into each of `bins` bins first, first + step, first + 2 * step, ..., filling each from
# slot `slot` on. Placements are recorded in packing order (length class by class, items
# in sorted order), so the items of one placement are consecutive in the sorted order.
_P_LEN, _P_ITEM, _P_FIRST, _P_STEP, _P_BINS, _P_EACH, _P_SLOT = range(7)


@numba.njit(cache=True)
def _record(
    placed: NDArray[np.int64], n: int, row: tuple[int, int, int, int, int, int, int]
) -> tuple[NDArray[np.int64], int]:  # pragma: no cover
    if n == placed.shape[0]:
        bigger = np.empty((2 * n, placed.shape[1]), np.int64)
        bigger[:n] = placed
        placed = bigger
    for k in range(len(row)):
        placed[n, k] = row[k]
    return placed, n + 1


@numba.njit(cache=True)
def bin_offsets(
    placed: NDArray[np.int64], n_placed: int, offsets: NDArray[np.int64]
) -> None:  # pragma: no cover
    """Fill `offsets` (n_bins + 1 long) from the placements of `ffd` or `bfd`: a bin's
    size is the slot after its last placement."""
    offsets[0] = 0
    for p in range(n_placed):
        b, step = placed[p, _P_FIRST], placed[p, _P_STEP]
        end = placed[p, _P_SLOT] + placed[p, _P_EACH]
        for _ in range(placed[p, _P_BINS]):
            offsets[b + 1] = end
            b += step
    for b in range(offsets.shape[0] - 1):
        offsets[b + 1] += offsets[b]


@numba.njit(cache=True)
def bin_items(
    placed: NDArray[np.int64],
    n_placed: int,
    order: NDArray[np.int32],
    offsets: NDArray[np.int64],
    out: NDArray[np.int64],
    out_len: NDArray[np.int64],
) -> None:  # pragma: no cover
    """Write the CSR items of the placements: bin b's item positions go to
    `out[offsets[b]:offsets[b + 1]]` in placement order (decreasing length, then sorted
    order: the order in which placing item by item would have appended them), their
    lengths to `out_len`."""
    for p in range(n_placed):
        length, t, b = placed[p, _P_LEN], placed[p, _P_ITEM], placed[p, _P_FIRST]
        step, each, slot = placed[p, _P_STEP], placed[p, _P_EACH], placed[p, _P_SLOT]
        for _ in range(placed[p, _P_BINS]):
            s = offsets[b] + slot
            for j in range(each):
                out[s + j] = order[t + j]
                out_len[s + j] = length
            t += each
            b += step


@numba.njit(cache=True)
def _set_run(
    tree: NDArray[np.int32],
    runs: NDArray[np.int64],
    first: int,
    end: int,
    room: int,
    items: int,
    max_per_bin: int,
) -> None:  # pragma: no cover
    # Bins first..end-1 now share one state, kept at the run's first bin, the only one of
    # them with a non-zero leaf (0 too when the bins are full).
    runs[first, 0] = end
    runs[first, 1] = room
    runs[first, 2] = items
    _tree_set(tree, tree.shape[0] // 2, first, room if items < max_per_bin else 0)


@numba.njit(cache=True)
def ffd_bins_bound(count: NDArray[np.int64], cap: int, max_per_bin: int) -> int:  # pragma: no cover
    """At most this many bins are opened by first fit (in any order) of the items counted
    in `count` (see `sort_desc`). Of the bins that are not full by count, at most one is
    half full or less (the first item of a later such bin would have fitted into it), so
    there are at most 2 * tokens / cap + 1 of those, and at most items // max_per_bin of
    the others; and never more bins than items."""
    items = 0
    tokens = 0
    for length in range(1, cap + 1):
        items += count[length]
        tokens += length * count[length]
    return min(items, items // max_per_bin + 2 * (tokens // cap) + 2)


@numba.njit(cache=True)
def ffd(
    start: NDArray[np.int64],
    count: NDArray[np.int64],
    cap: int,
    max_per_bin: int,
    tree: NDArray[np.int32],
) -> tuple[NDArray[np.int64], int, int]:  # pragma: no cover
    """First-fit decreasing over the sorted items of `sort_desc`; exact FFD (each item
    goes to the first bin, in opening order, with room). `tree` is zeros, 2 * size long,
    size a power of two >= `ffd_bins_bound`. Returns the placements, their number and the
    number of bins, for `bin_offsets` and `bin_items`."""
    # FFD over runs: maximal ranges of consecutive bins in one state (room, items). The
    # first bin with room for a length starts a run; first fit puts q = min(room // length,
    # max_per_bin - items) items into it, after which it has no room for this length, so
    # the next items go to the next bin of the run, and so on: the whole run takes q items
    # per bin and stays one run. Only the run where the items run out splits (bins that
    # took q, one bin that took the rest, bins that took none). Bins opened for a length
    # form a run too. The work is per run visited, not per item.
    size = tree.shape[0] // 2
    # Run state by first bin (end, room, items): read and written at run starts only, so
    # the pages of this large, uninitialised array that are never touched cost nothing.
    runs = np.empty((size, 3), np.int64)
    placed = np.empty((1024, 7), np.int64)
    n_placed = 0
    n_bins = 0
    for length in range(cap, 0, -1):
        m = count[length]
        t = start[length]
        lo = 0  # no bin left of lo has room for this length
        while m > 0:
            if tree[1] >= length:
                b = _first_fit_from(tree, size, lo, length)
                bins, room, k0 = runs[b, 0] - b, runs[b, 1], runs[b, 2]
            else:  # no open bin has room: open new ones
                if n_bins == size:
                    raise AssertionError("ffd: more bins than ffd_bins_bound")
                b, bins, room, k0 = n_bins, size - n_bins, cap, 0
            q = min(room // length, max_per_bin - k0)
            take, each = min(bins, m // q), q
            if take == 0:  # fewer than q items left: one bin takes them all
                take, each = 1, m
            placed, n_placed = _record(placed, n_placed, (length, t, b, 1, take, each, k0))
            t += take * each
            m -= take * each
            _set_run(tree, runs, b, b + take, room - each * length, k0 + each, max_per_bin)
            if b == n_bins:
                n_bins += take
            elif take < bins:  # the rest of the run keeps its state
                _set_run(tree, runs, b + take, b + bins, room, k0, max_per_bin)
            lo = b + take
    return placed, n_placed, n_bins


@numba.njit(cache=True)
def _count_add(tree: NDArray[np.int64], leaf: int, delta: int) -> None:  # pragma: no cover
    i = tree.shape[0] // 2 + leaf
    while i >= 1:
        tree[i] += delta
        i >>= 1


@numba.njit(cache=True)
def _first_at_least(tree: NDArray[np.int64], lo: int) -> int:  # pragma: no cover
    # Smallest leaf index >= lo with a non-zero count, or -1: climb until a right sibling
    # holds something, then descend to its leftmost non-empty leaf.
    size = tree.shape[0] // 2
    i = size + lo
    if tree[i] > 0:
        return lo
    while i > 1:
        if (i & 1) == 0 and tree[i + 1] > 0:
            i += 1
            while i < size:
                i = 2 * i if tree[2 * i] > 0 else 2 * i + 1
            return i - size
        i >>= 1
    return -1


@numba.njit(cache=True)
def bfd(
    start: NDArray[np.int64], count: NDArray[np.int64], cap: int, max_per_bin: int
) -> tuple[NDArray[np.int64], int, int]:  # pragma: no cover
    """Best-fit decreasing over the sorted items of `sort_desc`: each item goes to an open
    bin with the least room that still fits it (ties: the bin that reached that room
    last). Returns the placements, their number and the number of bins, as `ffd`."""
    # BFD keeps, per room c, a stack of the open bins with exactly that room; an item goes
    # to the top bin of the smallest non-empty stack >= its length. The stacks hold
    # segments instead of bins: bins first, first + step, ... (top first) in one state.
    # Best fit puts q = min(c // length, max_per_bin - items) items into the top bin, which
    # then has no room for this length, so the next items go to the next bin of the same
    # stack: a whole segment takes q items per bin and lands on the stack of room
    # c - q * length, reversed (its top bin is pushed first). Only the segment where the
    # items run out splits. A bin with less room than the shortest item, or full, closes.
    smallest = 1
    for length in range(1, cap + 1):
        if count[length] > 0:
            smallest = length
            break
    size = 1
    while size < cap + 1:
        size *= 2
    tree = np.zeros(2 * size, np.int64)  # leaf c: number of segments on stack c
    head = np.full(cap + 1, -1, np.int64)  # top segment of each stack
    seg = np.empty((1024, 5), np.int64)  # first bin, step, bins, items per bin, next below
    n_seg = 0
    placed = np.empty((1024, 7), np.int64)
    n_placed = 0
    n_bins = 0
    for length in range(cap, 0, -1):
        m = count[length]
        t = start[length]
        while m > 0:
            c = _first_at_least(tree, length)
            if c >= 0:
                s = head[c]
                first, step, bins, k0 = seg[s, 0], seg[s, 1], seg[s, 2], seg[s, 3]
                room = c
            else:  # no open bin has room: open new ones
                s, first, step, bins, k0, room = -1, n_bins, 1, m, 0, cap
            q = min(room // length, max_per_bin - k0)
            take, each = min(bins, m // q), q
            if take == 0:  # fewer than q items left: one bin takes them all
                take, each = 1, m
            placed, n_placed = _record(placed, n_placed, (length, t, first, step, take, each, k0))
            t += take * each
            m -= take * each
            if s < 0:
                n_bins += take
            elif take == bins:  # the whole segment leaves its stack
                head[c] = seg[s, 4]
                _count_add(tree, c, -1)
            else:  # its rest stays on top
                seg[s, 0] = first + step * take
                seg[s, 2] = bins - take
                s = -1
            new_room = room - each * length
            if new_room < smallest or k0 + each >= max_per_bin:
                continue  # these bins are closed
            if s < 0:
                if n_seg == seg.shape[0]:
                    bigger = np.empty((2 * n_seg, 5), np.int64)
                    bigger[:n_seg] = seg
                    seg = bigger
                s = n_seg
                n_seg += 1
            seg[s, 0] = first + step * (take - 1)
            seg[s, 1] = -step
            seg[s, 2] = take
            seg[s, 3] = k0 + each
            seg[s, 4] = head[new_room]
            head[new_room] = s
            _count_add(tree, new_room, 1)
    return placed, n_placed, n_bins


@numba.njit(cache=True)
def greedy(
    lens: NDArray[np.int64],
    cap: int,
    over: int,
    max_per_bin: int,
    offsets: NDArray[np.int64],
    out: NDArray[np.int64],
    out_len: NDArray[np.int64],
) -> tuple[int, int]:  # pragma: no cover
    """Order-preserving next fit: a bin is closed as soon as the next item does not fit.
    Fills the caller's buffers; returns (number of bins, number of items placed)."""
    n = lens.shape[0]
    offsets[0] = 0
    n_bins = 0
    used = 0
    items = 0
    m = 0
    for i in range(n):
        length = _length(lens, i, cap, over)
        if length == 0:
            continue
        if items > 0 and (used + length > cap or items == max_per_bin):
            n_bins += 1
            offsets[n_bins] = m
            used = 0
            items = 0
        out[m] = i
        out_len[m] = length
        m += 1
        used += length
        items += 1
    if m > 0:
        n_bins += 1
        offsets[n_bins] = m
    return n_bins, m


@numba.njit(cache=True)
def shuffled_items(
    offsets: NDArray[np.int64], bins: NDArray[np.int64], seed: int, epoch: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:  # pragma: no cover - compiled
    """Item positions of `bins` (in that order), each bin's items shuffled with a stream
    derived from (seed, epoch, bin) alone, so a bin's order is the same whichever rank or
    call asks for it. A bin id < 0 is an empty padding bin. Returns a CSR layout."""
    m = bins.shape[0]
    sub = np.zeros(m + 1, np.int64)
    for i in range(m):
        b = bins[i]
        sub[i + 1] = sub[i] + (offsets[b + 1] - offsets[b] if b >= 0 else 0)
    out = np.empty(sub[m], np.int64)
    for i in range(m):
        b = bins[i]
        if b < 0:
            continue
        lo = sub[i]
        for t in range(offsets[b + 1] - offsets[b]):
            out[lo + t] = offsets[b] + t
        _shuffle_range(out, lo, sub[i + 1], mix_seed(seed, epoch, b))
    return out, sub


@numba.njit(cache=True)
def deal_steps(
    epoch_bins: NDArray[np.int64],
    cost: NDArray[np.float64],
    dp: int,
    micro: int,
    window: int,
) -> NDArray[np.int64]:  # pragma: no cover - compiled
    """Assign the bins of each step to ranks, balancing `cost` (LPT with equal counts).

    `epoch_bins` holds steps * dp * micro bin ids (-1: an empty padding bin) in epoch
    order. The bins of `window` consecutive steps are pooled, sorted by decreasing cost and
    cut into steps of similar cost (window=1: each step keeps its own bins); inside a step
    each bin, heaviest first, goes to the rank with the least cost so far among those that
    still have fewer than `micro` bins. Returns [steps, dp, micro] bin ids.
    """
    group = dp * micro
    steps = epoch_bins.shape[0] // group
    out = np.empty((steps, dp, micro), np.int64)
    load = np.empty(dp, np.float64)
    filled = np.empty(dp, np.int64)
    for w0 in range(0, steps, window):
        w1 = min(w0 + window, steps)
        pool = epoch_bins[w0 * group : w1 * group]
        keys = np.empty(pool.shape[0], np.float64)
        for i in range(pool.shape[0]):
            keys[i] = -cost[pool[i]] if pool[i] >= 0 else 1.0  # padding bins last
        ranked = pool[np.argsort(keys, kind="mergesort")]
        for s in range(w1 - w0):
            load[:] = 0.0
            filled[:] = 0
            for g in range(group):
                b = ranked[s * group + g]
                best = -1
                for r in range(dp):
                    if filled[r] < micro and (best < 0 or load[r] < load[best]):
                        best = r
                out[w0 + s, best, filled[best]] = b
                filled[best] += 1
                if b >= 0:
                    load[best] += cost[b]
    return out
