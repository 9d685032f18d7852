"""Building the model a run trains: meta device → Program → local shards → weights (or seeded random ones).

`build_applied(program, source)` returns the applied model, the packed attention backend it
uses and what was loaded; no rank ever holds the whole model (`runtime.weights`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from meshplan.planner.program import Program

from ..attention import select_backend, use_backend
from ..parallel.apply import Applied, apply
from ..weights.loading import init_random, load_broadcast, load_sharded, materialize, meta_model
from .environment import TrainError, init

if TYPE_CHECKING:
    from meshplan.planner.models import ModelSource


__all__ = [
    "Built",
    "build_applied",
    "build_model",
    "device_of",
    "load_weights",
    "prepare",
    "seed_random",
]


def prepare(model: nn.Module, device: torch.device | str | None = None) -> str:
    """Select meshplan's packed-sequence attention backend for `device` (flash-attn or
    Transformer Engine on CUDA when installed, the exact PyTorch one otherwise) and
    install it in `model`; returns its name. Call before `apply`."""
    name = select_backend(device if device is not None else device_of(model))
    use_backend(model, name)
    return name


def _source(source: str | nn.Module | ModelSource) -> ModelSource:
    from meshplan.planner.models import resolve_model

    src = resolve_model(source)
    if src.config is None or src.model_class is None:
        raise TrainError(f"--model {src.spec}: the training loop needs a transformers causal LM "
                         "(a preset or a Hugging Face directory)")
    return src


def load_weights(model: nn.Module | Applied, source: str | nn.Module | ModelSource, *,
                 seed: int = 0) -> str:
    """Fill a materialised model's weights; returns what was done, in words.

    A Hugging Face directory with safetensors: each rank reads only its shards
    (`loading.load_sharded`); with one `.bin`/`.pt` file: rank 0 reads it and broadcasts
    (`loading.load_broadcast`); otherwise seeded random weights that do not depend on
    the layout (`loading.init_random`)."""
    src = _source(source)
    sharded = [w for w in src.weights if w.suffix == ".safetensors"]
    pickled = [w for w in src.weights if w.suffix in (".bin", ".pt", ".pth")]
    if sharded and src.path is not None:
        load_sharded(model, src.path, seed=seed)  # seed: LoRA adapters, which checkpoints lack
        return f"weights from {src.path} (each rank reads its shards)"
    if len(pickled) == 1:
        first = dist.is_initialized() and dist.get_rank() == 0
        load_broadcast(model, pickled[0] if first or not dist.is_initialized() else None, seed=seed)
        return f"weights from {pickled[0]} (read on rank 0, broadcast)"
    if pickled:
        raise TrainError(f"--model {src.spec}: {len(pickled)} torch weight files; convert them to "
                         "safetensors (one file, or shards with model.safetensors.index.json)")
    init_random(model, seed)
    return f"random weights (seed {seed})"


def build_model(source: str | nn.Module | ModelSource, *, seed: int = 0,
                device: torch.device | str = "cpu") -> nn.Module:
    """A single-process model on `device` with the weights `load_weights` gives: the
    same values `build_applied` puts in every shard, whatever the layout."""
    src = _source(source)
    model = meta_model(src)
    materialize(model, device)
    load_weights(model, src, seed=seed)
    return model


class Built(NamedTuple):
    """What `build_applied` made: the applied model, its attention backend, its weights."""

    applied: Applied
    attention: str
    weights: str


def build_applied(program: Program, source: str | nn.Module | ModelSource, *, seed: int = 0,
                  device: torch.device | str | None = None, mesh: DeviceMesh | None = None,
                  backend: str | None = None) -> Built:
    """Build on meta, select the attention backend, apply the Program, allocate the local
    shards and fill them (`load_weights`): no rank ever holds the full model. Then seed
    the random generators for training (`seed_random`)."""
    src = _source(source)
    target = torch.device(device) if device is not None else init().device
    model = meta_model(src)
    name = backend or select_backend(target)
    use_backend(model, name)
    applied = apply(program, model, mesh=mesh, device_type=target.type)
    materialize(applied, target)
    weights = load_weights(applied, src, seed=seed)
    seed_random(applied, seed)
    return Built(applied, name, weights)


def seed_random(applied: Applied, seed: int) -> None:
    """Seed torch's generators from `seed` and this rank's coordinates on every mesh
    dimension but the tensor-parallel ones.

    Tensor-parallel ranks hold the same replicated activations, and a module that draws
    a mask on them (LoRA's input dropout before a replicated `lora_A`, any dropout on a
    replicated residual) must draw the same mask on each, or the replicas' gradients and
    then their weights drift apart (measured: 0.4 relative between the copies of lora_A's
    gradient at dropout 0.05, tp 2). Ranks holding other data (data-parallel, context-
    and pipeline-parallel ones) draw their own. Each process torchrun starts has its own
    initial seed, so without this every rank draws its own masks."""
    from meshplan.planner.program import Parallelize

    mesh = applied.mesh
    names = tuple(mesh.mesh_dim_names or ())
    tensor_parallel = {d for s in applied.program.steps_of(Parallelize)
                       for d in applied.program.mesh.expand(s.mesh_dim)}
    coordinate = mesh.get_coordinate() or [0] * len(names)
    index = 0
    for name, size, at in zip(names, mesh.shape, coordinate, strict=True):
        if name not in tensor_parallel:
            index = index * size + at
    torch.manual_seed((seed * 1_000_003 + index) % 2**63)


def device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
