"""Numba kernels: the hot loops of the packing pipeline.

What every kernel here guarantees, given what the callers in this package ensure first
(`lens` is int64 with lens[i] >= 0, cap < 2**31, max_per_bin >= 1):

- an item's length is `lens[i]`, except that above `cap` it is `cap` when `over` is
  CLIP (truncation) and 0 when `over` is SKIP; an item of length 0 is left out (dropped),
  so the overlong policies cost no extra pass or array;
- the packing kernels fill a CSR layout: bin b holds the item positions
  `out[offsets[b]:offsets[b + 1]]`, `out_len[j]` is the length of item `out[j]`; every
  item of length >= 1 appears exactly once, no other does; no bin is empty, no bin's
  lengths sum above `cap`, no bin holds more than `max_per_bin` items; bins are numbered
  in the order they were opened;
- results are pure functions of the arguments (the seed included): no global RNG state;
- the large arrays (one or two words per item) are allocated by the caller, with numpy:
  numpy asks Linux for transparent huge pages on large arrays, while an array allocated
  inside a numba function is faulted in 4 KiB pages, which at 16M items costs about as
  much as the packing itself;
- every kernel is compiled with `cache=True`, so the JIT cost is paid once per machine and
  later processes load the machine code from `__pycache__`.

Complexities: `ffd` and `bfd` are O(n + cap + runs * log(bins or cap)), where a "run" is a
maximal group of equal-length items placed into one bin at once (at most n, usually far
fewer): a counting sort replaces the comparison sort, a max segment tree over the bins'
free space finds the first bin with room (FFD), and per-capacity bin stacks with a count
tree over capacities find the tightest bin with room (BFD).
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
def _sort_desc(
    lens: NDArray[np.int64], cap: int, over: int, seed: int, order: NDArray[np.int32]
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:  # pragma: no cover
    # Counting sort by decreasing length: O(n + cap) instead of O(n log n). Equal lengths
    # keep input order when seed < 0, otherwise they are shuffled with the seed, so that
    # neighbours in the dataset (often near-duplicates) do not all land in the same bins.
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


@numba.njit(cache=True)
def _tree_grow(tree: NDArray[np.int32], size: int) -> NDArray[np.int32]:  # pragma: no cover
    # Double the number of leaves; new leaves are 0 (never chosen), internal nodes rebuilt.
    new = np.zeros(4 * size, np.int32)
    new[2 * size : 3 * size] = tree[size : 2 * size]
    for i in range(2 * size - 1, 0, -1):
        new[i] = max(new[2 * i], new[2 * i + 1])
    return new


@numba.njit(cache=True)
def _grow(a: NDArray[np.int64], n: int) -> NDArray[np.int64]:  # pragma: no cover
    b = np.empty(n, np.int64)
    b[: a.shape[0]] = a
    return b


@numba.njit(cache=True)
def _csr(
    order: NDArray[np.int32],
    start: NDArray[np.int64],
    count: NDArray[np.int64],
    bin_of: NDArray[np.int32],
    counts: NDArray[np.int64],
    n_bins: int,
    out: NDArray[np.int64],
    out_len: NDArray[np.int64],
) -> NDArray[np.int64]:  # pragma: no cover
    # Group the sorted items by bin with one stable scatter; inside a bin items keep the
    # sorted (decreasing length) order. The lengths are written per length class, which
    # saves a random gather of 8 bytes per item later. Returns the bin offsets.
    offsets = np.zeros(n_bins + 1, np.int64)
    for b in range(n_bins):
        offsets[b + 1] = offsets[b] + counts[b]
    fill = offsets[:-1].copy()
    for length in range(start.shape[0] - 2, 0, -1):
        for t in range(start[length], start[length] + count[length]):
            b = bin_of[t]
            p = fill[b]
            out[p] = order[t]
            out_len[p] = length
            fill[b] = p + 1
    return offsets


@numba.njit(cache=True)
def ffd(
    lens: NDArray[np.int64],
    cap: int,
    over: int,
    max_per_bin: int,
    seed: int,
    order: NDArray[np.int32],
    bin_of: NDArray[np.int32],
    out: NDArray[np.int64],
    out_len: NDArray[np.int64],
) -> NDArray[np.int64]:  # pragma: no cover
    """First-fit decreasing over all items; exact FFD (each item goes to the first bin,
    in opening order, with room), computed in O(n + cap + runs * log bins)."""
    n = lens.shape[0]
    start, count = _sort_desc(lens, cap, over, seed, order)
    total = 0
    for length in range(1, cap + 1):
        total += length * count[length]
    # First fit leaves at most one bin half empty, so it opens < 2 * total / cap + 1 bins;
    # the tree still grows if max_per_bin closes bins early.
    size = 1
    while size < min(n, 2 * (total // cap) + 2):
        size *= 2
    # int32 leaves (cap < 2**31) halve the tree's cache footprint.
    tree = np.zeros(2 * size, np.int32)  # leaf b: room in bin b, 0 once closed
    rem = np.empty(size, np.int64)
    cnt = np.empty(size, np.int64)
    n_bins = 0
    for length in range(cap, 0, -1):
        j = start[length]
        end = j + count[length]
        finger = 0
        while j < end:
            if tree[1] >= length:
                # Rooms only shrink, so the first bin with room for this length is never left
                # of the previous answer for the same length: search onward from it (a finger
                # search, O(log distance) and cache-local) instead of from the root.
                b = _first_fit_from(tree, size, finger, length)
                finger = b
                # The first bin with room for one item of this length stays the first one
                # for the next item of the same length as long as it has room: place the
                # whole run at once, one tree update instead of k.
                k = min(rem[b] // length, end - j, max_per_bin - cnt[b])
            else:
                if n_bins == size:
                    tree = _tree_grow(tree, size)
                    size *= 2
                    rem = _grow(rem, size)
                    cnt = _grow(cnt, size)
                b = n_bins
                n_bins += 1
                rem[b] = cap
                cnt[b] = 0
                k = min(cap // length, end - j, max_per_bin)
            for t in range(j, j + k):
                bin_of[t] = b
            j += k
            rem[b] -= k * length
            cnt[b] += k
            _tree_set(tree, size, b, rem[b] if cnt[b] < max_per_bin else 0)
    return _csr(order, start, count, bin_of, cnt, n_bins, out, out_len)


@numba.njit(cache=True)
def _count_add(
    tree: NDArray[np.int64], size: int, leaf: int, delta: int
) -> None:  # pragma: no cover
    i = size + leaf
    while i >= 1:
        tree[i] += delta
        i >>= 1


@numba.njit(cache=True)
def _first_at_least(tree: NDArray[np.int64], size: int, lo: int) -> int:  # pragma: no cover
    # Smallest leaf index >= lo with a non-zero count, or -1: climb until a right sibling
    # holds something, then descend to its leftmost non-empty leaf.
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
    lens: NDArray[np.int64],
    cap: int,
    over: int,
    max_per_bin: int,
    seed: int,
    order: NDArray[np.int32],
    bin_of: NDArray[np.int32],
    out: NDArray[np.int64],
    out_len: NDArray[np.int64],
) -> NDArray[np.int64]:  # pragma: no cover
    """Best-fit decreasing: each item goes to an open bin with the least room that still
    fits it (ties: the bin that reached that room last), in O(n + cap + runs * log cap)."""
    start, count = _sort_desc(lens, cap, over, seed, order)
    smallest = 1
    for length in range(1, cap + 1):
        if count[length] > 0:
            smallest = length
            break
    size = 1
    while size < cap + 1:
        size *= 2
    tree = np.zeros(2 * size, np.int64)  # leaf c: number of open bins with room exactly c
    head = np.full(cap + 1, -1, np.int64)  # per-room stack of bins (intrusive list)
    nxt = np.empty(1024, np.int64)
    rem = np.empty(1024, np.int64)
    cnt = np.empty(1024, np.int64)
    n_bins = 0
    for length in range(cap, 0, -1):
        j = start[length]
        end = j + count[length]
        while j < end:
            c = _first_at_least(tree, size, length)
            if c >= 0:
                b = head[c]
                head[c] = nxt[b]
                _count_add(tree, size, c, -1)
                # Once placed, the bin's new room c - length is the tightest fit left for
                # this length (a tighter one would have been chosen), so a run goes in at once.
                k = min(c // length, end - j, max_per_bin - cnt[b])
            else:
                if n_bins == rem.shape[0]:
                    nxt = _grow(nxt, 2 * n_bins)
                    rem = _grow(rem, 2 * n_bins)
                    cnt = _grow(cnt, 2 * n_bins)
                b = n_bins
                n_bins += 1
                rem[b] = cap
                cnt[b] = 0
                k = min(cap // length, end - j, max_per_bin)
            for t in range(j, j + k):
                bin_of[t] = b
            j += k
            rem[b] -= k * length
            cnt[b] += k
            # A bin with less room than the shortest item, or at max_per_bin, is closed.
            if rem[b] >= smallest and cnt[b] < max_per_bin:
                nxt[b] = head[rem[b]]
                head[rem[b]] = b
                _count_add(tree, size, rem[b], 1)
    return _csr(order, start, count, bin_of, cnt, n_bins, out, out_len)


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
