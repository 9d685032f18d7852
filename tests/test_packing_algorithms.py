"""pack(): validity for any input (property tests), exactness against plain-Python
reference algorithms, real-data efficiency, epoch shuffling, and input errors."""

from __future__ import annotations

import hashlib
import itertools
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshplan.runtime.packing import (
    ALGORITHMS,
    OVERLONG_POLICIES,
    SQUAD11_HISTOGRAM,
    PackingError,
    PackResult,
    load_lengths,
    lower_bound_l2,
    pack,
    shuffle_bins,
)

# ---------------------------------------------------------------------------------------
# Plain-Python references: slow, obviously right, same tie rules as documented.
# ---------------------------------------------------------------------------------------


def ref_ffd(sizes: list[int], cap: int, max_per_bin: int | None) -> list[list[int]]:
    """First-fit decreasing over item positions; equal sizes keep position order."""
    limit = max_per_bin or len(sizes)
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        for b in range(len(bins)):
            if room[b] >= sizes[i] and len(bins[b]) < limit:
                bins[b].append(i)
                room[b] -= sizes[i]
                break
        else:
            bins.append([i])
            room.append(cap - sizes[i])
    return bins


def ref_bfd_count(sizes: list[int], cap: int) -> int:
    """Number of bins of best-fit decreasing (ties between bins do not change it)."""
    room: list[int] = []
    for s in sorted(sizes, reverse=True):
        fits = [b for b in range(len(room)) if room[b] >= s]
        if fits:
            b = min(fits, key=lambda b: room[b])
            room[b] -= s
        else:
            room.append(cap - s)
    return len(room)


def ref_bfd(sizes: list[int], cap: int, max_per_bin: int | None) -> list[list[int]]:
    """Best-fit decreasing over item positions, equal sizes in position order: each item
    goes to the open bin with the least room that fits it; among bins with that room, the
    one that reached it last (a stack per room)."""
    limit = max_per_bin or len(sizes)
    bins: list[list[int]] = []
    room: list[int] = []
    reached: list[int] = []  # when each bin last changed room
    for clock, i in enumerate(sorted(range(len(sizes)), key=lambda i: -sizes[i])):
        fits = [b for b in range(len(bins)) if room[b] >= sizes[i] and len(bins[b]) < limit]
        if fits:
            b = min(fits, key=lambda b: (room[b], -reached[b]))
        else:
            b = len(bins)
            bins.append([])
            room.append(cap)
            reached.append(0)
        bins[b].append(i)
        room[b] -= sizes[i]
        reached[b] = clock
    return bins


def ref_next_fit(sizes: list[int], cap: int, max_per_bin: int | None) -> list[list[int]]:
    limit = max_per_bin or len(sizes)
    bins: list[list[int]] = [[]]
    used = 0
    for i, s in enumerate(sizes):
        if bins[-1] and (used + s > cap or len(bins[-1]) == limit):
            bins.append([])
            used = 0
        bins[-1].append(i)
        used += s
    return bins


def bins_of(r: PackResult) -> list[list[int]]:
    return [r.indices[r.offsets[b] : r.offsets[b + 1]].tolist() for b in range(r.n_bins)]


def bin_sizes(r: PackResult, m: int) -> list[list[int]]:
    """Per bin, the sorted room its items take (lengths rounded up to m)."""
    return [
        sorted(round_up(int(x), m) for x in r.lengths[r.offsets[b] : r.offsets[b + 1]])
        for b in range(r.n_bins)
    ]


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def check_valid(
    r: PackResult,
    lengths: list[int],
    seq_len: int,
    overlong: str,
    max_per_bin: int | None,
    pad_multiple: int,
) -> None:
    """Every invariant `pack` promises, checked from scratch."""
    n = len(lengths)
    assert r.seq_len == seq_len and r.n_input == n
    assert r.indices.dtype == np.int64 and r.offsets.dtype == np.int64
    assert r.offsets[0] == 0 and r.offsets[-1] == r.n_sequences
    counts = np.diff(r.offsets)
    assert (counts >= 1).all(), "empty bin"
    if max_per_bin is not None:
        assert (counts <= max_per_bin).all()
    for b in range(r.n_bins):
        lo, hi = r.offsets[b], r.offsets[b + 1]
        assert sum(round_up(int(x), pad_multiple) for x in r.lengths[lo:hi]) <= seq_len
    # Every item is a token range inside its source sequence.
    src = np.asarray(lengths)[r.indices]
    assert (r.lengths >= 1).all() and (r.starts >= 0).all()
    assert (r.starts + r.lengths <= src).all()
    over = [i for i, x in enumerate(lengths) if x > seq_len]
    pieces: dict[int, list[tuple[int, int]]] = {}
    for i, s, n_tok in zip(r.indices.tolist(), r.starts.tolist(), r.lengths.tolist(), strict=True):
        pieces.setdefault(i, []).append((s, n_tok))
    if overlong == "drop":
        assert r.dropped.tolist() == over
        assert sorted(pieces) == [i for i in range(n) if i not in set(over)]
    else:
        assert r.n_dropped == 0
        assert sorted(pieces) == list(range(n)), "a sequence is missing or repeated"
    for i, parts in pieces.items():
        if overlong == "split":
            parts.sort()
            assert parts[0][0] == 0
            for (s0, n0), (s1, _) in itertools.pairwise(parts):
                assert s0 + n0 == s1, f"pieces of {i} do not tile it"
            assert parts[-1][0] + parts[-1][1] == lengths[i]
        else:
            assert parts == [(0, min(lengths[i], seq_len))]
    assert r.n_truncated == (len(over) if overlong == "truncate" else 0)
    assert r.n_split == (len(over) if overlong == "split" else 0)
    assert r.tokens == int(r.lengths.sum())
    assert r.padding_tokens == r.n_bins * seq_len - r.tokens
    assert r.efficiency == pytest.approx(r.tokens / (r.n_bins * seq_len))


@st.composite
def instances(draw: st.DrawFn) -> tuple[list[int], int, int, int | None]:
    pad_multiple = draw(st.sampled_from([1, 1, 2, 4]))
    seq_len = pad_multiple * draw(st.integers(1, 24))
    lengths = draw(st.lists(st.integers(1, 3 * seq_len + 2), min_size=1, max_size=60))
    max_per_bin = draw(st.one_of(st.none(), st.integers(1, 5)))
    return lengths, seq_len, pad_multiple, max_per_bin


@settings(max_examples=250, deadline=None)
@given(
    instances(),
    st.sampled_from(ALGORITHMS),
    st.sampled_from(OVERLONG_POLICIES),
    st.one_of(st.none(), st.integers(0, 2**40)),
)
def test_any_input_gives_a_valid_packing(
    inst: tuple[list[int], int, int, int | None], algorithm: str, overlong: str, seed: int | None
) -> None:
    lengths, seq_len, pad_multiple, max_per_bin = inst
    longest = max(lengths)
    n_over = sum(x > seq_len for x in lengths)
    kwargs = dict(max_per_bin=max_per_bin, overlong=overlong, seed=seed, pad_multiple=pad_multiple)
    if n_over and overlong == "error":
        with pytest.raises(
            PackingError,
            match=rf"^{n_over} sequences? (is|are) longer than seq_len={seq_len} \(longest: {longest}\)",
        ):
            pack(lengths, seq_len, algorithm, **kwargs)
        return
    if n_over == len(lengths) and overlong == "drop":
        with pytest.raises(PackingError, match="nothing left to pack"):
            pack(lengths, seq_len, algorithm, **kwargs)
        return
    r = pack(lengths, seq_len, algorithm, **kwargs)
    check_valid(r, lengths, seq_len, overlong, max_per_bin, pad_multiple)


def _items(lengths: list[int], seq_len: int, overlong: str, m: int) -> list[int]:
    """Item sizes as the kernels see them for truncate/drop/no overlong (dropped: 0)."""
    out = []
    for x in lengths:
        if x > seq_len:
            x = seq_len if overlong == "truncate" else 0
        out.append(round_up(x, m))
    return out


@settings(max_examples=200, deadline=None)
@given(instances(), st.sampled_from(["truncate", "drop"]))
def test_ffd_and_greedy_equal_the_reference_exactly(
    inst: tuple[list[int], int, int, int | None], overlong: str
) -> None:
    lengths, seq_len, m, max_per_bin = inst
    if all(x > seq_len for x in lengths):
        return
    sizes = _items(lengths, seq_len, overlong, m)
    keep = [i for i, s in enumerate(sizes) if s > 0]
    kept = [sizes[i] for i in keep]
    ffd = pack(
        lengths,
        seq_len,
        "ffd",
        max_per_bin=max_per_bin,
        overlong=overlong,
        seed=None,
        pad_multiple=m,
    )
    assert bins_of(ffd) == [[keep[i] for i in b] for b in ref_ffd(kept, seq_len, max_per_bin)]
    greedy = pack(
        lengths, seq_len, "greedy", max_per_bin=max_per_bin, overlong=overlong, pad_multiple=m
    )
    assert bins_of(greedy) == [
        [keep[i] for i in b] for b in ref_next_fit(kept, seq_len, max_per_bin)
    ]
    # The tie-breaking seed swaps items of equal size, so the bins hold the same sizes.
    seeded = pack(
        lengths, seq_len, "ffd", max_per_bin=max_per_bin, overlong=overlong, seed=7, pad_multiple=m
    )
    assert bin_sizes(seeded, m) == bin_sizes(ffd, m)


@settings(max_examples=200, deadline=None)
@given(instances(), st.sampled_from(["truncate", "drop"]))
def test_bfd_equals_the_reference_exactly(
    inst: tuple[list[int], int, int, int | None], overlong: str
) -> None:
    lengths, seq_len, m, max_per_bin = inst
    if all(x > seq_len for x in lengths):
        return
    sizes = _items(lengths, seq_len, overlong, m)
    keep = [i for i, s in enumerate(sizes) if s > 0]
    kept = [sizes[i] for i in keep]
    bfd = pack(
        lengths,
        seq_len,
        "bfd",
        max_per_bin=max_per_bin,
        overlong=overlong,
        seed=None,
        pad_multiple=m,
    )
    assert bins_of(bfd) == [[keep[i] for i in b] for b in ref_bfd(kept, seq_len, max_per_bin)]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from([1, 2, 3, 5, 8, 13, 21]), min_size=1, max_size=400),
    st.sampled_from([21, 24, 34, 40]),
    st.one_of(st.none(), st.integers(1, 4)),
)
def test_many_equal_lengths_equal_the_references(
    lengths: list[int], seq_len: int, max_per_bin: int | None
) -> None:
    # Few distinct lengths, many of each: the kernels place whole groups of bins at once,
    # split them where a length runs out, and open many bins in one step.
    for algorithm, ref in (("ffd", ref_ffd), ("bfd", ref_bfd)):
        r = pack(lengths, seq_len, algorithm, max_per_bin=max_per_bin, seed=None)
        assert bins_of(r) == ref(lengths, seq_len, max_per_bin), algorithm


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 40).flatmap(
        lambda c: st.tuples(st.just(c), st.lists(st.integers(1, c), min_size=1, max_size=60))
    )
)
def test_bfd_bin_count_equals_the_reference_and_bounds_hold(case: tuple[int, list[int]]) -> None:
    seq_len, lengths = case
    r = pack(lengths, seq_len, "bfd")
    assert r.n_bins == ref_bfd_count(lengths, seq_len)
    ffd = pack(lengths, seq_len, "ffd")
    assert lower_bound_l2(lengths, seq_len) <= min(r.n_bins, ffd.n_bins)


def test_split_pieces_are_identified_by_source_and_start() -> None:
    r = pack([25, 3], 10, "greedy", overlong="split")
    assert r.indices.tolist() == [0, 0, 0, 1]
    assert r.starts.tolist() == [0, 10, 20, 0]
    assert r.lengths.tolist() == [10, 10, 5, 3]
    assert r.offsets.tolist() == [0, 1, 2, 4]
    assert r.n_split == 1 and r.n_sequences == 4 and r.n_input == 2


def test_small_example_ffd_bins() -> None:
    r = pack([5, 3, 9, 2, 7, 1], 10, "ffd", seed=None)
    assert bins_of(r) == [[2, 5], [4, 1], [0, 3]]
    assert r.lengths.tolist() == [9, 1, 7, 3, 5, 2]
    assert (r.n_bins, r.tokens, r.padding_tokens) == (3, 27, 3)
    assert r.efficiency == pytest.approx(0.9)
    assert r.bin_tokens.tolist() == [10, 10, 7]
    assert r.bin_attention.tolist() == [82, 58, 29]


def test_result_arrays_are_read_only() -> None:
    r = pack([4, 4], 8)
    with pytest.raises(ValueError):
        r.indices[0] = 1


# ---------------------------------------------------------------------------------------
# Real data: the SQuAD 1.1 length histogram.
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def squad() -> np.ndarray:
    return load_lengths(SQUAD11_HISTOGRAM)


@pytest.mark.parametrize("algorithm", ["ffd", "bfd"])
def test_squad_efficiency_matches_whole_dataset_ffd(squad: np.ndarray, algorithm: str) -> None:
    # Whole-dataset FFD: 40631 bins at 384 (efficiency 0.977386, i.e. 97.74%) and 7466
    # bins at 2048 (0.997326, 99.73%). Exact FFD cannot reach the 4-digit 0.9774 itself,
    # so the bar is the percentage rounded as published, plus the exact bin counts.
    assert squad.shape[0] == 88641
    r384 = pack(squad, 384, algorithm)
    assert round(100 * r384.efficiency, 2) >= 97.74
    assert r384.n_bins <= 40631
    r2048 = pack(squad, 2048, algorithm)
    assert r2048.efficiency >= 0.9973
    assert r2048.n_bins <= 7466
    summary = r384.summary()
    assert summary["l2_bound"] == lower_bound_l2(r384.lengths, 384) == 39775
    assert summary["gap_to_l2"] == r384.n_bins - 39775
    assert summary["l1_bound"] == -(-int(squad.sum()) // 384)
    # The order-preserving baseline is far worse: what packing is for.
    assert pack(squad, 384, "greedy").efficiency < 0.80


# ---------------------------------------------------------------------------------------
# Bins frozen at scale: sha256 digests (first 16 hex digits) of indices, offsets, lengths,
# starts and dropped, as the per-item FFD/BFD kernels of c4f5421 computed them. The
# kernels now place groups of bins at once; these pin that the bins did not move.
# ---------------------------------------------------------------------------------------


def _uniform(n: int, salt: int) -> np.ndarray:
    """24-bit integers from a multiplicative hash: the same on every numpy version, unlike
    its random streams."""
    i = np.arange(n, dtype=np.uint64) + np.uint64(salt << 32)
    with np.errstate(over="ignore"):
        h = (i * np.uint64(0x9E3779B97F4A7C15)) ^ (i >> np.uint64(7))
        h = h * np.uint64(0xBF58476D1CE4E5B9)
    return (h >> np.uint64(40)).astype(np.int64)


def _frozen_lengths(name: str) -> np.ndarray:
    squad = load_lengths(SQUAD11_HISTOGRAM)
    if name == "squad":
        return squad
    if name == "squad-1M":  # resampled
        return squad[_uniform(1_000_000, 1) % squad.shape[0]]
    if name == "chat-200K":  # long-tailed, 16..8192
        return (16 + (_uniform(200_000, 2) / 2**24) ** 4 * 8176).astype(np.int64)
    if name == "uniform-64":
        return 1 + _uniform(100_000, 3) % 64
    assert name == "uniform-300"
    return 1 + _uniform(50_000, 4) % 300


def _digest(r: PackResult) -> str:
    h = hashlib.sha256()
    for a in (r.indices, r.offsets, r.lengths, r.starts, r.dropped):
        h.update(np.ascontiguousarray(a, dtype="<i8").tobytes())
    return h.hexdigest()[:16]


FROZEN: list[tuple[str, int, dict[str, Any], int, str, str]] = [
    # data, seq_len, pack() options, bins, ffd digest, bfd digest
    ("squad", 384, {}, 40631, "634ec17e48c88a70", "3d1f6a12930b3087"),
    ("squad", 384, {"seed": None}, 40631, "bb064264e21c7bb1", "20299c6c88abdaf7"),
    ("squad", 2048, {}, 7466, "276ffe42cb14233b", "f4f0f2593d23304e"),
    ("squad", 384, {"max_per_bin": 2}, 45335, "8e40062650183ed1", "fd26963f74d48cc1"),
    ("squad", 2048, {"max_per_bin": 3, "seed": 5}, 29547, "c5e693b95956002e", "c5e693b95956002e"),
    (
        "squad",
        256,
        {"overlong": "split", "pad_multiple": 8},
        70933,
        "ba5a21d9698a832d",
        "52dcca50ddd8d750",
    ),
    ("squad-1M", 384, {}, 457987, "d996bc85cb8942e1", "e44e3e31efe619bb"),
    ("squad-1M", 2048, {"seed": None}, 84165, "ab7f2a4eb6e3a11f", "33b593fce779acfd"),
    ("chat-200K", 4096, {"overlong": "truncate"}, 65821, "ef2ab66fd1fa17a6", "4f7fc5f5b37f923a"),
    ("chat-200K", 8192, {}, 40187, "fe48a7585006d668", "ea3e70facb686a9b"),
    (
        "chat-200K",
        2048,
        {"overlong": "drop", "max_per_bin": 4},
        47168,
        "2afc0e6207925d73",
        "7178f5a30f531b3d",
    ),
    ("uniform-64", 64, {"max_per_bin": 5}, 50933, "6604d86c90dfd3e8", "969cd0815f8ab50d"),
    ("uniform-64", 100, {}, 32540, "0aea2e2c2c8fc42b", "1a968276d5b160f0"),
    ("uniform-300", 300, {"seed": 11}, 25056, "b968cfd6e1bd9998", "502dbe49dac668c7"),
    ("uniform-300", 512, {"max_per_bin": 1}, 50000, "056f3a71dfbcf1d5", "056f3a71dfbcf1d5"),
]


@pytest.mark.parametrize(("data", "seq_len", "options", "bins", "ffd", "bfd"), FROZEN)
def test_bins_are_those_of_the_per_item_kernels(
    data: str, seq_len: int, options: dict[str, Any], bins: int, ffd: str, bfd: str
) -> None:
    lengths = _frozen_lengths(data)
    for algorithm, expected in (("ffd", ffd), ("bfd", bfd)):
        r = pack(lengths, seq_len, algorithm, **options)
        assert (r.n_bins, _digest(r)) == (bins, expected), algorithm


# ---------------------------------------------------------------------------------------
# Epoch order.
# ---------------------------------------------------------------------------------------


def test_shuffle_bins_is_a_deterministic_permutation_per_epoch() -> None:
    r = pack(np.arange(1, 400) % 37 + 1, 64)
    a = shuffle_bins(r, epoch=0, seed=3)
    assert sorted(a.tolist()) == list(range(r.n_bins))
    assert np.array_equal(a, shuffle_bins(r, epoch=0, seed=3))
    assert not np.array_equal(a, shuffle_bins(r, epoch=1, seed=3))
    assert not np.array_equal(a, shuffle_bins(r, epoch=0, seed=4))


def test_epoch_order_breaks_the_length_order_of_bins() -> None:
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(5.0, 1.0, 20_000), 1, 1024).astype(np.int64)
    r = pack(lengths, 1024)
    first = r.lengths[r.offsets[:-1]]
    # Straight out of FFD, bins are opened in decreasing order of their longest item and
    # each bin starts with its longest item.
    assert (np.diff(first) <= 0).all()
    pos, offsets = r.epoch_order(epoch=0, seed=0)
    assert sorted(pos.tolist()) == list(range(r.n_sequences))
    longest = np.maximum.reduceat(r.lengths[pos], offsets[:-1])
    ranks = np.arange(r.n_bins)
    assert abs(np.corrcoef(ranks, longest)[0, 1]) < 0.1
    # Inside bins: the first item is the longest about as often as chance says (k items,
    # t of them tied for longest: t / k), not always.
    multi = np.flatnonzero(np.diff(offsets) >= 2)
    first_is_longest = r.lengths[pos[offsets[multi]]] == longest[multi]
    chance = np.mean(
        [np.mean(r.lengths[pos[offsets[i] : offsets[i + 1]]] == longest[i]) for i in multi]
    )
    assert chance < 0.8
    assert abs(first_is_longest.mean() - chance) < 0.05
    # Each epoch segment holds exactly its bin's items.
    order = shuffle_bins(r, 0, 0)
    for i in (0, 1, r.n_bins - 1):
        seg = pos[offsets[i] : offsets[i + 1]]
        b = order[i]
        assert sorted(seg.tolist()) == list(range(r.offsets[b], r.offsets[b + 1]))
        assert np.array_equal(seg, r.bin_items(int(b), epoch=0, seed=0))


# ---------------------------------------------------------------------------------------
# Input errors: type and one-line message.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lengths", "seq_len", "kwargs", "message"),
    [
        ([], 8, {}, "lengths is empty: nothing to pack"),
        ([[1, 2], [3, 4]], 8, {}, "lengths must be 1-D, got shape (2, 2)"),
        ([1.0, 2.0], 8, {}, "lengths must be integers, got a float64 array"),
        ([True, False], 8, {}, "lengths must be integers, got a bool array"),
        (["a"], 8, {}, "lengths must be integers, got a <U1 array"),
        ([3, 0, 2], 8, {}, "lengths must be >= 1: 1 are not (first at index 1: 0)"),
        ([3, -2, -1], 8, {}, "lengths must be >= 1: 2 are not (first at index 1: -2)"),
        ([3], 0, {}, "seq_len must be >= 1, got 0"),
        ([3], True, {}, "seq_len must be an integer, got True"),
        ([3], 2.5, {}, "seq_len must be an integer, got 2.5"),
        ([3], 2**24 + 1, {}, "seq_len must be <= 16777216, got 16777217"),
        ([3], 8, {"algorithm": "nf"}, "unknown algorithm 'nf'; choose one of ffd, bfd, greedy"),
        (
            [3],
            8,
            {"overlong": "clip"},
            "unknown overlong policy 'clip'; choose one of error, drop, truncate, split",
        ),
        ([3], 8, {"max_per_bin": 0}, "max_per_bin must be >= 1, got 0"),
        ([3], 8, {"pad_multiple": 3}, "seq_len=8 must be a multiple of pad_multiple=3"),
        ([3], 8, {"seed": -1}, "seed must be in [0, 2**63), got -1"),
        (
            [3, 12, 30, 9],
            8,
            {},
            "3 sequences are longer than seq_len=8 (longest: 30); raise seq_len or choose overlong='drop', 'truncate' or 'split'",
        ),
        ([3, 12], 8, {}, "1 sequence is longer than seq_len=8 (longest: 12)"),
        (
            [12, 30],
            8,
            {"overlong": "drop"},
            "all 2 sequences are longer than seq_len=8: nothing left to pack with overlong='drop'",
        ),
    ],
)
def test_bad_input_raises_packing_error(
    lengths: object, seq_len: object, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(PackingError) as info:
        pack(lengths, seq_len, **kwargs)
    text = str(info.value)
    assert text.startswith(message)
    assert "\n" not in text
    assert isinstance(info.value, ValueError)
