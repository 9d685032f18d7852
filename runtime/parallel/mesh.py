"""The device mesh of a Program: dimensions, and submeshes flattened onto it.

`build_mesh(layout)` creates one DeviceMesh over all ranks with the Program's dimension
names in canonical order (size-1 dimensions included, so every name a plan uses
exists), then flattens each declared submesh (e.g. `fsdp = dp_shard * cp`), so that
`mesh[name]` works for every dimension and submesh, and `mesh[(a, b)]` for the
two-name meshes HSDP uses.
"""

from __future__ import annotations

import warnings

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from meshplan.planner.program import MeshLayout


class MeshError(RuntimeError):
    """The process group cannot host the Program's mesh."""


def product_dims(layout: MeshLayout) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The dimensions that multiply to the world size (`ep` lives on its own mesh)."""
    pairs = [(n, s) for n, s in zip(layout.names, layout.shape, strict=True) if n != "ep"]
    return tuple(n for n, _ in pairs), tuple(s for _, s in pairs)


def build_mesh(layout: MeshLayout, device_type: str = "cpu") -> DeviceMesh:
    if not dist.is_initialized():
        raise MeshError("torch.distributed is not initialised: run under torchrun, or call "
                        "meshplan.runtime.init() first")
    world = dist.get_world_size()
    if world != layout.world_size:
        raise MeshError(f"the program is compiled for {layout.world_size} ranks, this job has {world}")
    names, shape = product_dims(layout)
    if not names:
        names, shape = ("dp_shard",), (1,)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=names)
    for name, dims in layout.submeshes:
        mesh[dims]._flatten(name)
    return mesh


def submesh(mesh: DeviceMesh, names: tuple[str, ...]) -> DeviceMesh:
    """`mesh[name]` or `mesh[(a, b)]`, with a message naming what is missing."""
    try:
        with warnings.catch_warnings():
            # HSDP over (dp_replicate, <flattened submesh>) slices a flattened dimension
            # from the root mesh, which torch plans to deprecate; it is what 2.13 offers.
            warnings.filterwarnings("ignore", message="Slicing a flattened dim")
            return mesh[names[0]] if len(names) == 1 else mesh[names]
    except (KeyError, RuntimeError, ValueError) as e:
        raise MeshError(f"the mesh has no {' × '.join(names)}: {e}") from e
