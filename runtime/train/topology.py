"""Where this rank sits for training: data-parallel coordinate, loss group, gradient divisor."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from meshplan.planner.mesh_facts import MeshFacts
from meshplan.planner.program import FullyShard, Parallelize, Program

from ..parallel.apply import Applied, context_split, context_step
from ..parallel.context import ContextSplit
from ..parallel.mesh import submesh
from .environment import TrainError

if TYPE_CHECKING:
    pass


__all__ = [
    "Topology",
]

# --------------------------------------------------------------------------- topology


@dataclass(frozen=True)
class Topology:
    """Where this rank sits in the Program's mesh, for data and loss.

    `dp_rank`/`dp_size`: this rank's data-parallel coordinate (the `dp` submesh, else the
    product of `dp_replicate` and `dp_shard`); tensor-parallel peers share it and so read
    the same batches. `context`/`cp_rank`: the plan's context-parallel split and this
    rank's place in it (its peers read the same batches, each keeps its part of the
    sequence). `loss_group`: the ranks whose tokens make up the global batch (None
    when there is one). `grad_divisor`: the ranks FSDP averages gradients over.
    """

    dp_rank: int = 0
    dp_size: int = 1
    loss_group: dist.ProcessGroup | None = None
    loss_size: int = 1
    grad_divisor: int = 1
    vocab_parallel: bool = False
    rank: int = 0
    context: ContextSplit | None = None  # the plan's context-parallel split, if any
    cp_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def of(cls, applied: Applied) -> Topology:
        return cls.from_mesh(applied.program, applied.mesh)

    @classmethod
    def from_mesh(cls, program: Program, mesh: DeviceMesh) -> Topology:
        layout = program.mesh
        names = tuple(mesh.mesh_dim_names or ())
        subs = dict(layout.submeshes)
        facts = MeshFacts(layout)
        dp_dims, loss_dims = facts.dp_dims, facts.loss_dims
        coord = mesh.get_coordinate() or (0,) * len(names)
        dp_rank = 0
        for d in dp_dims:
            dp_rank = dp_rank * layout.size(d) + coord[names.index(d)]
        dp_size, loss_size = facts.dp_size, facts.loss_size
        group = _group(mesh, "loss" if "loss" in subs else None, loss_dims) if loss_size > 1 else None
        roots = [s for s in program.steps_of(FullyShard) if not s.fqns]
        divisor = math.prod(layout.size(d) for d in roots[-1].mesh_dims) if roots else 1
        if loss_size > 1 and divisor != loss_size:
            what = (f"fully_shard averages gradients over {divisor}" if roots
                    else "no fully_shard synchronises their gradients")
            raise TrainError(f"the global batch is spread over {loss_size} data-parallel ranks "
                             f"({' × '.join(loss_dims)}) but {what}")
        tp = bool(program.steps_of(Parallelize))
        cp = context_step(program)
        cp_rank = coord[names.index(cp.mesh_dim)] if cp is not None else 0
        return cls(dp_rank, dp_size, group, loss_size, divisor, tp, dist.get_rank(), context_split(program),
                   cp_rank)


def _group(mesh: DeviceMesh, name: str | None, dims: tuple[str, ...]) -> dist.ProcessGroup:
    if name is not None:
        return submesh(mesh, (name,)).get_group()
    if len(dims) == 1:
        return submesh(mesh, dims).get_group()
    return submesh(mesh, dims)._flatten("_".join(("loss", *dims))).get_group()
