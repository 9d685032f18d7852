"""This process in the job: the process group from torchrun's environment, and the run's error type."""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

__all__ = [
    "Environment",
    "TrainError",
    "attempt_store",
    "failed_ranks",
    "init",
    "is_peer_failure",
]

if TYPE_CHECKING:
    pass


class TrainError(RuntimeError):
    """The run cannot train correctly as set up; the message says why."""


# --------------------------------------------------------------------------- process group


@dataclass(frozen=True)
class Environment:
    """This process in the job: rank, world size, local rank, device, backend."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    initialised_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(backend: str | None = None, *, timeout: float = 1800.0) -> Environment:
    """Initialise `torch.distributed` from torchrun's environment; idempotent, optional.

    NCCL when CUDA is available (each rank on `cuda:LOCAL_RANK`), else gloo. Without
    torchrun's variables (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`) a one-rank
    group is created in-process, so the same code runs as a plain script.
    """
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if dist.is_initialized():
        return Environment(dist.get_rank(), dist.get_world_size(), local_rank, device,
                           str(dist.get_backend()))
    backend = backend or ("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(device)
    wait = datetime.timedelta(seconds=timeout)
    if all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        store = attempt_store(wait)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=wait)
        _announce(store, rank)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=wait)
    return Environment(dist.get_rank(), dist.get_world_size(), local_rank, device, backend, True)


# --------------------------------------------------------------------------- restarts and failures

_PREFIX = "meshplan"
_store: dist.Store | None = None  # this attempt's store, kept to learn who failed


def attempt_store(timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store of this attempt: torchrun's TCP store under a prefix naming
    `TORCHELASTIC_RESTART_COUNT`.

    Under `torchrun --max-restarts N` the agent's store outlives the workers, so a
    restarted attempt would find the keys the dead one left (the process group's
    rank counters among them) and fail in `init_process_group`; a fresh prefix per
    attempt gives each attempt its own keys. Outside torchrun's agent
    (`TORCHELASTIC_USE_AGENT_STORE` unset), rank 0 hosts the store, as `env://` does.
    """
    global _store
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    tcp = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                        is_master=rank == 0 and not agent, timeout=timeout, multi_tenant=not agent)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    _store = dist.PrefixStore(f"{_PREFIX}/attempt-{attempt}/", tcp)
    return _store


def _announce(store: dist.Store, rank: int) -> None:
    """Leave this process's host and pid in the store, so that peers can tell, when a
    collective breaks, which rank's process is gone."""
    store.set(f"process/{rank}", f"{socket.gethostname()}:{os.getpid()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def failed_ranks() -> list[int] | None:
    """The ranks on this host whose process has exited, as far as this process can
    tell (None: it cannot, e.g. the store went with the process that hosted it)."""
    if _store is None or not dist.is_initialized():
        return None
    host = socket.gethostname()
    gone: list[int] = []
    try:
        _store.set_timeout(datetime.timedelta(seconds=2))
        for rank in range(dist.get_world_size()):
            where = _store.get(f"process/{rank}").decode()
            name, _, pid = where.rpartition(":")
            if name == host and not _alive(int(pid)):
                gone.append(rank)
    except (RuntimeError, ValueError, dist.DistError):
        return None
    return gone


_PEER_SIGNS = ("connection closed by peer", "connection reset by peer", "broken pipe", "gloo",
               "nccl", "socket timeout", "connection refused")


def is_peer_failure(exc: BaseException) -> bool:
    """Whether `exc` is a collective that broke because another rank went away (gloo
    and NCCL raise plain `RuntimeError`s naming the transport), not a fault here."""
    if isinstance(exc, dist.DistError):
        return True
    if type(exc).__module__.startswith("meshplan."):  # ours say what they mean
        return False
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(sign in text for sign in _PEER_SIGNS)
