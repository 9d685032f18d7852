"""The multi-rank harness itself: results by rank, collectives, failures, timeouts."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from tests.distributed import RankError, RankPool, RankTimeout, rank_pool_fixture

pytestmark = pytest.mark.slow

WORLD = 2
pool = rank_pool_fixture(WORLD, timeout=60.0)


def _rank_and_threads() -> tuple[int, int, int]:
    return dist.get_rank(), dist.get_world_size(), torch.get_num_threads()


def _all_reduce(value: float) -> torch.Tensor:
    t = torch.tensor([value * (dist.get_rank() + 1)])
    dist.all_reduce(t)
    return t


def _fail_on_rank_one() -> str:
    if dist.get_rank() == 1:
        raise ValueError("boom from rank one")
    return "fine"


def _fail_then_hang() -> None:
    # Rank 0 fails; rank 1 blocks in a collective that rank 0 never joins.
    if dist.get_rank() == 0:
        raise KeyError("rank zero gave up")
    dist.barrier()


def _hang_on_rank_zero(seconds: float) -> int:
    if dist.get_rank() == 0:
        time.sleep(seconds)
    return dist.get_rank()


def _die_on_rank_one() -> None:
    if dist.get_rank() == 1:
        os._exit(3)
    dist.barrier()


def test_results_come_back_by_rank(pool: RankPool) -> None:
    assert pool.run(_rank_and_threads) == [(0, WORLD, 1), (1, WORLD, 1)]


def test_all_reduce_runs_in_the_shared_group(pool: RankPool) -> None:
    results = pool.run(_all_reduce, 2.0)
    for t in results:
        torch.testing.assert_close(t, torch.tensor([2.0 * (1 + 2)]))


def test_failing_case_surfaces_its_traceback_and_the_pool_recovers(pool: RankPool) -> None:
    starts = pool.starts
    with pytest.raises(RankError) as info:
        pool.run(_fail_on_rank_one)
    message = str(info.value)
    assert "rank 1 raised" in message
    assert "ValueError: boom from rank one" in message
    assert "_fail_on_rank_one" in message  # the rank's own traceback, not the harness's
    assert "rank 0 raised" not in message
    # The next case runs on fresh ranks.
    assert pool.run(_rank_and_threads) == [(0, WORLD, 1), (1, WORLD, 1)]
    assert pool.starts == starts + 1


def test_failure_is_reported_while_other_ranks_hang(pool: RankPool) -> None:
    t0 = time.monotonic()
    with pytest.raises(RankError) as info:
        pool.run(_fail_then_hang, timeout=120.0)
    # Reported after the grace period, long before the case timeout (slack for a
    # loaded CI machine).
    assert time.monotonic() - t0 < 60.0
    message = str(info.value)
    assert "KeyError: 'rank zero gave up'" in message
    assert "rank 1: did not finish" in message
    assert not isinstance(info.value, RankTimeout)


def test_hung_case_times_out(pool: RankPool) -> None:
    t0 = time.monotonic()
    # Rank 1 returns at once; on a loaded machine it may still miss the deadline.
    with pytest.raises(RankTimeout, match=r"timed out after 3\.0 s: ranks \[0(, 1)?\] did not"):
        pool.run(_hang_on_rank_zero, 600.0, timeout=3.0)
    assert time.monotonic() - t0 < 60.0  # the sleeping rank was killed, not waited for
    assert pool.run(_hang_on_rank_zero, 0.0) == [0, 1]


def test_dead_rank_is_reported(pool: RankPool) -> None:
    with pytest.raises(RankError, match=r"rank 1: process died \(exit code 3\)"):
        pool.run(_die_on_rank_one, timeout=120.0)


def test_close_is_idempotent() -> None:
    p = RankPool(1, timeout=60.0)
    p.close()
    assert p.run(_rank_and_threads) == [(0, 1, 1)]
    p.close()
    p.close()
    assert not p.running
