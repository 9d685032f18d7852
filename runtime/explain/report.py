"""`plan explain` as data: a dry run of a compiled Program at any world size.

    explain(compiled, seq_len=4096, micro_batch=1) -> Explanation

1. `reduce_program`: one decoder block per distinct (kind, steps); the rest of the
   model as is.
2. `measure_shards`: the reduced Program applied by `runtime.parallel.apply` on a meta model
   over a fake process group as rank 0 and as one rank of each class of ranks whose
   local shapes differ (uneven shards): placements, local shapes, padded storage.
3. `trace_step`: one forward/backward of the reduced model on fake tensors with the
   Program's tensor parallelism and checkpointing: activations and DTensor collectives.
4. Scaled to the full model by each kept block's layer count: memory per rank class
   (`runtime.explain.memory`) and communication per rank (`runtime.explain.comm`), plus warnings.

Nothing here allocates weights or talks to another process. `Explanation.to_json()` is
what `plan explain --json` prints.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from meshplan.dsl.errors import PlanError, PlanRejected
from meshplan.planner.program import ContextParallel, FullyShard, MeshLayout, Program

from ..parallel.mesh import product_dims
from .comm import (
    CommEvent,
    CommRow,
    Unit,
    compute_dtype,
    cp_events,
    fsdp_events,
    fsdp_units,
    summarize,
)
from .diagnostics import dry_run_error, findings
from .failure import TraceFailure
from .memory import BlockActivations, Memory, block_activations, buffer_bytes, memory_of
from .reduction import Reduction, reduce_program
from .shards import RankClass, measure_rank_zero, measure_shards
from .shards import _recompute as recompute_shard
from .trace import StepTrace, trace_step
from .world import coordinates, fake_world, rank_at

if TYPE_CHECKING:
    from meshplan.planner.compile import Compiled
    from meshplan.planner.graph import ModelGraph

__all__ = ["DimGroups", "Explanation", "ModuleRow", "attention_backend", "explain", "mesh_groups", "modules_json"]


# --------------------------------------------------------------------------- the mesh


@dataclass(frozen=True)
class DimGroups:
    """The groups of ranks that communicate along one dimension or submesh."""

    name: str
    size: int  # ranks per group
    count: int  # number of groups
    dims: tuple[str, ...]  # the product dimensions it spans
    strides: tuple[int, ...]  # rank stride of each of those dimensions
    first: tuple[tuple[int, ...], ...]  # the first groups (at most `limit`)
    described: str = ""  # the pattern, for groups that are no product of dimensions (experts)

    def group_of(self, layout: MeshLayout, rank: int) -> tuple[int, ...]:
        coords = coordinates(layout, rank)
        base = dict(coords)
        ranks = []
        for flat in range(self.size):
            for d in reversed(self.dims):
                n = layout.size(d)
                base[d] = flat % n
                flat //= n
            ranks.append(rank_at(layout, base))
        return tuple(ranks)

    def pattern(self, layout: MeshLayout) -> str:
        """`r + 2·dp_shard`: the ranks of a group, from its first rank r, as the
        coordinates along the group's dimensions run (dimensions of size 1 left out)."""
        if self.described:
            return self.described
        terms = [f"{stride}·{d}" if stride != 1 else d
                 for d, stride in zip(self.dims, self.strides, strict=True) if layout.size(d) > 1]
        return "r + " + " + ".join(terms) if terms else "r"


def mesh_groups(layout: MeshLayout, limit: int = 4) -> list[DimGroups]:
    """Every dimension and submesh: its groups of ranks (the first `limit`)."""
    names, shape = product_dims(layout)
    strides: dict[str, int] = {}
    acc = 1
    for name, size in reversed(list(zip(names, shape, strict=True))):
        strides[name] = acc
        acc *= size
    out = []
    entries = [(n, (n,)) for n in names] + [(n, tuple(d)) for n, d in layout.submeshes]
    for name, dims in entries:
        size = math.prod(layout.size(d) for d in dims)
        count = layout.world_size // size if size else 0
        groups: list[tuple[int, ...]] = []
        seen: set[int] = set()
        probe = DimGroups(name, size, count, dims, tuple(strides.get(d, 1) for d in dims), ())
        for rank in range(layout.world_size):
            if len(groups) >= limit:
                break
            if rank in seen:
                continue
            group = probe.group_of(layout, rank)
            seen.update(group)
            groups.append(group)
        out.append(DimGroups(name, size, count, dims, probe.strides, tuple(groups)))
    return out + expert_groups(layout, limit)


def expert_groups(layout: MeshLayout, limit: int = 4) -> list[DimGroups]:
    """The expert mesh (`runtime.parallel.experts.expert_mesh`): ep groups are runs of ep
    consecutive ranks of dp_shard × cp × tp; the experts' FSDP group (efsdp) is the
    complement, every ep-th rank of the same pool."""
    ep = layout.size("ep")
    pool = math.prod(layout.size(d) for d in ("dp_shard", "cp", "tp"))
    if ep <= 1 or pool % ep:
        return []
    world = layout.world_size
    ep_groups = [tuple(range(g * ep, (g + 1) * ep)) for g in range(min(limit, world // ep))]
    starts = [(b, j) for b in range(world // pool) for j in range(ep)][:limit]
    fsdp_groups = [tuple(range(b * pool + j, (b + 1) * pool, ep)) for b, j in starts]
    return [DimGroups("ep", ep, world // ep, ("ep",), (1,), tuple(ep_groups), "r + ep  (experts)"),
            DimGroups("efsdp", pool // ep, world // (pool // ep), ("ep",), (ep,), tuple(fsdp_groups),
                      f"r + {ep}·k  (experts' FSDP: dp_shard × cp × tp / ep)")]


# --------------------------------------------------------------------------- modules


@dataclass(frozen=True)
class ParamRow:
    name: str  # relative to its module row
    global_shape: tuple[int, ...]
    local_shape: tuple[int, ...]
    placements: tuple[str, ...]
    mesh_dims: tuple[str, ...]
    dtype: str
    storage_numel: int


@dataclass(frozen=True)
class ModuleRow:
    """A module holding parameters; repeated blocks collapsed (`model.layers.[0-78].mlp`).

    `block` is the collapsed block it lies in (`model.layers.[0-78]`, None outside the
    stack) and `rel` its name inside that block."""

    name: str
    layers: int  # how many layers the row stands for (1 outside the stack)
    params: tuple[ParamRow, ...]
    block: str | None = None
    rel: str = ""


def _ranges(layers: list[int]) -> str:
    parts = []
    start = prev = layers[0]
    for x in [*layers[1:], None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ",".join(parts)


def module_rows(graph: ModelGraph, reduction: Reduction, cls: RankClass) -> list[ModuleRow]:
    groups: dict[int, list[int]] = {}
    if reduction.reduced:
        for i, rep in enumerate(reduction.represents):
            groups.setdefault(rep, []).append(i)
    rows: list[ModuleRow] = []
    emitted: set[str] = set()
    aliases = {name for group in graph.tied for name in group[1:]}
    for fqn, info in graph.modules.items():
        if not info.params:
            continue
        layer = reduction.layer_of(fqn)
        name, count, block, rel = fqn, 1, None, fqn
        if layer is not None:
            members = groups[reduction.represents[layer]] if reduction.reduced else [layer]
            if layer != members[0]:
                continue
            rest = fqn[len(f"{reduction.stack}.{layer}"):]
            block = (f"{reduction.stack}.[{_ranges(members)}]" if len(members) > 1
                     else f"{reduction.stack}.{members[0]}")
            name, rel, count = block + rest, rest.lstrip(".") or "(block)", len(members)
        if name in emitted:
            continue
        emitted.add(name)
        params = []
        for pname in info.params:
            full = f"{fqn}.{pname}" if fqn else pname
            shard = cls.shards.get(reduction.representative(full))
            if shard is None:
                continue
            tied = f" (tied: {next(g[0] for g in graph.tied if full in g)})" if full in aliases else ""
            params.append(ParamRow(pname + tied, shard.global_shape, shard.local_shape, shard.placements,
                                   shard.mesh_dims, shard.dtype.replace("torch.", ""), shard.storage_numel))
        if params:
            rows.append(ModuleRow(name, count, tuple(params), block, rel))
    return rows


# --------------------------------------------------------------------------- explanation


@dataclass
class Explanation:
    program: Program
    graph: ModelGraph
    reduction: Reduction
    classes: list[RankClass]
    units: list[Unit]
    memory: list[Memory]
    blocks: list[BlockActivations]
    comm: list[CommRow]
    modules: list[ModuleRow]
    groups: list[DimGroups]
    seq_len: int
    micro_batch: int
    param_dtype: str
    compute_dtype: str
    gpu_memory: int | None = None
    trace: StepTrace | None = None
    events: list[CommEvent] = field(default_factory=list)
    diagnostics: list[PlanError] = field(default_factory=list)  # warnings W2xx on plan lines
    attention: dict[str, Any] | None = None

    @property
    def rank0(self) -> Memory:
        return self.memory[0]

    def class_of(self, rank: int) -> int | None:
        """The index (into `classes` and `memory`) of the class `rank` belongs to: the
        class whose local shapes are those rank 0's placements give at `rank`'s
        coordinates. None when the classes were cut off before it (`rank_classes`' limit)."""
        layout = self.program.mesh
        coords = coordinates(layout, rank)
        zero = self.classes[0].shards
        local = {k: recompute_shard(s, layout, coords).local_shape for k, s in zero.items()}
        for i, c in enumerate(self.classes):
            if all(c.shards[k].local_shape == shape for k, shape in local.items() if k in c.shards):
                return i
        return None

    def modules_of(self, index: int) -> list[ModuleRow]:
        """The module rows (placements, local shapes) of the class at `index`."""
        return self.modules if index == 0 else module_rows(self.graph, self.reduction, self.classes[index])

    def to_json(self) -> dict[str, Any]:
        mesh = self.program.mesh
        return {
            "plan": self.program.plan,
            "model": self.program.model,
            "architecture": self.graph.source.architecture,
            "world_size": self.program.world_size,
            "mesh": {
                "names": list(mesh.names),
                "shape": list(mesh.shape),
                "submeshes": {n: list(d) for n, d in mesh.submeshes},
                "groups": {g.name: {"size": g.size, "count": g.count, "dims": list(g.dims),
                                    "strides": list(g.strides), "first": [list(x) for x in g.first],
                                    "pattern": g.pattern(mesh)}
                           for g in self.groups},
            },
            "settings": {"seq_len": self.seq_len, "micro_batch": self.micro_batch,
                         "param_dtype": self.param_dtype, "compute_dtype": self.compute_dtype,
                         "gpu_memory_bytes": self.gpu_memory,
                         "reduced_layers": list(self.reduction.kept), "layers": self.reduction.length,
                         "attention": self.attention},
            "memory": {**self.rank0.to_json(),
                       "classes": [{**m.to_json(), "measured": c.measured}
                                   for m, c in zip(self.memory, self.classes, strict=True)]},
            "activations": {
                "outside_blocks_bytes": self.trace.outside if self.trace else None,
                "tokens_per_rank": self.trace.seq_len * self.micro_batch if self.trace else None,
                "seq_len": self.trace.seq_len if self.trace else None,
                "stack": self.reduction.stack,
                "blocks": [{"layers": _ranges(list(b.layers)), "count": len(b.layers),
                            "checkpoint": b.mode, "saved_bytes": b.saved, "kept_bytes": b.kept,
                            "kept_all_bytes": b.kept * len(b.layers)}
                           for b in self.blocks],
            },
            "communication": {
                "rows": [{"dim": r.dim, "source": r.kind, "op": r.op, "group_size": r.group_size,
                          "count": r.count, "bytes": r.bytes, "wire_bytes": r.wire_bytes,
                          "forward": r.forward, "backward": r.backward} for r in self.comm],
                "total_bytes": sum(r.bytes for r in self.comm),
                "total_wire_bytes": sum(r.wire_bytes for r in self.comm),
            },
            "units": [{"modules": u.label, "mesh": list(u.step.mesh_dims),
                       "reshard_after_forward": u.step.reshard_after_forward, "parameters": len(u.params)}
                      for u in self.units],
            "modules": modules_json(self.modules),
            "diagnostics": [d.to_json() for d in self.diagnostics],
        }


def modules_json(rows: list[ModuleRow]) -> list[dict[str, Any]]:
    """Module rows as `plan explain --json` prints them (rank 0's, and `--rank R`'s)."""
    return [{"name": m.name, "layers": m.layers,
             "params": [{"name": p.name, "global_shape": list(p.global_shape),
                         "local_shape": list(p.local_shape), "placements": list(p.placements),
                         "mesh_dims": list(p.mesh_dims), "dtype": p.dtype} for p in m.params]}
            for m in rows]


def plan_seq_len(plan: Any, overrides: Any = ()) -> int | None:
    """The training sequence length a plan declares: packing's, else a `seq_len` param."""
    from meshplan.dsl import load
    from meshplan.planner.mesh_facts import plan_seq_len as declared

    spec, _ = load(plan, overrides or ())
    found = declared(spec)
    return found[0] if found else None


def attention_backend() -> dict[str, Any] | None:
    """Which attention backend `plan run` would pick on a CUDA machine, what it is, and why
    the others would not run here. None when `meshplan.runtime.attention` offers no
    `select_backend`/`describe_backend` (the hook `plan explain` prints through)."""
    try:
        from ..attention import BACKENDS, describe_backend, select_backend
    except ImportError:
        return None
    try:
        name = select_backend("cuda", available=[b for b in BACKENDS if describe_backend(b, "cuda").available])
        info = describe_backend(name, "cuda")
        others = {b: describe_backend(b, "cuda").reason for b in BACKENDS if b != name}
    except Exception as exc:  # a broken optional GPU package must not stop explain
        return {"backend": None, "error": f"{type(exc).__name__}: {exc}"}
    return {"backend": name, "kernel": info.kernel, "format": info.preferred_format,
            "unavailable": {b: r for b, r in others.items() if r}}


def explain(compiled: Compiled, *, seq_len: int, micro_batch: int = 1, param_dtype: str = "fp32",
            gpu_memory: int | None = None, trace: bool = True, reduce: bool = True,
            progress: Callable[[str], None] | None = None) -> Explanation:
    """The dry run of `compiled.program` (see the module docstring). `reduce=False`
    measures the full model (slow for big models; the tests compare the two). `progress`
    hears each phase as it starts (the traced step alone can take a minute)."""
    say = progress or (lambda _: None)
    program, graph = compiled.program, compiled.graph
    if seq_len < 1 or micro_batch < 1:
        raise ValueError(f"seq_len and micro_batch must be ≥ 1, got {seq_len} and {micro_batch}")
    reduction = reduce_program(program, graph, reduce=reduce)
    fsdp = next(iter(program.steps_of(FullyShard)), None)
    compute = compute_dtype(fsdp, param_dtype)
    step: StepTrace | None = None
    try:
        # Rank 0's fake world serves both the shards and the traced step: one mesh to build.
        with fake_world(program.mesh, 0) as mesh:
            if trace:
                say(f"dry run: tracing one step ({_layers(reduction)}, {seq_len} tokens × {micro_batch})")
                step = trace_step(program, graph.source, reduction, seq_len=seq_len,
                                  micro_batch=micro_batch, dtype=compute, mesh=mesh)
            say("dry run: shards as rank 0")
            first = measure_rank_zero(program, graph.source, reduction, param_dtype=param_dtype, mesh=mesh)
        say("dry run: shards of each class of ranks (uneven shards differ)")
        classes = measure_shards(program, graph.source, reduction, param_dtype=param_dtype, first=first)
    except TraceFailure as failure:
        raise PlanRejected([dry_run_error(program, failure)]) from failure
    say("report: memory and communication per rank")
    shards = classes[0].shards
    units = fsdp_units(program, _unique_params(graph), reduction)
    events = list(step.events) if step else []
    events += fsdp_events(program, units, shards, reduction, param_dtype)
    if program.steps_of(ContextParallel):
        events += cp_events(program, graph, reduction, seq_len=seq_len, micro_batch=micro_batch, dtype=compute)
    blocks = block_activations(program, reduction, step) if step else []
    buffers = buffer_bytes(graph, classes[0].buffers, reduction)
    memory = [memory_of(c, program=program, graph=graph, reduction=reduction, units=units, trace=step,
                        blocks=blocks, storage=param_dtype, buffer_bytes=buffers) for c in classes]
    comm = summarize(events, reduction)
    return Explanation(
        program=program, graph=graph, reduction=reduction, classes=classes, units=units, memory=memory,
        blocks=blocks, comm=comm, modules=module_rows(graph, reduction, classes[0]),
        groups=mesh_groups(program.mesh), seq_len=seq_len, micro_batch=micro_batch,
        param_dtype=param_dtype, compute_dtype=compute, gpu_memory=gpu_memory, trace=step, events=events,
        diagnostics=findings(program, classes, reduction, units, comm, memory, gpu_memory),
        attention=attention_backend(),
    )


def _layers(reduction: Reduction) -> str:
    if not reduction.reduced:
        return "the whole model"
    return f"{len(reduction.kept)} of {reduction.length} layers"


def _unique_params(graph: ModelGraph) -> list[str]:
    aliases = {name for group in graph.tied for name in group[1:]}
    return [p for p in graph.parameters if p not in aliases]
