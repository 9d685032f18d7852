"""meshplan runtime: applies a compiled Program under torchrun, and trains with it.

    env = init()                                   # process group from torchrun's environment
    applied, attention, weights = build_applied(program, "tiny-llama", seed=0)
        # = meta model, packed attention backend, apply(program, model), local shards
        #   allocated and loaded (or seeded random weights)
    topology = Topology.of(applied)                # data-parallel coordinate, loss group
    train(model, make_optimizer(model, config), loader, topology, config)   # runtime.train

One sub-package per concern; each `__init__` says what it owns and what it may import:

    parallel/   the mesh, `apply` walking a Program's steps, the styles torch lacks,
                the context-parallel split
    attention/  packed and context-parallel attention behind transformers' interface
    packing/    packing algorithms, the distributed sampler, collators
    weights/    meta init, sharded and broadcast loading, export, DCP checkpoints
    train/      environment, model building, topology, the reference loop, data, loss
    explain/    the dry run on a fake process group, communication, memory, the report

The names below are re-exported lazily (importing `meshplan.runtime` imports no torch), so
`plan explain` pays only for what it uses. `train` is the sub-package; the loop is
`meshplan.runtime.train.train`.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> module that defines it
_EXPORTS = {
    "Applied": "parallel.apply",
    "StepError": "parallel.apply",
    "apply": "parallel.apply",
    "MeshError": "parallel.mesh",
    "build_mesh": "parallel.mesh",
    "Built": "train.build",
    "build_applied": "train.build",
    "build_model": "train.build",
    "load_weights": "train.build",
    "prepare": "train.build",
    "Environment": "train.environment",
    "TrainError": "train.environment",
    "init": "train.environment",
    "StepStats": "train.loop",
    "TrainConfig": "train.loop",
    "clip_grad_norm": "train.loop",
    "grad_norm": "train.loop",
    "make_optimizer": "train.loop",
    "resume": "train.loop",
    "save_checkpoint": "train.loop",
    "train_step": "train.loop",
    "Topology": "train.topology",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
