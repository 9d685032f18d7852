"""A dry run: apply a Program to a meta-device model over a fake process group.

Exactly the runtime's `apply`, on `FakeStore` + backend `fake` (no communication, no
weights): what the real job would build, per parameter — placements and local shape —
measured, not estimated. `plan explain` and the compiler's soundness tests use it.

The phases, one module each:

- `world`: the fake process group and the measured rank's mesh (only the process
  groups that rank belongs to), coordinates of ranks;
- `reduction`: one decoder block per distinct (block kind, steps applied to it), and
  how each kept block stands for the layers of the full model;
- `shards`: the reduced Program applied as rank 0 and as ranks of the other classes of
  ranks whose local shapes differ: placements, local shapes, padded storage;
- `trace`: one training step of the reduced model on fake tensors: activations, live
  memory, and the collectives DTensor issues;
- `failure`: the module, model source line and Program step of a dry run that failed.

This module is the whole-Program dry run, as one rank: `dry_run` / `parameter_layouts`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from meshplan.planner.program import Program

from ..parallel.apply import apply
from .shards import ParamLayout, parameter_layouts
from .world import fake_world

__all__ = ["ParamLayout", "dry_run", "parameter_layouts"]


def dry_run(program: Program, build_model: Callable[[], nn.Module], *, rank: int = 0,
            applier: Callable[[Program, nn.Module], Any] | None = None) -> dict[str, ParamLayout]:
    """Apply `program` (or `applier`, which builds its own mesh) to a fresh meta model as
    `rank`; the resulting layouts."""
    with fake_world(program.mesh, rank) as mesh, torch.device("meta"):
        model = build_model()
        if applier is None:
            apply(program, model, mesh=mesh)
        else:
            applier(program, model)
        return parameter_layouts(model)
