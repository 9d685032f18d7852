"""Lower bounds: known instances, the formula against a literal reading of it, and
L1 <= L2 <= optimum <= FFD on instances small enough to solve exactly."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshplan.runtime.packing import PackingError, lower_bound_l2, lower_bound_trivial, pack


def l2_literal(lengths: list[int], cap: int) -> int:
    """Martello–Toth L2 read straight off its definition, O(n * C)."""
    best = 0
    for k in range(cap // 2 + 1):
        j1 = [x for x in lengths if x > cap - k]
        j2 = [x for x in lengths if cap - k >= x > cap / 2]
        j3 = [x for x in lengths if cap / 2 >= x >= k]
        extra = sum(j3) - (len(j2) * cap - sum(j2))
        best = max(best, len(j1) + len(j2) + max(0, math.ceil(extra / cap)))
    return best


def optimum(lengths: list[int], cap: int) -> int:
    """Fewest bins, by exhaustive search (tiny instances only)."""
    items = sorted(lengths, reverse=True)
    best = len(items)

    def place(i: int, rooms: list[int]) -> None:
        nonlocal best
        if len(rooms) >= best:
            return
        if i == len(items):
            best = len(rooms)
            return
        seen = set()
        for b, room in enumerate(rooms):
            if room >= items[i] and room not in seen:
                seen.add(room)  # bins with equal room are interchangeable
                rooms[b] -= items[i]
                place(i + 1, rooms)
                rooms[b] += items[i]
        rooms.append(cap - items[i])
        place(i + 1, rooms)
        rooms.pop()

    place(0, [])
    return best


@pytest.mark.parametrize(
    ("lengths", "cap", "l1", "l2"),
    [
        ([6, 6, 6], 10, 2, 3),  # three items above C/2: one bin each
        ([60, 60, 45, 45, 45], 100, 3, 4),  # needs k = 45: the 45s fit beside no 60
        ([50, 50, 50, 50], 100, 2, 2),  # exactly half: pairs fit
        ([51, 49, 51, 49], 100, 2, 2),
        ([7], 7, 1, 1),
        ([1] * 10, 3, 4, 4),
        ([4, 4, 4, 3, 3, 3], 10, 3, 3),
    ],
)
def test_known_instances(lengths: list[int], cap: int, l1: int, l2: int) -> None:
    assert lower_bound_trivial(lengths, cap) == l1
    assert lower_bound_l2(lengths, cap) == l2
    assert l2 <= optimum(lengths, cap)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 60).flatmap(
        lambda c: st.tuples(st.just(c), st.lists(st.integers(1, c), min_size=1, max_size=40))
    )
)
def test_l2_equals_its_literal_definition(case: tuple[int, list[int]]) -> None:
    cap, lengths = case
    assert lower_bound_l2(lengths, cap) == max(
        l2_literal(lengths, cap), math.ceil(sum(lengths) / cap)
    )


@settings(max_examples=150, deadline=None)
@given(
    st.integers(2, 30).flatmap(
        lambda c: st.tuples(st.just(c), st.lists(st.integers(1, c), min_size=1, max_size=8))
    )
)
def test_bounds_never_exceed_the_optimum(case: tuple[int, list[int]]) -> None:
    cap, lengths = case
    l1 = lower_bound_trivial(lengths, cap)
    l2 = lower_bound_l2(lengths, cap)
    opt = optimum(lengths, cap)
    assert l1 <= l2 <= opt <= pack(lengths, cap, "ffd").n_bins


def test_bound_rejects_lengths_above_seq_len() -> None:
    with pytest.raises(
        PackingError, match=r"^a bound needs every length <= seq_len=8; the longest is 9"
    ):
        lower_bound_l2([3, 9], 8)
    with pytest.raises(PackingError, match="lengths is empty"):
        lower_bound_trivial([], 8)
