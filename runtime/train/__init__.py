"""Training with an applied Program: what `plan run` does, as a library.

Owns: this process in the job (`environment`), building the model a run trains
(`build`), where a rank sits for data and loss (`topology`), the reference loop
(`loop`), the data pipeline from sequences to packed batches (`data`) and the
token-weighted loss, vocabulary-parallel included (`loss`).

May import: every other runtime package except `explain`; the display of progress lives
in `meshplan.cli.progress`, not here.
"""

from .build import Built, build_applied, build_model, device_of, load_weights, prepare
from .environment import Environment, TrainError, init
from .loop import (
    StepStats,
    TrainConfig,
    clip_grad_norm,
    grad_norm,
    make_optimizer,
    resume,
    save_checkpoint,
    train,
    train_step,
)
from .topology import Topology

__all__ = [
    "Built",
    "Environment",
    "StepStats",
    "Topology",
    "TrainConfig",
    "TrainError",
    "build_applied",
    "build_model",
    "clip_grad_norm",
    "device_of",
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
