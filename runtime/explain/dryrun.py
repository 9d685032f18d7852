"""A dry run: apply a Program to a meta-device model over a fake process group.

Exactly the runtime's `apply`, on `FakeStore` + backend `fake` (no communication, no
weights): what the real job would build, per parameter — placements and local shape —
measured, not estimated. `plan explain` and the compiler's soundness tests use it.

Three measurements, all through `runtime.parallel.apply` and `runtime.parallel.mesh.build_mesh`:

- `dry_run` / `parameter_layouts`: the whole Program on a full meta model, as one rank.
- `measure_shards`: the same on a *reduced* model — one decoder block per distinct
  (block kind, steps applied to it) — as rank 0 and as ranks of the other classes of
  ranks whose local shapes differ (uneven shards; `rank_classes`). `Reduction` maps
  every layer of the full model to the kept block standing for it, so a 126-layer model
  costs what a two-layer one does and the figures are scaled by each group's layer
  count. Per parameter it records the placements, the local shape, and the storage this
  rank allocates: FSDP2 pads every shard of a parameter to the size of the first one
  (`padded_sharded_param_size`), so a rank with an empty shard still pays the padding.
  Context-parallel steps are left out (they change no parameter).
- `trace_step`: one training step (forward, loss, backward) of the reduced model with
  the Program's tensor-parallel and checkpointing steps, on fake tensors (nothing is
  allocated, only shapes flow) at the plan's sequence length and micro-batch. A first
  forward without checkpointing tracks the live bytes of every storage it creates and
  what autograd saves, per block (activations); the step as the Program runs it records
  every collective DTensor issues (tensor/sequence parallel, loss parallel, and the
  all-reduce of gradients left partial). Attention runs as the model's SDPA call without
  a mask (`DRYRUN_ATTENTION`: causal, as a varlen/flash kernel runs it), since masks
  cannot be built from tensors without data. FSDP and context parallelism are not
  traced: their collectives follow from the unit sizes and the attention shapes (see
  `runtime.explain.comm`); the attention is traced over the rank's seq_len / cp tokens.

Building a DeviceMesh of 16384 fake ranks takes seconds (a process group per group of
every dimension), so `runtime.explain` builds rank 0's once and passes it to both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from meshplan.planner.program import (
    Checkpoint,
    ContextParallel,
    FullyShard,
    MeshLayout,
    Parallelize,
    Program,
    Step,
)

from ..parallel.apply import DTYPES, apply

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from meshplan.planner.graph import ModelGraph, Stack
    from meshplan.planner.models import ModelSource

    from .comm import CommEvent

_WRAPPERS = ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")
DRYRUN_ATTENTION = "meshplan_dryrun"


@dataclass(frozen=True)
class ParamLayout:
    placements: tuple[str, ...]
    global_shape: tuple[int, ...]
    local_shape: tuple[int, ...]
    dtype: str


@contextmanager
def fake_world(world_size: int, rank: int = 0) -> Any:
    """A fake process group of `world_size` ranks, seen as `rank`; torn down on exit."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
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


def dry_run(program: Program, build_model: Callable[[], nn.Module], *, rank: int = 0,
            applier: Callable[[Program, nn.Module], Any] | None = None) -> dict[str, ParamLayout]:
    """Apply `program` (or `applier`) to a fresh meta model as `rank`; the resulting layouts."""
    with fake_world(program.world_size, rank), torch.device("meta"):
        model = build_model()
        if applier is None:
            apply(program, model)
        else:
            applier(program, model)
        return parameter_layouts(model)


# --------------------------------------------------------------------------- mesh coordinates


def coordinates(layout: MeshLayout, rank: int) -> dict[str, int]:
    """A rank's coordinate along every dimension and submesh (row-major, `tp` innermost)."""
    from ..parallel.mesh import product_dims

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
    return out


def rank_at(layout: MeshLayout, coords: dict[str, int]) -> int:
    """The rank at the given coordinates of the product dimensions (missing ones: 0)."""
    from ..parallel.mesh import product_dims

    names, shape = product_dims(layout)
    rank = 0
    for name, size in zip(names, shape, strict=True):
        rank = rank * size + coords.get(name, 0)
    return rank


# --------------------------------------------------------------------------- reduction


@dataclass(frozen=True)
class Reduction:
    """The reduced model a dry run measures, and how it stands for the full model.

    `kept` are full-model indices of `stack` (ascending); block `j` of the reduced model
    is block `kept[j]` of the full model. `represents[i]` is the kept index standing for
    full-model layer `i`: same block kind, and the Program applies the same steps to it.
    `program` is the Program restricted to the kept blocks, in the reduced model's names.
    Without a stack (a model that cannot be rebuilt with fewer layers) nothing is
    reduced and `program` is the full Program.
    """

    program: Program
    stack: str | None = None
    length: int = 0
    kept: tuple[int, ...] = ()
    represents: tuple[int, ...] = ()

    @property
    def reduced(self) -> bool:
        return self.stack is not None

    def count(self, kept_layer: int) -> int:
        """How many full-model layers the kept layer stands for."""
        return sum(1 for r in self.represents if r == kept_layer)

    def split(self, fqn: str) -> tuple[int, str] | None:
        """(layer index, rest) of a name inside the stack, e.g. (3, "mlp.up_proj.weight")."""
        if self.stack is None or not fqn.startswith(self.stack + "."):
            return None
        head, _, rest = fqn[len(self.stack) + 1:].partition(".")
        return (int(head), rest) if head.isdigit() else None

    def to_full(self, reduced_fqn: str) -> str:
        found = self.split(reduced_fqn)
        if found is None:
            return reduced_fqn
        j, rest = found
        return f"{self.stack}.{self.kept[j]}" + (f".{rest}" if rest else "")

    def representative(self, fqn: str) -> str:
        """The full-model name of the kept object standing for `fqn`."""
        found = self.split(fqn)
        if found is None:
            return fqn
        i, rest = found
        return f"{self.stack}.{self.represents[i]}" + (f".{rest}" if rest else "")

    def layer_of(self, fqn: str) -> int | None:
        found = self.split(fqn)
        return found[0] if found else None


def _inside(fqn: str, ancestor: str) -> bool:
    return ancestor == "" or fqn == ancestor or fqn.startswith(ancestor + ".")


def _layer_signature(program: Program, block: str) -> tuple[Any, ...]:
    """What the Program does to one block, with the block's own name factored out."""

    def rel(fqn: str) -> str:
        return fqn[len(block):]

    sig: list[Any] = []
    for index, step in enumerate(program.steps):
        if isinstance(step, Parallelize) and step.fqn == block:
            sig.append(("parallelize", step.mesh_dim, step.plan))
        elif isinstance(step, Checkpoint) and _inside(step.fqn, block) and step.fqn:
            sig.append(("checkpoint", rel(step.fqn), step.mode))
        elif isinstance(step, ContextParallel):
            mine = tuple(rel(f) for f in step.fqns if _inside(f, block))
            if mine:
                sig.append(("cp", mine, step.mesh_dim, step.load_balance, step.rotate))
        elif isinstance(step, FullyShard) and step.fqns:
            mine = tuple(rel(f) for f in step.fqns if _inside(f, block))
            if mine:
                spans = len(step.fqns) != len(mine)
                sig.append(("fsdp", mine, spans, index if spans else -1, step.mesh_dims,
                            step.reshard_after_forward, step.mixed_precision, step.offload))
    return tuple(sig)


def reduce_program(program: Program, graph: ModelGraph, *, reduce: bool = True) -> Reduction:
    """Group the layers of the model's decoder stack by (kind, steps), keep one of each
    (`reduce=False`: keep every layer, each standing for itself — the full dry run)."""
    source = graph.source
    stacks = [s for s in graph.stacks if s.length == source.num_layers]
    if len(stacks) != 1 or not source.can_reduce:
        return Reduction(program=program)
    stack: Stack = stacks[0]
    groups: dict[Any, int] = {}
    represents: list[int] = []
    for i in range(stack.length):
        key = (stack.kind_of(i).name, _layer_signature(program, stack.block(i))) if reduce else i
        represents.append(groups.setdefault(key, i))
    kept = tuple(sorted(set(represents)))
    index = {full: j for j, full in enumerate(kept)}
    prefix = stack.fqn + "."

    def rename(fqn: str) -> str | None:
        if not fqn.startswith(prefix):
            return fqn
        head, sep, rest = fqn[len(prefix):].partition(".")
        if not head.isdigit():
            return fqn
        j = index.get(int(head))
        return None if j is None else f"{prefix}{j}{sep}{rest}"

    steps: list[Step] = []
    for step in program.steps:
        if isinstance(step, Parallelize | Checkpoint):
            name = rename(step.fqn)
            if name is not None:
                steps.append(dataclasses.replace(step, fqn=name))
        elif isinstance(step, ContextParallel | FullyShard):
            names = tuple(n for n in (rename(f) for f in step.fqns) if n is not None)
            if names or (isinstance(step, FullyShard) and not step.fqns):
                steps.append(dataclasses.replace(step, fqns=names))
        else:  # pragma: no cover - every step kind is listed above
            steps.append(step)
    reduced = dataclasses.replace(program, steps=tuple(steps))
    return Reduction(program=reduced, stack=stack.fqn, length=stack.length, kept=kept,
                     represents=tuple(represents))


def build_reduced_model(source: ModelSource, reduction: Reduction, **kwargs: Any) -> nn.Module:
    """The meta model a reduction measures (the full model when nothing is reduced)."""
    import copy

    from meshplan.planner.models import build_meta_model

    if reduction.reduced:
        return build_meta_model(source, layers=reduction.kept, **kwargs)
    model = build_meta_model(source, **kwargs)
    # A factory's or caller's module is returned as is: apply() must not change it.
    return copy.deepcopy(model) if model is source.module else model


# --------------------------------------------------------------------------- parameter shards


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

    @property
    def local_numel(self) -> int:
        return math.prod(self.local_shape)

    @property
    def storage_bytes(self) -> int:
        return self.storage_numel * self.itemsize

    @property
    def local_bytes(self) -> int:
        return self.local_numel * self.itemsize

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


def _shards(model: nn.Module, reduction: Reduction) -> dict[str, ParamShard]:
    managed = _fsdp_params(model)
    out: dict[str, ParamShard] = {}
    for name, p in model.named_parameters():
        fqn = reduction.to_full(clean_name(name))
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
            placement_objects=placements, fsdp_dim=fsdp_dim,
        )
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
    in the current one through `mesh` (building a mesh of 16384 ranks takes seconds)."""
    with contextlib.ExitStack() as stack:
        if mesh is None:
            stack.enter_context(fake_world(program.world_size, rank))
        stack.enter_context(torch.device("meta"))
        model = build_reduced_model(source, reduction, dtype=dtype)
        apply(_without_context_parallel(reduction.program), model, mesh=mesh)
        buffers = {reduction.to_full(clean_name(n)): b.element_size() for n, b in model.named_buffers()}
        return _shards(model, reduction), buffers


def _without_context_parallel(program: Program) -> Program:
    """Context parallelism swaps attention only (no parameter changes) and needs batches
    with data (`runtime.parallel.context.shard_batch`): the dry run leaves it out and `runtime.explain.comm`
    derives its traffic from the attention shapes."""
    steps = tuple(s for s in program.steps if not isinstance(s, ContextParallel))
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
    shape = list(shard.global_shape)
    plain: list[tuple[int, int, int]] = []
    strided: list[tuple[int, int, int]] = []
    for i, placement in enumerate(shard.placement_objects):
        d = shard_dim(placement)
        if d is None:
            if not (placement.is_replicate() or placement.is_partial()):
                return _torch_local_shape(shard, mesh_shape, coords)
            continue
        entry = (d % len(shape), mesh_shape[i], coords[i])
        (plain if type(placement).__name__ == "Shard" else strided).append(entry)
    for d, n, c in (*plain, *strided):
        shape[d] = _chunk(shape[d], n, c)
    return tuple(shape)


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


def _uneven(shard: ParamShard, layout: MeshLayout) -> bool:
    per_dim: dict[int, int] = {}
    for dim_name, placement in zip(shard.mesh_dims, shard.placement_objects, strict=True):
        d = shard_dim(placement)
        if d is not None:
            d = d % len(shard.global_shape)
            per_dim[d] = per_dim.get(d, 1) * layout.size(dim_name)
    return any(shard.global_shape[d] % n for d, n in per_dim.items())


def _recompute(shard: ParamShard, layout: MeshLayout, coords: dict[str, int]) -> ParamShard:
    """The shard as the rank at `coords` holds it (FSDP pads to the coordinate-0 shard)."""
    if not shard.mesh_dims:
        return shard
    mesh_shape = [layout.size(d) for d in shard.mesh_dims]
    local = _local_shape(shard, mesh_shape, [coords.get(d, 0) for d in shard.mesh_dims])
    storage, unsharded = math.prod(local), 0
    if shard.unsharded_numel:
        # FSDP2 pads to the first shard of this rank's tensor-parallel piece.
        first = _local_shape(shard, mesh_shape, [0 if d == shard.fsdp_dim else coords.get(d, 0)
                                                 for d in shard.mesh_dims])
        storage = math.prod(first)
        unsharded = storage * (layout.size(shard.fsdp_dim) if shard.fsdp_dim else 1)
    return dataclasses.replace(shard, local_shape=local, storage_numel=storage, unsharded_numel=unsharded)


def rank_classes(layout: MeshLayout, shards: dict[str, ParamShard],
                 limit: int = 64) -> list[tuple[int, int, dict[str, int]]]:
    """(first rank, number of ranks, coordinates) of each class of ranks whose local shapes
    differ; one class of every rank when every shard is even."""
    uneven = [s for s in shards.values() if s.mesh_dims and _uneven(s, layout)]
    world = layout.world_size
    if not uneven:
        return [(0, world, coordinates(layout, 0))]
    dims = list(dict.fromkeys(d for s in uneven for d in s.mesh_dims))
    # Classes per dimension: coordinates along it (others 0) giving the same shapes.
    per_dim: list[list[tuple[int, int]]] = []
    for d in dims:
        classes: dict[tuple[Any, ...], list[int]] = {}
        for c in range(layout.size(d)):
            key = tuple(_local_shape(s, [layout.size(x) for x in s.mesh_dims],
                                     [c if x == d else 0 for x in s.mesh_dims])
                        for s in uneven if d in s.mesh_dims)
            classes.setdefault(key, []).append(c)
        per_dim.append([(cs[0], len(cs)) for cs in classes.values()])
    covered = math.prod(layout.size(d) for d in dims)
    others = world // covered if covered and world % covered == 0 else 1
    merged: dict[tuple[Any, ...], list[Any]] = {}
    for combo in itertools.product(*per_dim):
        flat = dict(zip(dims, (c for c, _ in combo), strict=True))
        count = math.prod(n for _, n in combo) * others
        key = tuple(_local_shape(s, [layout.size(x) for x in s.mesh_dims],
                                 [flat.get(x, 0) for x in s.mesh_dims]) for s in uneven)
        entry = merged.setdefault(key, [flat, 0])
        entry[1] += count
    out = []
    for flat, count in merged.values():
        rank = _rank_from_mesh_coords(layout, flat)
        out.append((rank, count, coordinates(layout, rank)))
    out.sort(key=lambda t: t[0])
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


# --------------------------------------------------------------------------- one traced step


@dataclass(frozen=True)
class BlockTrace:
    """Activations of one kept block, traced without checkpointing (bytes on rank 0)."""

    saved: int  # saved for backward by the block
    inputs: int  # its hidden-state input (what full checkpointing keeps of it)
    selective: int  # saved outputs of matmuls and attention (selective checkpointing keeps them)
    retained: int  # live growth across the block: what stays alive after it (≈ saved)
    transient: int  # live high-water mark during the block, above the live memory at its entry


@dataclass(frozen=True)
class StepTrace:
    """What one traced training step of the reduced model held and communicated.

    Live memory is tracked per tensor storage created during the forward (weights and
    the input ids excluded): `before` is what is live when the first block starts
    (embeddings, rotary tables), `after` the high-water mark from the last block's end
    through the loss, above the live memory at that point (final norm, logits, loss).
    """

    blocks: dict[int, BlockTrace]  # kept full-model layer → its activations
    before: int
    after: int
    outside: int  # saved for backward outside the blocks
    events: tuple[CommEvent, ...]
    seq_len: int  # tokens per rank per micro-batch (after the context-parallel split)
    micro_batch: int
    dtype: str


_SELECTIVE_OPS = ("aten.mm", "aten.addmm", "aten.bmm", "aten._scaled_dot_product")


def _storage(t: torch.Tensor) -> Any:
    return (t._local_tensor if isinstance(t, DTensor) else t).untyped_storage()


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    st = _storage(t)
    return st._cdata, st.nbytes()


class _LiveMemory:
    """Live bytes of the storages created by local ops while active (a dispatch mode
    below DTensor), with a resettable high-water mark; also notes which storages the ops
    selective checkpointing keeps produced."""

    def __init__(self, ignore: set[int]) -> None:
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode

        self.live = 0
        self.peak = 0
        self.paused = 0
        self.selective: set[int] = set()
        self._known: dict[int, Any] = {}
        tracker = self

        def forget(key: int, nbytes: int) -> Callable[[Any], None]:
            def callback(_: Any) -> None:
                tracker.live -= nbytes
                tracker._known.pop(key, None)

            return callback

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                if any(t is DTensor for t in types):
                    return NotImplemented
                out = func(*args, **(kwargs or {}))
                if tracker.paused:
                    return out
                keep = str(func).startswith(_SELECTIVE_OPS)
                for t in out if isinstance(out, tuple | list) else (out,):
                    if not isinstance(t, torch.Tensor):
                        continue
                    st = t.untyped_storage()
                    key = st._cdata
                    if keep:
                        tracker.selective.add(key)
                    if key in ignore or key in tracker._known:
                        continue
                    nbytes = st.nbytes()
                    tracker._known[key] = weakref.ref(st, forget(key, nbytes))
                    tracker.live += nbytes
                    tracker.peak = max(tracker.peak, tracker.live)
                return out

        self._mode = Mode()

    def reset_peak(self) -> int:
        self.peak = self.live
        return self.live

    def __enter__(self) -> _LiveMemory:
        # DTensor infers output shapes by running each op on fake tensors of the *global*
        # shape; those are not allocations of the step.
        from torch.distributed.tensor._sharding_prop import ShardingPropagator

        original = ShardingPropagator._propagate_tensor_meta_non_cached
        tracker = self

        def propagate(prop: Any, op_schema: Any) -> Any:
            tracker.paused += 1
            try:
                return original(prop, op_schema)
            finally:
                tracker.paused -= 1

        self._restore = original
        ShardingPropagator._propagate_tensor_meta_non_cached = propagate  # type: ignore[method-assign,assignment]
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        from torch.distributed.tensor._sharding_prop import ShardingPropagator

        self._mode.__exit__(*exc)
        ShardingPropagator._propagate_tensor_meta_non_cached = self._restore  # type: ignore[method-assign]


def register_dryrun_attention() -> str:
    """Register the dry run's attention with transformers (idempotent): the model's own
    SDPA call with no mask (causal, as a varlen/flash kernel runs it), so that no mask of
    the sequence length is built from a tensor whose data does not exist."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any) -> Any:
        kwargs.pop("is_causal", None)
        kwargs.pop("softcap", None)  # logit soft-capping (Gemma-2) costs no memory or traffic
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)

    def no_mask(*args: Any, **kwargs: Any) -> None:
        return None

    AttentionInterface.register(DRYRUN_ATTENTION, attention)
    AttentionMaskInterface.register(DRYRUN_ATTENTION, no_mask)
    return DRYRUN_ATTENTION


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _fake_model(source: ModelSource, reduction: Reduction, dtype: torch.dtype) -> nn.Module:
    import copy

    from meshplan.planner.models import reduced_config

    if source.config is None or source.model_class is None:
        raise ValueError(f"model {source.spec!r} has no transformers config: it cannot be traced "
                         "on fake tensors")
    config = (reduced_config(source.config, list(reduction.kept)) if reduction.reduced
              else copy.deepcopy(source.config))
    config.use_cache = False
    config._attn_implementation = register_dryrun_attention()
    with _default_dtype(dtype):
        return source.model_class(config)


def trace_step(program: Program, source: ModelSource, reduction: Reduction, *, seq_len: int,
               micro_batch: int, dtype: str, mesh: DeviceMesh | None = None) -> StepTrace:
    """Trace one forward/backward of the reduced model as rank 0 (see the module docstring).

    `program` is the full Program (for the mesh); the reduced Program's tensor-parallel
    and checkpointing steps are applied. `seq_len` is the sequence of one sample; with
    context parallelism each rank holds `seq_len / cp` of it.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..parallel.mesh import build_mesh
    from ..train.loss import causal_lm_loss, vocab_parallel
    from .comm import CommCounter, group_names

    compute = DTYPES[dtype]
    cp_steps = [s for s in program.steps if isinstance(s, ContextParallel)]
    cp = program.mesh.size(cp_steps[0].mesh_dim) if cp_steps else 1
    local_seq = max(1, seq_len // cp)
    tp_steps = tuple(s for s in reduction.program.steps if isinstance(s, Parallelize))
    ac_steps = tuple(s for s in reduction.program.steps if isinstance(s, Checkpoint))
    kept = reduction.kept if reduction.reduced else ()
    with contextlib.ExitStack() as world:
        if mesh is None:
            world.enter_context(fake_world(program.world_size, 0))
            mesh = build_mesh(program.mesh)
        names = group_names(mesh, program.mesh)
        with FakeTensorMode(allow_non_fake_inputs=True):
            model = _fake_model(source, reduction, compute)
            apply(dataclasses.replace(reduction.program, steps=tp_steps), model, mesh=mesh)
            ids = torch.zeros(micro_batch, local_seq, dtype=torch.long)
            positions = torch.arange(local_seq).expand(micro_batch, local_seq)
            ignore = {_storage_key(t)[0] for t in (*model.parameters(), *model.buffers(), ids, positions)}
            # 1. Forward without checkpointing: live memory and what autograd saves, per block.
            first = _forward_memory(model, reduction, ids, positions, ignore,
                                    loss=lambda logits: causal_lm_loss(logits, ids), context=vocab_parallel)
            # 2. The step as the Program runs it (checkpointing included): collectives.
            if ac_steps:
                apply(dataclasses.replace(reduction.program, steps=ac_steps), model, mesh=mesh)
            counter = CommCounter(names, reduction)
            stack = _stack_module(model, reduction)
            handles = counter.watch(stack or (), kept or range(len(stack or ())))
            try:
                with counter, vocab_parallel():
                    logits = model(input_ids=ids, position_ids=positions).logits
                    loss = causal_lm_loss(logits, ids)
                    loss.backward()
            finally:
                for h in handles:
                    h.remove()
            counter.grad_reductions(model)
    blocks = {(kept[j] if kept else j): b for j, b in first.blocks.items()}
    return dataclasses.replace(first, blocks=blocks, events=tuple(counter.events), seq_len=local_seq,
                               micro_batch=micro_batch, dtype=dtype)


def _forward_memory(model: nn.Module, reduction: Reduction, ids: torch.Tensor, positions: torch.Tensor,
                    ignore: set[int], *, loss: Callable[[Any], Any],
                    context: Callable[[], contextlib.AbstractContextManager[Any]]) -> StepTrace:
    live = _LiveMemory(ignore)
    saved: dict[int, int] = {}
    per_block: dict[int, dict[str, int]] = {}
    current: list[int | None] = [None]
    outside = 0
    edges: dict[str, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal outside
        key, nbytes = _storage_key(t)
        if key in ignore or key in saved:
            return t
        saved[key] = nbytes
        j = current[0]
        if j is None:
            outside += nbytes
        else:
            entry = per_block[j]
            entry["saved"] += nbytes
            if key in live.selective:
                entry["selective"] += nbytes
        return t

    def enter(j: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            current[0] = j
            first = args[0] if args else kwargs.get("hidden_states")
            entry = per_block.setdefault(j, {"saved": 0, "selective": 0, "inputs": 0})
            if isinstance(first, torch.Tensor):
                entry["inputs"] = _storage_key(first)[1]
            entry["entry"] = live.reset_peak()
            edges.setdefault("first", entry["entry"])

        return hook

    def leave(j: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            current[0] = None
            entry = per_block[j]
            entry["retained"] = live.live - entry["entry"]
            entry["transient"] = live.peak - entry["entry"]
            edges["last"] = live.reset_peak()

        return hook

    hooks = []
    for j, block in enumerate(_stack_module(model, reduction) or ()):
        hooks.append(block.register_forward_pre_hook(enter(j), with_kwargs=True))
        hooks.append(block.register_forward_hook(leave(j)))
    try:
        with live, context(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model(input_ids=ids, position_ids=positions).logits
            result = loss(logits)
            after = live.peak - edges.get("last", 0)
            if "first" not in edges:  # no stack: everything is outside the blocks
                after = live.peak
        del logits, result
    finally:
        for h in hooks:
            h.remove()
    blocks = {j: BlockTrace(saved=e["saved"], inputs=e["inputs"], selective=e["selective"],
                            retained=e.get("retained", 0), transient=e.get("transient", 0))
              for j, e in per_block.items()}
    return StepTrace(blocks=blocks, before=edges.get("first", 0), after=after, outside=outside,
                     events=(), seq_len=0, micro_batch=0, dtype="")


def _stack_module(model: nn.Module, reduction: Reduction) -> nn.ModuleList | None:
    if not reduction.stack:
        return None
    module = model.get_submodule(reduction.stack)
    return module if isinstance(module, nn.ModuleList) else None
