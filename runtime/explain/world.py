"""The fake world a dry run measures in, and where a rank sits in it.

`fake_world(layout, rank)` opens a fake process group (`FakeStore` + backend `fake`: no
communication, no other process) of the Program's world size, seen as `rank`, and
yields that rank's DeviceMesh, built with only the process groups the rank belongs to
(`runtime.parallel.mesh.build_rank_mesh`: a 16,384-rank mesh costs milliseconds, not
the seconds of a group for every group of ranks). `coordinates` / `rank_at` convert
between a rank and its coordinates along the dimensions and submeshes, row-major with
`tp` innermost, as the DeviceMesh lays them out.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch.distributed as dist

from meshplan.planner.program import MeshLayout

from ..parallel.mesh import build_rank_mesh, product_dims

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

_WRAPPERS = ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


@contextmanager
def fake_world(layout: MeshLayout, rank: int = 0) -> Iterator[DeviceMesh]:
    """A fake process group of the layout's world size, seen as `rank`; yields the rank's
    mesh. Torn down on exit."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=layout.world_size)
    try:
        yield build_rank_mesh(layout)
    finally:
        dist.destroy_process_group()
        _clear_sharding_caches()


def _clear_sharding_caches() -> None:
    """DTensor caches sharding decisions keyed by meshes that compare equal across process
    groups; a cached decision from a destroyed fake world would name its dead groups."""
    try:
        from torch.distributed.tensor.debug import _clear_sharding_prop_cache
    except ImportError:  # pragma: no cover - other torch versions
        return
    _clear_sharding_prop_cache()


def clean_name(name: str) -> str:
    """A parameter or module name without the wrappers apply() inserts."""
    for wrapper in _WRAPPERS:
        name = name.replace(wrapper, "")
    return name.replace("._checkpoint_wrapped_module", "").replace("._fsdp_wrapped_module", "")


def coordinates(layout: MeshLayout, rank: int) -> dict[str, int]:
    """A rank's coordinate along every dimension and submesh (row-major, `tp` innermost),
    and on the expert mesh (`ep`, `efsdp`) when there is one."""
    names, shape = product_dims(layout)
    out: dict[str, int] = {}
    rest = rank
    for name, size in reversed(list(zip(names, shape, strict=True))):
        out[name] = rest % size
        rest //= size
    for name, dims in layout.submeshes:
        flat = 0
        for d in dims:
            flat = flat * layout.size(d) + out.get(d, 0)
        out[name] = flat
    return {**expert_coordinates(layout, rank), **out}


def expert_coordinates(layout: MeshLayout, rank: int) -> dict[str, int]:
    """A rank's place on the expert mesh (`runtime.parallel.experts.expert_mesh`): the
    pool dp_shard × cp × tp cut into (efsdp, ep), ep innermost; {} without ep."""
    ep = layout.size("ep")
    if ep <= 1:
        return {}
    within = rank % math.prod(layout.size(d) for d in ("dp_shard", "cp", "tp"))
    return {"ep": within % ep, "efsdp": within // ep}


def mesh_size(layout: MeshLayout, name: str) -> int:
    """The size of a dimension or submesh, the expert mesh's `efsdp` included."""
    if name == "efsdp" and name not in layout.names:
        pool = math.prod(layout.size(d) for d in ("dp_shard", "cp", "tp"))
        return pool // max(1, layout.size("ep"))
    return layout.size(name)


def rank_at(layout: MeshLayout, coords: dict[str, int]) -> int:
    """The rank at the given coordinates of the product dimensions (missing ones: 0)."""
    names, shape = product_dims(layout)
    rank = 0
    for name, size in zip(names, shape, strict=True):
        rank = rank * size + coords.get(name, 0)
    return rank
