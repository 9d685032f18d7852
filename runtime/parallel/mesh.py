"""The device mesh of a Program: dimensions, and submeshes flattened onto it.

`build_mesh(layout)` creates one DeviceMesh over all ranks with the Program's dimension
names in canonical order (size-1 dimensions included, so every name a plan uses
exists), then flattens each declared submesh (e.g. `fsdp = dp_shard * cp`).
`submesh(mesh, names)` returns the mesh of one dimension or submesh, or of several
(`(dp_replicate, fsdp)` for HSDP).

`build_rank_mesh(layout)` is the same mesh as this process's rank sees it, with only the
process groups that rank belongs to: for a fake process group (the dry run), where no
other rank exists to create the others. `init_device_mesh` creates a group for every
group of ranks of every dimension — 100,000 `new_group` calls for a 16,384-rank mesh of
five dimensions and three submeshes — although a rank uses one group per dimension.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.distributed_c10d import GroupName

from meshplan.planner.program import MeshLayout


class MeshError(RuntimeError):
    """The process group cannot host the Program's mesh."""


def product_dims(layout: MeshLayout) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The dimensions that multiply to the world size (`ep` lives on its own mesh)."""
    pairs = [(n, s) for n, s in zip(layout.names, layout.shape, strict=True) if n != "ep"]
    return tuple(n for n, _ in pairs), tuple(s for _, s in pairs)


def _mesh_dims(layout: MeshLayout) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The checked world, and the dimensions the DeviceMesh has (at least one)."""
    if not dist.is_initialized():
        raise MeshError("torch.distributed is not initialised: run under torchrun, or call "
                        "meshplan.runtime.init() first")
    world = dist.get_world_size()
    if world != layout.world_size:
        raise MeshError(f"the program is compiled for {layout.world_size} ranks, this job has {world}")
    names, shape = product_dims(layout)
    return (names, shape) if names else (("dp_shard",), (1,))


def build_mesh(layout: MeshLayout, device_type: str = "cpu") -> DeviceMesh:
    names, shape = _mesh_dims(layout)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=names)
    for name, dims in layout.submeshes:
        mesh[dims]._flatten(name)
    return mesh


def build_rank_mesh(layout: MeshLayout, device_type: str = "cpu") -> DeviceMesh:
    """`build_mesh` for this rank alone: the same layout, names and flattened submeshes,
    each dimension holding the group of ranks this rank is in (see the module docstring).

    The groups are made as `init_device_mesh` makes them — the default group for a
    dimension spanning every rank, else `new_group` over the ranks of this rank's
    group — so group sizes, ranks and local ranks are the same; only the groups of
    other ranks, which this process would never use, are not created."""
    from torch.distributed._mesh_layout import _MeshLayout

    names, shape = _mesh_dims(layout)
    rank = dist.get_rank()
    ranks = torch.arange(layout.world_size, dtype=torch.int).view(shape)
    mesh = DeviceMesh(device_type, ranks, mesh_dim_names=names, _init_backend=False)
    mesh._dim_group_names = [_own_group(mesh, mesh._layout[i], names[i], rank) for i in range(len(names))]
    for name, dims in layout.submeshes:
        # What `mesh[dims]._flatten(name)` builds, with this rank's group only.
        flat_layout = _MeshLayout([mesh[dims]._layout.collapse()])
        flat = DeviceMesh(device_type, _layout=flat_layout, _rank_map=mesh._rank_map, mesh_dim_names=(name,),
                          _root_mesh=mesh, _init_backend=False)
        flat._dim_group_names = [_own_group(mesh, flat_layout[0], name, rank)]
        mesh._flatten_mapping[name] = flat
    mesh.__dict__[_RANK_ONLY] = True
    return mesh


_RANK_ONLY = "_meshplan_rank_only"  # marks a `build_rank_mesh` mesh (kept on the mesh itself)


def rank_only(mesh: DeviceMesh) -> bool:
    """Was `mesh` built by `build_rank_mesh` (only this rank's process groups exist)?"""
    return bool(mesh._get_root_mesh().__dict__.get(_RANK_ONLY, False))


def mesh_over(mesh: DeviceMesh, ranks: torch.Tensor, names: tuple[str, ...]) -> DeviceMesh:
    """A DeviceMesh over `ranks` (the same ranks as `mesh`, laid out otherwise), with
    every group of ranks as `DeviceMesh` makes them — or, when `mesh` was built for this
    rank alone (`build_rank_mesh`), with only the groups this rank is in."""
    if not rank_only(mesh):
        return DeviceMesh(mesh.device_type, ranks, mesh_dim_names=names)
    own = DeviceMesh(mesh.device_type, ranks, mesh_dim_names=names, _init_backend=False)
    rank = dist.get_rank()
    own._dim_group_names = [_own_group(own, own._layout[i], names[i], rank) for i in range(len(names))]
    own.__dict__[_RANK_ONLY] = True
    return own


def _own_group(mesh: DeviceMesh, axis: object, name: str, rank: int) -> GroupName:
    """The name of the process group of `rank` along one axis of the mesh's layout."""
    from torch.distributed._mesh_layout import _MeshLayout

    groups = _MeshLayout([axis]).remap_to_tensor(mesh._rank_map)  # type: ignore[list-item]
    mine = groups[(groups == rank).any(dim=1)][0].tolist()
    if len(mine) == dist.get_world_size():
        group = dist.distributed_c10d._get_default_group()
    else:
        made = dist.new_group(ranks=mine, group_desc=f"mesh_{name}")
        if not isinstance(made, dist.ProcessGroup):  # pragma: no cover - rank is in `mine`
            raise MeshError(f"no process group for rank {rank} along {name}")
        group = made
    mesh._pg_registry[group.group_name] = group
    return group.group_name


def submesh(mesh: DeviceMesh, names: tuple[str, ...]) -> DeviceMesh:
    """The mesh of one dimension or submesh, or of several, with a message naming what is
    missing. A flattened submesh is taken from the root mesh's own record of it and
    joined to the others by concatenation: slicing it from the root mesh
    (`mesh[("dp_replicate", "fsdp")]`) is deprecated, and builds the same mesh.

    The same names give the same DeviceMesh object: DTensor compares the meshes of its
    operands, and two equal meshes that are not one object compare their whole rank map
    (16,384 entries at 16,384 ranks) on every op."""
    # Kept on the mesh itself, so the submeshes live and die with it.
    cache: dict[tuple[str, ...], DeviceMesh] = mesh.__dict__.setdefault("_meshplan_submeshes", {})
    sub = cache.get(names)
    if sub is None:
        sub = cache[names] = _submesh(mesh, names)
    return sub


def _submesh(mesh: DeviceMesh, names: tuple[str, ...]) -> DeviceMesh:
    root = mesh._get_root_mesh()
    flattened = root._flatten_mapping
    try:
        if not any(n in flattened for n in names):
            return mesh[names[0]] if len(names) == 1 else mesh[names]
        parts = [flattened[n] if n in flattened else mesh[n] for n in names]
        return parts[0] if len(parts) == 1 else DeviceMesh._concatenate(parts)
    except (KeyError, RuntimeError, ValueError) as e:
        raise MeshError(f"the mesh has no {' × '.join(names)}: {e}") from e
