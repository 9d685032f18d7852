"""Mesh arithmetic.

Guarantees: the mesh's dimensions multiply to the world size (with `auto` taking the
quotient, which must be whole); `ep` divides the ranks it is carved from
(dp_shard × cp); `ctx.mesh` is set to the concrete layout.
"""

from __future__ import annotations

from meshplan.dsl.spec import PRODUCT_DIMS

from ..mesh_facts import EXPERT_POOL
from ..program import MeshLayout
from .context import Context


class MeshArithmetic:
    name = "mesh"

    def apply(self, ctx: Context) -> None:
        spec = ctx.spec.mesh
        fixed = 1
        auto = None
        for dim in spec.dims:
            if dim.name not in PRODUCT_DIMS:
                continue
            if dim.size is None:
                auto = dim
            else:
                fixed *= dim.size
        sizes = {d.name: d.size for d in spec.dims}
        described = " × ".join(f"{d.name} {d.size if d.size is not None else 'auto'}"
                               for d in spec.dims if d.name in PRODUCT_DIMS) or "no dimensions"
        if auto is not None:
            if ctx.world_size % fixed:
                ctx.error(auto.span, "E501",
                          f"`{auto.name} = auto` cannot fill the world: {ctx.world_size} ranks are not "
                          f"divisible by the other dimensions' product {fixed}",
                          f"use a world size that is a multiple of {fixed}, or change the mesh")
                return
            sizes[auto.name] = ctx.world_size // fixed
        elif fixed != ctx.world_size:
            ctx.error(spec.span, "E501",
                      f"the mesh ({described}) has {fixed} ranks, the world size is {ctx.world_size}",
                      "make one dimension `auto`, or set the sizes with --set mesh.DIM=N")
            return
        ep = sizes.get("ep")
        if ep is not None:
            pool = 1
            for d in EXPERT_POOL:
                pool *= sizes.get(d) or 1
            ep_dim = spec.dim("ep")
            if ep > 1 and ep_dim is not None and pool % ep:
                ctx.error(ep_dim.span, "E501",
                          f"ep = {ep} must divide {' × '.join(EXPERT_POOL)} = {pool}: the expert mesh is "
                          "carved out of those ranks")
                return
        names = tuple(d.name for d in spec.dims)
        shape = tuple(int(sizes[n] or 1) for n in names)
        ctx.mesh = MeshLayout(names=names, shape=shape,
                              submeshes=tuple((s.name, s.dims) for s in spec.submeshes))
