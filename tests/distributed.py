"""Run test cases on N CPU ranks under one gloo process group.

`RankPool(n)` starts n processes once (a module-scoped fixture: `rank_pool_fixture`),
initialises `torch.distributed` with gloo in each, and then runs any number of cases in
that same process group: `pool.run(fn, *args)` calls `fn(*args)` on every rank and
returns the per-rank results, indexed by rank.

Ranks are forked by multiprocessing's forkserver: one clean, single-threaded server
process imports torch, transformers and meshplan once (`PRELOAD`), and every rank is a
fork of it. Spawning would import them again in every rank — about ten seconds of CPU
each, on a 2-core machine — and forking pytest itself is unsafe (it has threads). The
server lives as long as the pytest process, so later pools start in a second.

Guarantees:

- Every rank runs with `torch.set_num_threads(1)` (the CI machine has 2 cores shared by
  all ranks) and with gloo bound to the loopback interface, rendezvousing through a
  `TCPStore` that the pytest process serves on a free port of 127.0.0.1 (port 0: the
  kernel picks it, so there is no probe-then-bind race).
- A case that raises on any rank raises `RankError` in pytest, carrying the formatted
  traceback of every rank that failed (ranks that were still waiting in a collective
  are listed as such).
- A case that does not finish on every rank within its timeout raises `RankTimeout`
  naming the ranks that did not report, instead of hanging CI. A rank that dies
  (segfault, `os._exit`) is reported as soon as it is seen dead.
- After an error or timeout the ranks may be stuck in a collective, so the pool kills
  them; the next `run` starts a fresh set (and a fresh process group). Successful cases
  never restart the pool.
- `close()` (and leaving the `with` block) asks each rank to `destroy_process_group()`
  and exit, and kills any rank that does not within a few seconds.

Case functions are sent by reference, so they must be module-level functions of an
importable module (`tests.test_x.case`), and their arguments and results must pickle;
return small CPU tensors (`.detach().clone()`), not modules.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import queue
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["PRELOAD", "RankError", "RankPool", "RankTimeout", "rank_pool_fixture", "warm_up"]

# Imported once by the forkserver; a module that fails to import is skipped there and
# imported by each rank when a case needs it.
PRELOAD: tuple[str, ...] = (
    "torch",
    "torch.distributed",
    "torch.distributed.fsdp",
    "torch.distributed.tensor",
    "torch.distributed.tensor.parallel",
    # Before transformers, which imports torchao: it drops their import-time log noise.
    "meshplan.runtime.parallel.adapters",
    "transformers",
    "transformers.modeling_utils",
    # The presets the multi-rank tests build (model classes are imported lazily).
    "transformers.models.llama.modeling_llama",
    "transformers.models.qwen2.modeling_qwen2",
    "meshplan.planner.models",
    "meshplan.runtime.attention",
    "meshplan.runtime.train.loss",
    "meshplan.runtime.packing",
    "peft",  # LoRA adapters: several seconds of import per rank otherwise
    "tests.distributed",
)

# How long ranks that did not fail get, after one rank failed, to report their own
# outcome before the pool gives up on them (they are usually blocked in a collective
# that the failed rank will never join).
_GRACE_SECONDS = 2.0
_POLL_SECONDS = 0.2


def _forkserver_context() -> Any:
    ctx = mp.get_context("forkserver")
    # Only the first call in a process matters: the server starts once, with it.
    ctx.set_forkserver_preload(list(PRELOAD))
    return ctx


def warm_up() -> None:
    """Start the forkserver now, in the background: it imports `PRELOAD` while pytest
    collects and runs single-process tests, instead of when the first pool starts."""
    import multiprocessing.forkserver

    _forkserver_context()
    multiprocessing.forkserver.ensure_running()


class RankError(AssertionError):
    """A case failed on one or more ranks; the message holds their tracebacks."""


class RankTimeout(RankError):
    """A case did not finish on every rank within its timeout."""


@dataclass(frozen=True)
class _Report:
    rank: int
    case: int
    ok: bool
    value: Any  # the result, or the formatted traceback when not ok


def _worker(
    rank: int,
    world_size: int,
    port: int,
    prefix: str,
    pg_timeout: float,
    tasks: Any,
    reports: Any,
) -> None:
    # Several ranks share two cores: one intra-op thread each keeps them from thrashing.
    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):  # only settable before any parallel work
        torch.set_num_interop_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        store = dist.TCPStore(
            "127.0.0.1",
            port,
            world_size,
            is_master=False,
            timeout=datetime.timedelta(seconds=pg_timeout),
        )
        dist.init_process_group(
            "gloo",
            store=dist.PrefixStore(prefix, store),
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout),
        )
    except BaseException:
        reports.put(_Report(rank, -1, False, traceback.format_exc()))
        return
    try:
        reports.put(_Report(rank, -1, True, "ready"))
        parent = mp.parent_process()
        while True:
            try:
                task = tasks.get(timeout=1.0)
            except queue.Empty:
                # pytest was killed without closing the pool: do not linger.
                if parent is not None and not parent.is_alive():
                    break
                continue
            if task is None:
                break
            case, fn, args, kwargs = task
            try:
                value = fn(*args, **kwargs)
            except BaseException:
                reports.put(_Report(rank, case, False, traceback.format_exc()))
            else:
                reports.put(_Report(rank, case, True, value))
    finally:
        dist.destroy_process_group()


class RankPool:
    """N forked ranks sharing one gloo process group; see the module docstring."""

    def __init__(
        self,
        world_size: int,
        *,
        timeout: float = 60.0,
        start_timeout: float = 120.0,
    ) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.timeout = timeout
        self.start_timeout = start_timeout
        self._ctx = _forkserver_context()
        self._procs: list[Any] = []
        self._tasks: list[Any] = []
        self._reports: Any = None
        self._store: dist.TCPStore | None = None
        self._generation = 0
        self._case = 0
        self.starts = 0  # how many times ranks were started (tests check restarts)

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> RankPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return bool(self._procs)

    def start(self) -> None:
        """Start the ranks and wait until every one has joined the process group."""
        if self._procs:
            return
        # The pytest process serves the store; port 0 lets the kernel pick a free port.
        self._store = dist.TCPStore(
            "127.0.0.1",
            0,
            self.world_size + 1,
            is_master=True,
            wait_for_workers=False,
            timeout=datetime.timedelta(seconds=self.start_timeout),
        )
        self._generation += 1
        prefix = f"pool{self._generation}"
        self._reports = self._ctx.Queue()
        self._tasks = [self._ctx.Queue() for _ in range(self.world_size)]
        for rank in range(self.world_size):
            proc = self._ctx.Process(
                target=_worker,
                args=(
                    rank,
                    self.world_size,
                    self._store.port,
                    prefix,
                    max(self.timeout, 30.0),
                    self._tasks[rank],
                    self._reports,
                ),
                daemon=True,
                name=f"rank{rank}",
            )
            proc.start()
            self._procs.append(proc)
        self.starts += 1
        self._collect(-1, self.start_timeout, "start-up")  # raises unless all joined

    def close(self) -> None:
        """Stop every rank (each destroys its process group first)."""
        if not self._procs:
            return
        for q in self._tasks:
            with contextlib.suppress(Exception):
                q.put(None)
        deadline = time.monotonic() + 5.0
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        self._kill()

    def _kill(self) -> None:
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
        for proc in self._procs:
            proc.join(5.0)
        for q in [*self._tasks, self._reports]:
            if q is not None:
                q.close()
                q.cancel_join_thread()
        self._procs, self._tasks, self._reports = [], [], None
        self._store = None

    # ------------------------------------------------------------------ running

    def run(
        self,
        fn: Callable[..., Any],
        *args: Any,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> list[Any]:
        """Call `fn(*args, **kwargs)` on every rank; returns the results by rank."""
        self.start()
        self._case += 1
        case = self._case
        for q in self._tasks:
            q.put((case, fn, args, kwargs))
        name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"
        reports = self._collect(case, self.timeout if timeout is None else timeout, name)
        return [reports[r].value for r in range(self.world_size)]

    def _collect(self, case: int, timeout: float, name: str) -> dict[int, _Report]:
        reports: dict[int, _Report] = {}
        deadline = time.monotonic() + timeout
        dead: dict[int, int | None] = {}
        while len(reports) < self.world_size:
            now = time.monotonic()
            if now >= deadline:
                break
            try:
                rep = self._reports.get(timeout=min(_POLL_SECONDS, deadline - now))
            except queue.Empty:
                dead = {
                    r: p.exitcode
                    for r, p in enumerate(self._procs)
                    if r not in reports and not p.is_alive()
                }
                if dead:
                    break
                continue
            if rep.case != case:  # a straggler from a case that already failed
                continue
            reports[rep.rank] = rep
            if not rep.ok:
                # Give the others a moment: they may fail too (their tracebacks help),
                # or be blocked for good in a collective the failed rank left.
                deadline = min(deadline, time.monotonic() + _GRACE_SECONDS)
        if len(reports) == self.world_size and all(r.ok for r in reports.values()):
            return reports
        self._kill()
        lines = [f"case {name} failed:"]
        for rank in range(self.world_size):
            rep = reports.get(rank)
            if rep is None:
                if rank in dead:
                    lines.append(f"--- rank {rank}: process died (exit code {dead[rank]})")
                else:
                    lines.append(f"--- rank {rank}: did not finish")
            elif not rep.ok:
                lines.append(f"--- rank {rank} raised:\n{rep.value.rstrip()}")
        failed = any(not r.ok for r in reports.values()) or dead
        if not failed:
            missing = sorted(set(range(self.world_size)) - set(reports))
            raise RankTimeout(
                f"case {name} timed out after {timeout:.1f} s: ranks {missing} did not finish"
            )
        raise RankError("\n".join(lines))


def rank_pool_fixture(world_size: int, *, timeout: float = 60.0, name: str | None = None) -> Any:
    """A module-scoped pytest fixture yielding a started `RankPool(world_size)`.

    Defining it (at import of the test module) warms the forkserver up already."""
    warm_up()

    @pytest.fixture(scope="module", name=name)
    def pool() -> Iterator[RankPool]:
        with RankPool(world_size, timeout=timeout) as p:
            p.start()
            yield p

    return pool
