"""PackedSampler: exactly-once epochs across ranks, remainder policies, mid-epoch resume,
epoch handling, cost balancing, and layout checks on resume."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from meshplan.runtime.packing import PackedSampler, PackingError, PackResult, pack


@pytest.fixture(scope="module")
def result() -> PackResult:
    rng = np.random.default_rng(2)
    lengths = np.clip(rng.lognormal(4.5, 1.0, 3000), 1, 512).astype(np.int64)
    r = pack(lengths, 512)
    assert r.n_bins % 8 != 0 and r.n_bins % 3 != 0  # so the remainder paths are exercised
    return r


def run_epoch(
    samplers: list[PackedSampler], steps: int | None = None
) -> list[list[list[np.ndarray]]]:
    """Advance every rank by `steps` steps (None: to the end of the epoch)."""
    out = []
    for s in samplers:
        it = iter(s)
        out.append([next(it) for _ in range(steps)] if steps is not None else list(it))
    return out


def seen_positions(per_rank: list[list[list[np.ndarray]]]) -> Counter[int]:
    return Counter(int(p) for steps in per_rank for step in steps for arr in step for p in arr)


@pytest.mark.parametrize("dp_size", [1, 2, 3, 8])
@pytest.mark.parametrize(("micro_batch", "window"), [(1, 1), (2, 1), (3, 4)])
def test_epoch_covers_every_item_exactly_once(
    result: PackResult, dp_size: int, micro_batch: int, window: int
) -> None:
    samplers = [
        PackedSampler(result, r, dp_size, seed=5, micro_batch=micro_batch, window=window)
        for r in range(dp_size)
    ]
    per_rank = run_epoch(samplers)
    steps = {len(x) for x in per_rank}
    assert steps == {len(samplers[0])}, "ranks run different numbers of steps"
    assert all(len(step) == micro_batch for x in per_rank for step in x)
    assert seen_positions(per_rank) == Counter(range(result.n_sequences))
    empty = sum(arr.size == 0 for x in per_rank for step in x for arr in step)
    rem = samplers[0].remainder()
    assert rem.policy == "pad"
    assert empty == rem.padding_bins == len(samplers[0]) * dp_size * micro_batch - result.n_bins
    assert empty < dp_size * micro_batch


@pytest.mark.parametrize("dp_size", [1, 2, 3, 8])
def test_resume_mid_epoch_loses_and_repeats_nothing(result: PackResult, dp_size: int) -> None:
    def make() -> list[PackedSampler]:
        return [PackedSampler(result, r, dp_size, seed=11, micro_batch=2) for r in range(dp_size)]

    uninterrupted = make()
    for s in uninterrupted:
        s.set_epoch(3)
    reference = run_epoch(uninterrupted)

    first = make()
    for s in first:
        s.set_epoch(3)
    head = run_epoch(first, steps=7)
    states = [s.state_dict() for s in first]
    assert states[0]["epoch"] == 3 and states[0]["steps_consumed"] == 7

    resumed = make()
    for s, state in zip(resumed, states, strict=True):
        s.load_state_dict(state)
        s.set_epoch(3)  # the usual top-of-epoch call must not reset the progress
    tail = run_epoch(resumed)
    assert seen_positions(head) + seen_positions(tail) == Counter(range(result.n_sequences))
    for r in range(dp_size):
        joined = head[r] + tail[r]
        assert len(joined) == len(reference[r])
        for a, b in zip(joined, reference[r], strict=True):
            assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    # After the epoch the sampler moves on by itself, to the same epoch-4 order.
    assert resumed[0].epoch == 4 and uninterrupted[0].epoch == 4
    assert np.array_equal(resumed[0].schedule(), uninterrupted[0].schedule())


def test_drop_remainder_reports_what_it_drops(result: PackResult) -> None:
    dp, mb = 3, 2
    samplers = [
        PackedSampler(result, r, dp, micro_batch=mb, drop_remainder=True) for r in range(dp)
    ]
    per_rank = run_epoch(samplers)
    rem = samplers[0].remainder(epoch=0)
    assert rem.policy == "drop" and rem.padding_bins == 0
    assert rem.dropped_bins == result.n_bins % (dp * mb) > 0
    seen = seen_positions(per_rank)
    assert max(seen.values()) == 1
    assert result.n_sequences - len(seen) == rem.dropped_sequences
    missing = sorted(set(range(result.n_sequences)) - set(seen))
    assert int(result.lengths[missing].sum()) == rem.dropped_tokens
    assert all(arr.size > 0 for x in per_rank for step in x for arr in step)


def test_epochs_differ_and_repeat_deterministically(result: PackResult) -> None:
    s = PackedSampler(result, 0, 2, seed=1)
    a0 = s.schedule(0)
    assert not np.array_equal(a0, s.schedule(1))
    assert np.array_equal(a0, PackedSampler(result, 1, 2, seed=1).schedule(0))
    assert not np.array_equal(a0, PackedSampler(result, 0, 2, seed=2).schedule(0))
    s.set_epoch(2)
    next(iter(s))
    assert s.steps_consumed == 1
    s.set_epoch(5)
    assert (s.epoch, s.steps_consumed) == (5, 0)


def test_steps_are_dealt_longest_processing_time_first() -> None:
    # Bins of 10, 9, 8, 7, 3, 1 tokens (single sequences), one step over 2 ranks x 3.
    r = pack([10, 9, 8, 7, 3, 1], 10, "ffd", max_per_bin=1)
    s = PackedSampler(r, 0, 2, micro_batch=3, attention_weight=0.0)
    plan = s.schedule()
    loads = sorted(sorted(int(r.bin_tokens[b]) for b in row) for row in plan[0])
    # Heaviest first, each to the lightest rank with a free slot: 10→a, 9→b, 8→b, 7→a,
    # 3→a (tie: lower rank), 1→b. Loads 20 and 18: max/mean = 20/19.
    assert loads == [[1, 8, 9], [3, 7, 10]]
    assert s.imbalance().tokens[0] == pytest.approx(20 / 19)


def test_balancing_beats_the_naive_deal(result: PackResult) -> None:
    s = PackedSampler(result, 0, 4, micro_batch=4)
    balanced, naive = s.imbalance(), s.imbalance(naive=True)
    assert balanced.mean_attention < naive.mean_attention
    assert balanced.mean_tokens <= naive.mean_tokens
    assert (balanced.tokens >= 1.0 - 1e-12).all() and (balanced.attention >= 1.0 - 1e-12).all()
    pooled = PackedSampler(result, 0, 4, micro_batch=4, window=8).imbalance()
    assert pooled.mean_attention < balanced.mean_attention


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"dp_size": 4},
            "cannot resume: the sampler state was saved under another layout: dp_size=4 (now 2)",
        ),
        ({"n_bins": 1}, "n_bins=1 (now"),
        ({"steps_consumed": 10**6}, "cannot resume: steps_consumed=1000000 exceeds"),
    ],
)
def test_resume_under_another_layout_is_refused(
    result: PackResult, change: dict[str, int], message: str
) -> None:
    s = PackedSampler(result, 0, 2)
    state = s.state_dict() | change
    with pytest.raises(PackingError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PackedSampler(result, 1, 2).load_state_dict(state)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dp_rank": 2, "dp_size": 2}, "dp_rank=2 must be < dp_size=2"),
        ({"dp_rank": 0, "dp_size": 0}, "dp_size must be >= 1, got 0"),
        ({"dp_rank": 0, "dp_size": 1, "micro_batch": 0}, "micro_batch must be >= 1, got 0"),
        ({"dp_rank": 0, "dp_size": 10**6, "drop_remainder": True}, "bins cannot fill one step"),
    ],
)
def test_bad_sampler_arguments(result: PackResult, kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(PackingError, match=message):
        PackedSampler(result, **kwargs)
