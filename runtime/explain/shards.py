"""Parameter shards: what one rank holds of every parameter, and the classes of ranks.

The reduced Program (`runtime.explain.reduction`) is applied by the runtime's own
`apply` to a meta model on the fake process group (`runtime.explain.world`), as rank 0
and as ranks of the other classes of ranks whose local shapes differ (uneven shards;
`rank_classes`). Per parameter it records the placements, the local shape, and the
storage this rank allocates: FSDP2 pads every shard of a parameter to the size of the
first one (`padded_sharded_param_size`), so a rank with an empty shard still pays the
padding. Context-parallel steps are left out (they change no parameter). The shapes of
classes not applied are computed from the placements the way FSDP2 and DTensor split.

Under an Adapters step the dry-run model is the adapted one (PEFT's names: an adapted
module's `base_layer.weight`, `lora_A.default.weight`, `lora_B.default.weight`): each
shard records whether the parameter requires a gradient and its dtype as applied, and,
for a base weight the step quantises, the NF4 layout its bytes follow
(`runtime.explain.sizes.nf4_bytes`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from meshplan.planner.program import Adapters, FullyShard, MeshLayout, Program, Quantize

from ..parallel.apply import DTYPES
from .failure import apply_each
from .reduction import Reduction, build_reduced_model
from .sizes import nf4_bytes, nf4_gathered_bytes
from .world import clean_name, coordinates, fake_world, mesh_size, rank_at

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from meshplan.planner.models import ModelSource


@dataclass(frozen=True)
class ParamLayout:
    placements: tuple[str, ...]
    global_shape: tuple[int, ...]
    local_shape: tuple[int, ...]
    dtype: str


def parameter_layouts(model: nn.Module) -> dict[str, ParamLayout]:
    out = {}
    for name, p in model.named_parameters():
        clean = clean_name(name)
        if isinstance(p, DTensor):
            out[clean] = ParamLayout(tuple(str(x) for x in p.placements), tuple(p.shape),
                                     tuple(p.to_local().shape), str(p.dtype))
        else:
            out[clean] = ParamLayout((), tuple(p.shape), tuple(p.shape), str(p.dtype))
    return out


@dataclass(frozen=True)
class ParamShard:
    """One parameter as one rank holds it (full-model name, wrappers removed).

    `storage_numel` is what the rank allocates for it: the local numel, or for an
    FSDP-managed parameter the padded shard (`padded_sharded_param_size`).
    `unsharded_numel` is what FSDP all-gathers for it (padded shard × shard group), 0 if
    FSDP does not manage it. `placements`/`mesh_dims` are the DTensor's, () for a plain
    tensor.
    """

    fqn: str
    global_shape: tuple[int, ...]
    local_shape: tuple[int, ...]
    placements: tuple[str, ...]
    mesh_dims: tuple[str, ...]
    dtype: str
    itemsize: int
    storage_numel: int
    unsharded_numel: int = 0
    placement_objects: tuple[Any, ...] = field(default=(), compare=False, repr=False)
    fsdp_dim: str | None = None  # the mesh dimension FSDP shards it over
    requires_grad: bool = True  # False: frozen (no gradient, no optimizer state)
    quantize: Quantize | None = None  # an NF4 base weight: its bytes follow `nf4_bytes`

    @property
    def local_numel(self) -> int:
        return math.prod(self.local_shape)

    def _bytes(self, numel: int) -> int:
        if self.quantize is None:
            return numel * self.itemsize
        # `itemsize` is the dtype it was quantised from: its scales and code table's.
        return nf4_bytes(numel, self.quantize.block_size, self.quantize.scaler_block_size, itemsize=self.itemsize)

    @property
    def storage_bytes(self) -> int:
        return self._bytes(self.storage_numel)

    @property
    def local_bytes(self) -> int:
        return self._bytes(self.local_numel)

    def gathered_bytes(self, compute_itemsize: int) -> int:
        """What FSDP2 all-gathers of it (0 when FSDP does not manage it): the unsharded
        parameter in the compute dtype, or an NF4 weight's codes, scalers and scales
        (torchao gathers them as they are: mixed precision does not cast them)."""
        if self.quantize is None:
            return self.unsharded_numel * compute_itemsize
        return nf4_gathered_bytes(self.unsharded_numel, self.quantize.block_size,
                                  self.quantize.scaler_block_size, itemsize=self.itemsize)

    @property
    def dtype_label(self) -> str:
        """The storage dtype as the tables print it: `nf4` for a 4-bit weight."""
        return "nf4" if self.quantize is not None else self.dtype.replace("torch.", "")

    @property
    def layout(self) -> ParamLayout:
        return ParamLayout(self.placements, self.global_shape, self.local_shape, self.dtype)


def _fsdp_params(model: nn.Module) -> dict[int, Any]:
    """id(sharded parameter) → FSDP2's FSDPParam, for every fully_shard-ed module."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch < 2.6
        return {}
    out: dict[int, Any] = {}
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        group = getattr(module._get_fsdp_state(), "_fsdp_param_group", None)
        for fsdp_param in getattr(group, "fsdp_params", ()) if group is not None else ():
            out[id(fsdp_param.sharded_param)] = fsdp_param
    return out


def quantized_weights(program: Program) -> dict[str, Quantize]:
    """Parameter name → NF4 layout, for the base weights the Program's Adapters steps
    quantise (PEFT keeps an adapted module's own weight as `<fqn>.base_layer.weight`)."""
    return {f"{fqn}.base_layer.weight": step.quantize
            for step in program.steps_of(Adapters) if step.quantize is not None for fqn in step.fqns}


def _shards(model: nn.Module, reduction: Reduction) -> dict[str, ParamShard]:
    managed = _fsdp_params(model)
    quantized = quantized_weights(reduction.program)
    out: dict[str, ParamShard] = {}
    for name, p in model.named_parameters():
        clean = clean_name(name)
        fqn = reduction.to_full(clean)
        local = p.to_local() if isinstance(p, DTensor) else p
        storage = local.numel()
        unsharded = 0
        fsdp_dim = None
        fsdp_param = managed.get(id(p))
        if fsdp_param is not None:
            storage = int(math.prod(fsdp_param.padded_sharded_param_size))
            info = fsdp_param.mesh_info
            unsharded = storage * int(getattr(info, "shard_mesh_size", 1))
            names = getattr(info.mesh, "mesh_dim_names", None) or ()
            index = getattr(info, "shard_mesh_dim", None)
            fsdp_dim = names[index] if index is not None and index < len(names) else None
        placements: tuple[Any, ...] = tuple(p.placements) if isinstance(p, DTensor) else ()
        dims = tuple(p.device_mesh.mesh_dim_names or ()) if isinstance(p, DTensor) else ()
        out[fqn] = ParamShard(
            fqn=fqn, global_shape=tuple(p.shape), local_shape=tuple(local.shape),
            placements=tuple(str(x) for x in placements), mesh_dims=dims, dtype=str(p.dtype),
            itemsize=p.element_size(), storage_numel=storage, unsharded_numel=unsharded,
            placement_objects=placements, fsdp_dim=fsdp_dim, requires_grad=p.requires_grad,
            quantize=quantized.get(clean),
        )
    return out


def model_parameters(shards: dict[str, ParamShard], reduction: Reduction,
                     tied: Sequence[tuple[str, ...]] = ()) -> list[str]:
    """Full-model names of every parameter of the model as the Program leaves it (adapters
    included): a kept block's parameters once for every layer it stands for; a tied
    alias left out when its parameter is there."""
    canonical = {alias: group[0] for group in tied for alias in group[1:]}
    out: list[str] = []
    for key in shards:
        if key in canonical and reduction.representative(canonical[key]) in shards:
            continue
        found = reduction.split(key) if reduction.reduced else None
        if found is None:
            out.append(key)
            continue
        layer, rest = found
        out += [f"{reduction.stack}.{i}.{rest}" for i, r in enumerate(reduction.represents) if r == layer]
    return out


@dataclass(frozen=True)
class RankClass:
    """Ranks whose parameters have the same local shapes; `rank` is the first of them."""

    rank: int
    count: int
    coordinates: dict[str, int]
    shards: dict[str, ParamShard] = field(compare=False, repr=False)
    measured: bool = True  # applied as `rank` on the fake process group (else computed)
    buffers: dict[str, int] = field(default_factory=dict, compare=False, repr=False)  # fqn → itemsize


def _storage_dtype(name: str | None) -> torch.dtype | None:
    return DTYPES.get(name) if name else None


def _apply_reduced(program: Program, source: ModelSource, reduction: Reduction, rank: int,
                   dtype: torch.dtype | None, mesh: DeviceMesh | None = None,
                   ) -> tuple[dict[str, ParamShard], dict[str, int]]:
    """Apply the reduced Program to a meta model as `rank`: in a fake world of its own, or
    in the current one through `mesh` (rank 0's world serves the traced step too)."""
    if mesh is None:
        with fake_world(program.mesh, rank) as own:
            return _apply_reduced(program, source, reduction, rank, dtype, own)
    with torch.device("meta"):
        model = build_reduced_model(source, reduction, dtype=dtype)
    reduced = _without_context_parallel(reduction.program)
    for step in reduced.steps:
        # Steps that build modules (adapters) build them on meta. FSDP only cuts the meta
        # parameters it is given (views and `new_empty` of them): outside the device
        # context its tensor calls skip torch's device hook.
        with _shared_empty_chunks() if isinstance(step, FullyShard) else torch.device("meta"):
            apply_each(reduced, (step,), model, mesh, reduction)
    buffers = {reduction.to_full(clean_name(n)): b.element_size() for n, b in model.named_buffers()}
    return _shards(model, reduction), buffers


@contextlib.contextmanager
def _shared_empty_chunks() -> Iterator[None]:
    """FSDP2 cuts each parameter into one chunk per rank of its shard group, padding the
    list with a fresh `new_empty(0)` per rank past the last non-empty chunk, and reads
    only chunk 0 (the padded size) and its own rank's. At 2048-way sharding that is
    ~14k empties per application, each a Python meta function on meta tensors (a third
    of the application's time). While the dry run applies, the padding is one shared
    empty tensor: every chunk FSDP reads has the same shape as before, so every shard
    it builds is the same. (If torch renames the helper, nothing is replaced.)"""
    from torch.distributed.fsdp._fully_shard import _fsdp_param

    original = getattr(_fsdp_param, "_chunk_with_empty", None)
    if original is None:
        yield
        return

    def chunk_with_empty(tensor: torch.Tensor, num_chunks: int, dim: int) -> list[torch.Tensor]:
        chunks = list(torch.chunk(tensor, num_chunks, dim=dim))
        if len(chunks) < num_chunks:
            chunks += [chunks[0].new_empty(0)] * (num_chunks - len(chunks))
        return chunks

    _fsdp_param._chunk_with_empty = chunk_with_empty
    try:
        yield
    finally:
        _fsdp_param._chunk_with_empty = original


def _without_context_parallel(program: Program) -> Program:
    """Context parallelism swaps attention only (no parameter changes) and needs batches
    with data (`runtime.parallel.context.shard_batch`): the dry run leaves it out and `runtime.explain.comm`
    derives its traffic from the attention shapes."""
    steps = tuple(s for s in program.steps if s.in_dry_run)
    return dataclasses.replace(program, steps=steps) if len(steps) != len(program.steps) else program


def _chunk(length: int, n: int, c: int) -> int:
    """The size of piece `c` of `length` split as torch.chunk does (empty pieces at the end)."""
    if n <= 1:
        return length
    size = -(-length // n)
    return max(0, min(size, length - c * size))


def _local_shape(shard: ParamShard, mesh_shape: Sequence[int], coords: Sequence[int]) -> tuple[int, ...]:
    """The local shape at mesh coordinates `coords` of the shard's DTensor mesh.

    A tensor dimension is split by its `Shard` placements in mesh order, then by FSDP's
    `_StridedShard` ones (FSDP2 shards the tensor-parallel local piece further)."""
    splits = _splits(shard)
    if splits is None:
        return _torch_local_shape(shard, mesh_shape, coords)
    shape = list(shard.global_shape)
    for d, i in splits:
        shape[d] = _chunk(shape[d], mesh_shape[i], coords[i])
    return tuple(shape)


# (placements as text, ndim) → what `_splits` returns. The rank classes ask it for every
# coordinate of every dimension (2048 of dp_shard at 16384 ranks); placement objects
# hash slowly, their text (`S(0)`, `_S(0, 8)`, `R`) names kind and dimension alike.
_SPLITS: dict[tuple[tuple[str, ...], int], tuple[tuple[int, int], ...] | None] = {}


def _splits(shard: ParamShard) -> tuple[tuple[int, int], ...] | None:
    """(tensor dimension, mesh dimension index) of each split `_local_shape` makes, in its
    order; None for a placement it cannot follow (torch computes those)."""
    ndim = len(shard.global_shape)
    key = (shard.placements, ndim)
    if key in _SPLITS:
        return _SPLITS[key]
    plain: list[tuple[int, int]] = []
    strided: list[tuple[int, int]] = []
    found: tuple[tuple[int, int], ...] | None = None
    for i, placement in enumerate(shard.placement_objects):
        d = shard_dim(placement)
        if d is None:
            if not (placement.is_replicate() or placement.is_partial()):
                break
            continue
        (plain if type(placement).__name__ == "Shard" else strided).append((d % ndim, i))
    else:
        found = (*plain, *strided)
    _SPLITS[key] = found
    return found


def _torch_local_shape(shard: ParamShard, mesh_shape: Sequence[int], coords: Sequence[int]) -> tuple[int, ...]:
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    shape, _ = _compute_local_shape_and_global_offset(
        shard.global_shape, list(mesh_shape), list(coords), list(shard.placement_objects),
        skip_offset=True)
    return tuple(int(s) for s in shape)


def shard_dim(placement: Any) -> int | None:
    """The tensor dimension a placement shards (`Shard` or FSDP's `_StridedShard`), else None."""
    from torch.distributed.tensor import Shard

    if isinstance(placement, Shard) or type(placement).__name__ == "_StridedShard":
        return int(placement.dim)
    return None


def uneven(shard: ParamShard, layout: MeshLayout, over: Sequence[str] | None = None) -> bool:
    """Do the shard's placements (those over the mesh dimensions `over`, default all)
    split some tensor dimension unevenly?"""
    per_dim: dict[int, int] = {}
    for dim_name, placement in zip(shard.mesh_dims, shard.placement_objects, strict=True):
        d = shard_dim(placement)
        if d is not None and (over is None or dim_name in over):
            d = d % len(shard.global_shape)
            per_dim[d] = per_dim.get(d, 1) * mesh_size(layout, dim_name)
    return any(shard.global_shape[d] % n for d, n in per_dim.items())


def _recompute(shard: ParamShard, layout: MeshLayout, coords: dict[str, int]) -> ParamShard:
    """The shard as the rank at `coords` holds it (FSDP pads to the coordinate-0 shard)."""
    if not shard.mesh_dims:
        return shard
    mesh_shape = [mesh_size(layout, d) for d in shard.mesh_dims]
    local = _local_shape(shard, mesh_shape, [coords.get(d, 0) for d in shard.mesh_dims])
    storage, unsharded = math.prod(local), 0
    if shard.unsharded_numel:
        # FSDP2 pads to the first shard of this rank's tensor-parallel piece.
        first = _local_shape(shard, mesh_shape, [0 if d == shard.fsdp_dim else coords.get(d, 0)
                                                 for d in shard.mesh_dims])
        storage = math.prod(first)
        unsharded = storage * (mesh_size(layout, shard.fsdp_dim) if shard.fsdp_dim else 1)
    return dataclasses.replace(shard, local_shape=local, storage_numel=storage, unsharded_numel=unsharded)


def rank_classes(layout: MeshLayout, shards: dict[str, ParamShard],
                 limit: int = 64) -> list[tuple[int, int, dict[str, int]]]:
    """(first rank, number of ranks, coordinates) of each class of ranks whose local shapes
    differ; one class of every rank when every shard is even."""
    odd = [s for s in shards.values() if s.mesh_dims and uneven(s, layout)]
    world = layout.world_size
    if not odd:
        return [(0, world, coordinates(layout, 0))]
    dims = list(dict.fromkeys(d for s in odd for d in s.mesh_dims))
    if {"ep", "efsdp"} & set(dims):
        return _pool_classes(layout, odd, limit)
    # Classes per dimension: coordinates along it (others 0) giving the same shapes.
    sizes = {id(s): [layout.size(x) for x in s.mesh_dims] for s in odd}
    per_dim: list[list[tuple[int, int]]] = []
    for d in dims:
        classes: dict[tuple[Any, ...], list[int]] = {}
        along = [s for s in odd if d in s.mesh_dims]
        for c in range(layout.size(d)):
            key = tuple(_local_shape(s, sizes[id(s)], [c if x == d else 0 for x in s.mesh_dims]) for s in along)
            classes.setdefault(key, []).append(c)
        per_dim.append([(cs[0], len(cs)) for cs in classes.values()])
    covered = math.prod(layout.size(d) for d in dims)
    others = world // covered if covered and world % covered == 0 else 1
    merged: dict[tuple[Any, ...], list[Any]] = {}
    for combo in itertools.product(*per_dim):
        flat = dict(zip(dims, (c for c, _ in combo), strict=True))
        count = math.prod(n for _, n in combo) * others
        key = tuple(_local_shape(s, sizes[id(s)], [flat.get(x, 0) for x in s.mesh_dims]) for s in odd)
        entry = merged.setdefault(key, [flat, 0])
        entry[1] += count
    out = []
    for flat, count in merged.values():
        rank = _rank_from_mesh_coords(layout, flat)
        out.append((rank, count, coordinates(layout, rank)))
    out.sort(key=lambda t: t[0])
    return out[:limit]


def _pool_classes(layout: MeshLayout, odd: list[ParamShard], limit: int) -> list[tuple[int, int, dict[str, int]]]:
    """`rank_classes` when uneven shards lie on the expert mesh, whose coordinates (ep,
    efsdp) are no product of the mesh's: the ranks of one pool (dp_shard × cp × tp), by
    their distinct coordinates along the dimensions the uneven shards use; every pool
    alike (nothing is sharded over dp_replicate)."""
    import numpy as np

    pool = math.prod(layout.size(d) for d in ("dp_shard", "cp", "tp"))
    ep = max(1, layout.size("ep"))
    ranks = np.arange(pool)
    coords: dict[str, Any] = {"ep": ranks % ep, "efsdp": ranks // ep}
    rest = ranks.copy()
    for d in ("tp", "cp", "dp_shard"):  # row-major, tp innermost
        coords[d] = rest % layout.size(d)
        rest //= layout.size(d)
    dims = list(dict.fromkeys(d for s in odd for d in s.mesh_dims))
    table = np.stack([coords.get(d, np.zeros(pool, dtype=np.int64)) for d in dims], axis=1)
    rows, first, counts = np.unique(table, axis=0, return_index=True, return_counts=True)
    merged: dict[tuple[Any, ...], list[int]] = {}
    for row, rank, count in zip(rows.tolist(), first.tolist(), counts.tolist(), strict=True):
        at = dict(zip(dims, row, strict=True))
        key = tuple(_local_shape(s, [mesh_size(layout, x) for x in s.mesh_dims],
                                 [at[x] for x in s.mesh_dims]) for s in odd)
        entry = merged.setdefault(key, [rank, 0])
        entry[0] = min(entry[0], rank)
        entry[1] += count * (layout.world_size // pool)
    out = sorted((rank, count, coordinates(layout, rank)) for rank, count in merged.values())
    return out[:limit]


def _rank_from_mesh_coords(layout: MeshLayout, flat: dict[str, int]) -> int:
    """A rank whose coordinates along the named dimensions or submeshes are `flat`."""
    product: dict[str, int] = {}
    for name, value in flat.items():
        dims = layout.expand(name)
        for d in reversed(dims):
            size = layout.size(d)
            product[d] = value % size
            value //= size
    return rank_at(layout, product)


def measure_rank_zero(program: Program, source: ModelSource, reduction: Reduction, *,
                      param_dtype: str | None = None, mesh: DeviceMesh | None = None,
                      ) -> tuple[dict[str, ParamShard], dict[str, int]]:
    """Rank 0's shards and buffer item sizes (in the open fake world when `mesh` is given)."""
    return _apply_reduced(program, source, reduction, 0, _storage_dtype(param_dtype), mesh)


def measure_shards(program: Program, source: ModelSource, reduction: Reduction, *,
                   param_dtype: str | None = None, measure_limit: int = 2,
                   first: tuple[dict[str, ParamShard], dict[str, int]] | None = None) -> list[RankClass]:
    """Apply the reduced Program as rank 0 and as the first rank of other classes of ranks,
    the last classes first (they hold the emptiest shards), `measure_limit` applies in
    all; the shapes of the remaining classes are computed from the placements the same
    way FSDP2 and DTensor split (checked against applying in the tests). `first`: rank 0's
    measurement (`measure_rank_zero`), if already made."""
    dtype = _storage_dtype(param_dtype)
    zero, buffers = first or _apply_reduced(program, source, reduction, 0, dtype)
    classes = rank_classes(program.mesh, zero)
    applied = {c[0] for c in classes[::-1][: max(0, measure_limit - 1)] if c[0] != 0}
    out: list[RankClass] = []
    for rank, count, coords in classes:
        if rank == 0:
            shards, measured = zero, True
        elif rank in applied:
            shards, measured = _apply_reduced(program, source, reduction, rank, dtype)[0], True
        else:
            shards = {k: _recompute(s, program.mesh, coords) for k, s in zero.items()}
            measured = False
        out.append(RankClass(rank=rank, count=count, coordinates=coords, shards=shards,
                             measured=measured, buffers=buffers))
    return out
