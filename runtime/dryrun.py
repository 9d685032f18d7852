"""A dry run: apply a Program to a meta-device model over a fake process group.

Exactly the runtime's `apply`, on `FakeStore` + backend `fake` (no communication, no
weights): what the real job would build, per parameter — placements and local shape —
measured, not estimated. `plan explain` and the compiler's soundness tests use it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from meshplan.planner.program import Program

from .apply import apply


@dataclass(frozen=True)
class ParamLayout:
    placements: tuple[str, ...]
    global_shape: tuple[int, ...]
    local_shape: tuple[int, ...]
    dtype: str


@contextmanager
def fake_world(world_size: int, rank: int = 0) -> Any:
    """A fake process group of `world_size` ranks, seen as `rank`; torn down on exit."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def parameter_layouts(model: nn.Module) -> dict[str, ParamLayout]:
    out = {}
    for name, p in model.named_parameters():
        clean = name.replace("_checkpoint_wrapped_module.", "").replace("_fsdp_wrapped_module.", "")
        if isinstance(p, DTensor):
            out[clean] = ParamLayout(tuple(str(x) for x in p.placements), tuple(p.shape),
                                     tuple(p.to_local().shape), str(p.dtype))
        else:
            out[clean] = ParamLayout((), tuple(p.shape), tuple(p.shape), str(p.dtype))
    return out


def dry_run(program: Program, build_model: Callable[[], nn.Module], *, rank: int = 0,
            applier: Callable[[Program, nn.Module], Any] | None = None) -> dict[str, ParamLayout]:
    """Apply `program` (or `applier`) to a fresh meta model as `rank`; the resulting layouts."""
    with fake_world(program.world_size, rank), torch.device("meta"):
        model = build_model()
        if applier is None:
            apply(program, model)
        else:
            applier(program, model)
        return parameter_layouts(model)
