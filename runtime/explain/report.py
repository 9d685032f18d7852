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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from meshplan.planner.program import ContextParallel, FullyShard, MeshLayout, Program

from ..parallel.mesh import build_mesh
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
from .dryrun import (
    RankClass,
    Reduction,
    StepTrace,
    coordinates,
    fake_world,
    measure_rank_zero,
    measure_shards,
    rank_at,
    reduce_program,
    trace_step,
)
from .memory import BlockActivations, Memory, block_activations, buffer_bytes, memory_of

if TYPE_CHECKING:
    from meshplan.planner.compile import Compiled
    from meshplan.planner.graph import ModelGraph

__all__ = ["DimGroups", "Explanation", "ModuleRow", "attention_backend", "explain", "mesh_groups"]


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
        terms = [f"{stride}·{d}" if stride != 1 else d
                 for d, stride in zip(self.dims, self.strides, strict=True) if layout.size(d) > 1]
        return "r + " + " + ".join(terms) if terms else "r"


def mesh_groups(layout: MeshLayout, limit: int = 4) -> list[DimGroups]:
    """Every dimension and submesh: its groups of ranks (the first `limit`)."""
    from ..parallel.mesh import product_dims

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
    return out


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
    trace_error: str | None = None
    events: list[CommEvent] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    attention: dict[str, Any] | None = None

    @property
    def rank0(self) -> Memory:
        return self.memory[0]

    def to_json(self) -> dict[str, Any]:
        mesh = self.program.mesh
        return {
            "plan": self.program.plan,
            "model": self.program.model,
            "world_size": self.program.world_size,
            "mesh": {
                "names": list(mesh.names),
                "shape": list(mesh.shape),
                "submeshes": {n: list(d) for n, d in mesh.submeshes},
                "groups": {g.name: {"size": g.size, "count": g.count, "dims": list(g.dims),
                                    "strides": list(g.strides), "first": [list(x) for x in g.first]}
                           for g in self.groups},
            },
            "settings": {"seq_len": self.seq_len, "micro_batch": self.micro_batch,
                         "param_dtype": self.param_dtype, "compute_dtype": self.compute_dtype,
                         "gpu_memory_bytes": self.gpu_memory,
                         "reduced_layers": list(self.reduction.kept), "attention": self.attention},
            "memory": {**self.rank0.to_json(), "classes": [m.to_json() for m in self.memory]},
            "activations": {
                "outside_blocks_bytes": self.trace.outside if self.trace else None,
                "tokens_per_rank": self.trace.seq_len * self.micro_batch if self.trace else None,
                "blocks": [{"layers": _ranges(list(b.layers)), "count": len(b.layers),
                            "checkpoint": b.mode, "saved_bytes": b.saved, "kept_bytes": b.kept}
                           for b in self.blocks],
                "error": self.trace_error,
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
            "modules": [{"name": m.name, "layers": m.layers,
                         "params": [{"name": p.name, "global_shape": list(p.global_shape),
                                     "local_shape": list(p.local_shape), "placements": list(p.placements),
                                     "mesh_dims": list(p.mesh_dims), "dtype": p.dtype} for p in m.params]}
                        for m in self.modules],
            "warnings": list(self.warnings),
        }


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
            gpu_memory: int | None = None, trace: bool = True, reduce: bool = True) -> Explanation:
    """The dry run of `compiled.program` (see the module docstring). `reduce=False`
    measures the full model (slow for big models; the tests compare the two)."""
    program, graph = compiled.program, compiled.graph
    if seq_len < 1 or micro_batch < 1:
        raise ValueError(f"seq_len and micro_batch must be ≥ 1, got {seq_len} and {micro_batch}")
    reduction = reduce_program(program, graph, reduce=reduce)
    fsdp = next(iter(program.steps_of(FullyShard)), None)
    compute = compute_dtype(fsdp, param_dtype)
    step: StepTrace | None = None
    error: str | None = None
    # Rank 0's fake world serves both the shards and the traced step: one mesh to build.
    with fake_world(program.world_size, 0):
        mesh = build_mesh(program.mesh)
        if trace:
            try:
                step = trace_step(program, graph.source, reduction, seq_len=seq_len,
                                  micro_batch=micro_batch, dtype=compute, mesh=mesh)
            except Exception as exc:  # a model the fake trace cannot run: say so, keep the rest
                error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
        first = measure_rank_zero(program, graph.source, reduction, param_dtype=param_dtype, mesh=mesh)
    classes = measure_shards(program, graph.source, reduction, param_dtype=param_dtype, first=first)
    shards = classes[0].shards
    units = fsdp_units(program, _unique_params(graph), reduction)
    events = list(step.events) if step else []
    events += fsdp_events(program, units, shards, reduction, param_dtype)
    cp = next(iter(program.steps_of(ContextParallel)), None)
    if cp is not None:
        events += cp_events(program, graph, reduction, seq_len=seq_len, micro_batch=micro_batch, dtype=compute)
    blocks = block_activations(program, reduction, step) if step else []
    buffers = buffer_bytes(graph, classes[0].buffers, reduction)
    memory = [memory_of(c, program=program, graph=graph, reduction=reduction, units=units, trace=step,
                        blocks=blocks, storage=param_dtype, buffer_bytes=buffers) for c in classes]
    out = Explanation(
        program=program, graph=graph, reduction=reduction, classes=classes, units=units, memory=memory,
        blocks=blocks, comm=summarize(events, reduction), modules=module_rows(graph, reduction, classes[0]),
        groups=mesh_groups(program.mesh), seq_len=seq_len, micro_batch=micro_batch,
        param_dtype=param_dtype, compute_dtype=compute, gpu_memory=gpu_memory, trace=step,
        trace_error=error, events=events, attention=attention_backend(),
    )
    out.warnings = _warnings(out)
    return out


def _unique_params(graph: ModelGraph) -> list[str]:
    aliases = {name for group in graph.tied for name in group[1:]}
    return [p for p in graph.parameters if p not in aliases]


# --------------------------------------------------------------------------- warnings


def _warnings(ex: Explanation) -> list[str]:
    out: list[str] = []
    first = ex.classes[0].shards
    # Uneven shards and idle ranks, one line per parameter pattern (layers folded).
    patterns: dict[str, dict[str, Any]] = {}
    for fqn, base in first.items():
        sizes: dict[tuple[int, ...], int] = {}
        for cls in ex.classes:
            shape = cls.shards[fqn].local_shape
            sizes[shape] = sizes.get(shape, 0) + cls.count
        if len(sizes) < 2:
            continue
        found = ex.reduction.split(fqn)
        pattern = f"{ex.reduction.stack}.*.{found[1]}" if found else fqn
        entry = patterns.setdefault(pattern, {"global": base.global_shape, "sizes": sizes})
        entry["sizes"] = sizes
    lines: list[str] = []
    idle: list[tuple[str, int]] = []
    for pattern, entry in patterns.items():
        ordered = sorted(entry["sizes"].items(), key=lambda kv: -math.prod(kv[0]))
        parts = [f"{list(shape)} on {n} rank{'s' if n != 1 else ''}" for shape, n in ordered]
        lines.append(f"{pattern} {list(entry['global'])} is {', '.join(parts)}")
        empty = sum(n for shape, n in ordered if math.prod(shape) == 0)
        if empty:
            idle.append((pattern, empty))
    if lines:
        more = f"; and {len(lines) - 3} more parameters" if len(lines) > 3 else ""
        out.append("uneven shards: " + "; ".join(lines[:3]) + more + " (FSDP pads every shard to the largest)")
    if idle:
        names = ", ".join(f"{p} ({n} ranks)" for p, n in idle[:3])
        more = f" and {len(idle) - 3} more" if len(idle) > 3 else ""
        out.append(f"idle ranks: some ranks hold no element of {names}{more}, yet store the padded "
                   "shard and join the collectives")
    # Collectives over a single rank.
    single = sorted({(r.dim, r.op, r.kind) for r in ex.comm if r.group_size == 1})
    for dim, op, kind in single:
        name = op.replace("_", "-")
        out.append(f"`{dim}` has size 1 but still runs {'an' if name[0] in 'aeiou' else 'a'} {name} per "
                   f"{'FSDP unit' if kind in ('fsdp', 'hsdp') else 'call'} ({_kind(kind)}): "
                   f"use a 1-D FSDP mesh or drop the dimension")
    if ex.gpu_memory is not None:
        for m in ex.memory:
            if m.peak > ex.gpu_memory:
                out.append(f"rank {m.rank} ({m.count} rank{'s' if m.count != 1 else ''}): estimated peak "
                           f"{human_bytes(m.peak)} exceeds --gpu-memory {human_bytes(ex.gpu_memory)}")
    if ex.trace_error:
        out.append(f"activations and tensor-parallel communication could not be traced: {ex.trace_error}")
    if any(not c.measured for c in ex.classes):
        n = sum(not c.measured for c in ex.classes)
        out.append(f"{n} rank class{'es' if n != 1 else ''} computed from placements, not applied")
    return out


def _kind(kind: str) -> str:
    from .comm import KIND_LABELS

    return KIND_LABELS.get(kind, kind)


def human_bytes(n: float) -> str:
    """1536 → `1.5 KiB`; exact below 1 KiB."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if n < 100 else f"{n:.0f} {unit}"
    return f"{n:.0f} PiB"  # pragma: no cover


def parse_bytes(text: str) -> int:
    """`80GB`, `80 GiB`, `81920MB`, `1e9` → bytes (GB and GiB both mean 2**30)."""
    import re

    units = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
             "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if match is None or match.group(2) not in units:
        raise ValueError(f"not a size: {text!r} (e.g. 80GB)")
    value = float(match.group(1)) * units[match.group(2)]
    if value <= 0:
        raise ValueError(f"not a positive size: {text!r}")
    return int(value)
