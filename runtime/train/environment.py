"""This process in the job: the process group from torchrun's environment, and the run's error type."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

__all__ = [
    "Environment",
    "TrainError",
    "init",
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
        dist.init_process_group(backend, timeout=wait)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=wait)
    return Environment(dist.get_rank(), dist.get_world_size(), local_rank, device, backend, True)
