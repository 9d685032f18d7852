"""meshplan runtime: applies a compiled Program under torchrun, and trains with it.

    env = init()                                   # process group from torchrun's environment
    applied, attention, weights = build_applied(program, "tiny-llama", seed=0)
        # = meta model, packed attention backend, apply(program, model), local shards
        #   allocated and loaded (or seeded random weights)
    topology = Topology.of(applied)                # data-parallel coordinate, loss group
    train(model, make_optimizer(model, config), loader, topology, config)

`apply` and `train` are also submodule names: they are imported here, eagerly, so that
`meshplan.runtime.apply` and `meshplan.runtime.train` are always the functions.
"""

from .apply import Applied, StepError, apply
from .mesh import MeshError, build_mesh
from .train import (
    Built,
    Environment,
    ProgressDisplay,
    StepStats,
    Topology,
    TrainConfig,
    TrainError,
    build_applied,
    build_model,
    clip_grad_norm,
    grad_norm,
    init,
    load_weights,
    make_optimizer,
    prepare,
    resume,
    save_checkpoint,
    train,
    train_step,
)

__all__ = [
    "Applied",
    "Built",
    "Environment",
    "MeshError",
    "ProgressDisplay",
    "StepError",
    "StepStats",
    "Topology",
    "TrainConfig",
    "TrainError",
    "apply",
    "build_applied",
    "build_mesh",
    "build_model",
    "clip_grad_norm",
    "grad_norm",
    "init",
    "load_weights",
    "make_optimizer",
    "prepare",
    "resume",
    "save_checkpoint",
    "train",
    "train_step",
]
