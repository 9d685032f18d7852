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

Under an Adapters step the model measured is the adapted one (frozen bases, adapter
parameters, NF4 base weights); `compare_adapters` explains the same plan as full
fine-tuning, LoRA and QLoRA (`adapter_variants`), for `plan explain --compare-adapters`.

Nothing here allocates weights or talks to another process. `Explanation.to_json()` is
what `plan explain --json` prints.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from meshplan.dsl.errors import PlanError, PlanRejected
from meshplan.planner.program import (
    Adapters,
    ContextParallel,
    FullyShard,
    MeshLayout,
    Parallelize,
    Program,
    Quantize,
)

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
from .experts import (
    ExpertFigures,
    dense_parameters,
    expert_events,
    expert_figures,
    expert_fsdp_events,
    expert_units,
)
from .failure import TraceFailure
from .memory import BlockActivations, Memory, block_activations, buffer_bytes, memory_of
from .reduction import Reduction, reduce_program
from .shards import ParamShard, RankClass, measure_rank_zero, measure_shards, model_parameters
from .shards import _recompute as recompute_shard
from .stages import PipelineFigures, pipeline_figures
from .trace import StepTrace, trace_step
from .world import coordinates, fake_world

if TYPE_CHECKING:
    from meshplan.planner.compile import Compiled
    from meshplan.planner.graph import ModelGraph

__all__ = ["ADAPTER_VARIANTS", "AdapterVariant", "DimGroups", "Explanation", "ModuleRow", "ParameterCounts",
           "adapter_variants", "attention_backend", "compare_adapters", "explain", "mesh_groups", "modules_json"]


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
        if self.described:
            return _expert_group(layout, self.name, rank)
        # From the group's first rank (coordinate 0 along its dimensions), by the strides:
        # 2048 ranks a group at 16384 ranks, so no coordinates → rank round trip each.
        coords = coordinates(layout, rank)
        start = rank - sum(coords.get(d, 0) * stride for d, stride in zip(self.dims, self.strides, strict=True))
        along = [(layout.size(d), stride) for d, stride in zip(self.dims, self.strides, strict=True)][::-1]
        ranks = []
        for flat in range(self.size):
            offset = 0
            for n, stride in along:
                offset += (flat % n) * stride
                flat //= n
            ranks.append(start + offset)
        return tuple(ranks)

    def pattern(self, layout: MeshLayout) -> str:
        """`r + 2·dp_shard`: the ranks of a group, from its first rank r, as the
        coordinates along the group's dimensions run (dimensions of size 1 left out)."""
        if self.described:
            return self.described
        terms = [f"{stride}·{d}" if stride != 1 else d
                 for d, stride in zip(self.dims, self.strides, strict=True) if layout.size(d) > 1]
        return "r + " + " + ".join(terms) if terms else "r"


def _expert_group(layout: MeshLayout, name: str, rank: int) -> tuple[int, ...]:
    """The ranks of `rank`'s ep or efsdp group (`expert_groups`)."""
    ep = layout.size("ep")
    pool = math.prod(layout.size(d) for d in ("dp_shard", "cp", "tp"))
    block, within = rank - rank % pool, rank % pool
    if name == "ep":
        return tuple(block + within - within % ep + j for j in range(ep))
    return tuple(block + within % ep + ep * i for i in range(pool // ep))


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
    dtype: str  # `nf4` for a 4-bit base weight
    storage_numel: int
    frozen: bool = False  # requires no gradient (an Adapters step froze it)


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


def _param_row(name: str, shard: ParamShard) -> ParamRow:
    return ParamRow(name, shard.global_shape, shard.local_shape, shard.placements, shard.mesh_dims,
                    shard.dtype_label, shard.storage_numel, frozen=not shard.requires_grad)


def _added_params(graph: ModelGraph, shards: dict[str, ParamShard]) -> dict[str, list[str]]:
    """Graph module → the parameters the Program added under it (an adapted module's
    `base_layer.weight`, `lora_A.default.weight`, …): those whose own module the traced,
    unadapted graph does not know as a module with parameters."""
    out: dict[str, list[str]] = {}
    for key in shards:
        module = key.rsplit(".", 1)[0] if "." in key else ""
        if module in graph.modules and graph.modules[module].params:
            continue
        owner = module
        while owner and not (owner in graph.modules and graph.modules[owner].params):
            owner = owner.rsplit(".", 1)[0] if "." in owner else ""
        if owner in graph.modules:
            out.setdefault(owner, []).append(key)
    return out


def module_rows(graph: ModelGraph, reduction: Reduction, cls: RankClass) -> list[ModuleRow]:
    added = _added_params(graph, cls.shards)
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
            params.append(_param_row(pname + tied, shard))
        prefix = f"{fqn}." if fqn else ""
        params += [_param_row(key[len(prefix):], cls.shards[key]) for key in added.get(fqn, ())]
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
    parameters: list[str] = field(default_factory=list)  # full-model names, as the Program leaves them
    variants: list[AdapterVariant] = field(default_factory=list)  # `compare_adapters`, when asked for
    pipeline: PipelineFigures | None = None  # per stage and pipeline rank, rank 0's class (`stages`)
    experts: ExpertFigures | None = None  # expert parallelism, rank 0's (`runtime.explain.experts`)

    @property
    def rank0(self) -> Memory:
        return self.memory[0]

    @property
    def adapted(self) -> bool:
        return bool(self.program.steps_of(Adapters))

    def parameter_counts(self) -> ParameterCounts:
        """Values of the whole model (global shapes): trainable, frozen, held in 4 bits."""
        trainable = frozen = nf4 = 0
        shards = self.classes[0].shards
        for fqn in self.parameters:
            shard = shards.get(self.reduction.representative(fqn))
            if shard is None:
                continue
            n = math.prod(shard.global_shape)
            if shard.requires_grad:
                trainable += n
            else:
                frozen += n
            if shard.quantize is not None:
                nf4 += n
        return ParameterCounts(trainable=trainable, frozen=frozen, nf4=nf4)

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

    def pipeline_of(self, index: int) -> PipelineFigures | None:
        """The pipeline's figures for the class at `index` (None without a pipeline)."""
        if self.pipeline is None or index == 0:
            return self.pipeline
        return pipeline_figures(self.program, self.classes[index], parameters=self.parameters,
                                reduction=self.reduction, units=self.units, trace=self.trace, blocks=self.blocks,
                                storage=self.param_dtype, buffer_bytes=self.rank0.buffers,
                                micro_batch=self.micro_batch)

    def experts_of(self, rank: int) -> ExpertFigures | None:
        """Expert parallelism's figures for `rank` (its experts' shards and its slice of
        the tokens); None without expert parallelism or beyond the measured classes."""
        if self.experts is None or rank == self.experts.rank:
            return self.experts
        index = self.class_of(rank)
        if index is None:
            return None
        return _expert_figures(self.program, self.graph, self.classes[index].shards, self.parameters,
                               self.reduction, rank=rank, tokens=self.experts.tokens,
                               rows_dtype=self.compute_dtype, storage=self.param_dtype)

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
            **({"adapters": {"parameters": self.parameter_counts().to_json()}} if self.adapted else {}),
            **({"pipeline": self.pipeline.to_json()} if self.pipeline is not None else {}),
            **({"experts": self.experts.to_json()} if self.experts is not None else {}),
        }


@dataclass(frozen=True)
class ParameterCounts:
    """How many values of the whole model train, stay frozen, and are held in NF4."""

    trainable: int
    frozen: int
    nf4: int

    def to_json(self) -> dict[str, int]:
        return {"trainable": self.trainable, "frozen": self.frozen, "nf4": self.nf4}


def modules_json(rows: list[ModuleRow]) -> list[dict[str, Any]]:
    """Module rows as `plan explain --json` prints them (rank 0's, and `--rank R`'s)."""
    return [{"name": m.name, "layers": m.layers,
             "params": [{"name": p.name, "global_shape": list(p.global_shape),
                         "local_shape": list(p.local_shape), "placements": list(p.placements),
                         "mesh_dims": list(p.mesh_dims), "dtype": p.dtype,
                         **({"frozen": True} if p.frozen else {})} for p in m.params]}
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
    # The model as the Program leaves it: an Adapters step renames and adds parameters.
    parameters = model_parameters(shards, reduction, graph.tied)
    # The experts' own FSDP units (over efsdp) hold their parameters, not the plan's units.
    dense_units = fsdp_units(program, dense_parameters(program, parameters), reduction)
    units = dense_units + expert_units(program, parameters, reduction, start=len(dense_units))
    events = list(step.events) if step else []
    events += fsdp_events(program, dense_units, shards, reduction, param_dtype)
    events += expert_fsdp_events(program, units[len(dense_units):], shards, reduction, param_dtype)
    experts = _expert_figures(program, graph, shards, parameters, reduction, rank=0,
                              tokens=(step.seq_len if step else _local_seq(program, seq_len)) * micro_batch,
                              rows_dtype=compute, storage=param_dtype)
    if experts is not None:
        events += expert_events(experts, program, reduction)
    if program.steps_of(ContextParallel):
        events += cp_events(program, graph, reduction, seq_len=seq_len, micro_batch=micro_batch, dtype=compute)
    blocks = block_activations(program, reduction, step) if step else []
    buffers = buffer_bytes(graph, classes[0].buffers, reduction)
    memory = [memory_of(c, program=program, parameters=parameters, reduction=reduction, units=units, trace=step,
                        blocks=blocks, storage=param_dtype, buffer_bytes=buffers) for c in classes]
    comm = summarize(events, reduction)
    pipeline = pipeline_figures(program, classes[0], parameters=parameters, reduction=reduction, units=units,
                                trace=step, blocks=blocks, storage=param_dtype, buffer_bytes=buffers,
                                micro_batch=micro_batch)
    return Explanation(
        program=program, graph=graph, reduction=reduction, classes=classes, units=units, memory=memory,
        blocks=blocks, comm=comm, modules=module_rows(graph, reduction, classes[0]),
        groups=mesh_groups(program.mesh), seq_len=seq_len, micro_batch=micro_batch,
        param_dtype=param_dtype, compute_dtype=compute, gpu_memory=gpu_memory, trace=step, events=events,
        diagnostics=findings(program, classes, reduction, units, comm, memory, gpu_memory),
        attention=attention_backend(), parameters=parameters, pipeline=pipeline, experts=experts,
    )


def _local_seq(program: Program, seq_len: int) -> int:
    """Tokens of one sequence on a rank: seq_len, split by context parallelism."""
    cp = program.steps_of(ContextParallel)
    return max(1, seq_len // program.mesh.size(cp[0].mesh_dim)) if cp else seq_len


def _expert_figures(program: Program, graph: ModelGraph, shards: dict[str, ParamShard], parameters: list[str],
                    reduction: Reduction, *, rank: int, tokens: int, rows_dtype: str,
                    storage: str) -> ExpertFigures | None:
    config = graph.source.config
    top_k = int(getattr(config, "num_experts_per_tok", 0) or 0) if config is not None else 0
    if top_k < 1:
        return None
    return expert_figures(program, shards, parameters, reduction, rank=rank, tokens=tokens, top_k=top_k,
                          rows_dtype=rows_dtype, storage=storage)


# --------------------------------------------------------------------------- adapters compared


ADAPTER_VARIANTS = ("full", "LoRA", "QLoRA")


def adapter_variants(program: Program) -> dict[str, Program]:
    """The Program as full fine-tuning (its Adapters step dropped: every parameter trains),
    as LoRA (the step without `quantize`) and as QLoRA (the step's `quantize`, else NF4
    with torchao's defaults). ValueError when it has no Adapters step (no targets to
    compare on)."""
    step = next(iter(program.steps_of(Adapters)), None)
    if step is None:
        raise ValueError("the plan has no adapters section: nothing to compare full fine-tuning with "
                         "(add `adapters { method = lora  rank = 16  alpha = 32  targets … }`)")

    def using(replacement: Adapters | None) -> Program:
        steps = tuple(replacement if s is step else s for s in program.steps)
        return dataclasses.replace(program, steps=tuple(s for s in steps if s is not None))

    return {"full": using(None), "LoRA": using(dataclasses.replace(step, quantize=None)),
            "QLoRA": using(dataclasses.replace(step, quantize=step.quantize or Quantize()))}


def _tensor_parallel_bases(program: Program) -> str | None:
    """Why the Program's NF4 bases cannot be applied as it places them: torchao's NF4
    tensor shards along dim 0 over FSDP only, so a base under a tensor-parallel style that
    places parameters (not one that only converts layouts) cannot be quantised. None if
    no such base."""
    from meshplan.dsl.styles import STYLES

    quantized = {f for step in program.steps_of(Adapters) if step.quantize is not None for f in step.fqns}
    placed: list[str] = []
    dims: set[str] = set()
    for step in program.steps_of(Parallelize):
        if program.mesh.size(step.mesh_dim) <= 1:
            continue
        for rel, call in step.plan:
            fqn = ".".join(p for p in (step.fqn, rel) if p)
            if fqn in quantized and not STYLES[call.style].conversions:
                placed.append(fqn)
                dims.add(f"{step.mesh_dim} = {program.mesh.size(step.mesh_dim)}")
    if not placed:
        return None
    return (f"NF4 bases shard over FSDP only, and the plan's tensor parallelism ({', '.join(sorted(dims))}) "
            f"places {len(placed)} adapted module{'s' if len(placed) != 1 else ''} ({placed[0]}, …)")


@dataclass(frozen=True)
class AdapterVariant:
    """One way of training the plan's model, as a dry run measures it (rank 0's class)."""

    name: str  # one of ADAPTER_VARIANTS
    current: bool  # the plan as written
    memory: Memory | None  # None: the dry run refused it (`error`)
    counts: ParameterCounts | None
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"variant": self.name, "this_plan": self.current,
                "memory": self.memory.to_json() if self.memory else None,
                "parameters": self.counts.to_json() if self.counts else None,
                **({"error": self.error} if self.error else {})}


def compare_adapters(compiled: Compiled, ex: Explanation, *, reduce: bool = True,
                     progress: Callable[[str], None] | None = None) -> list[AdapterVariant]:
    """Full fine-tuning, LoRA and QLoRA of `compiled` (`adapter_variants`), each a dry run
    of its own with `ex`'s settings; the plan's own variant is `ex` itself."""
    say = progress or (lambda _: None)
    step = next(iter(compiled.program.steps_of(Adapters)), None)
    mine = "QLoRA" if step is not None and step.quantize is not None else "LoRA"
    out: list[AdapterVariant] = []
    for name, program in adapter_variants(compiled.program).items():
        if name == mine:
            out.append(AdapterVariant(name, True, ex.rank0, ex.parameter_counts()))
            continue
        problem = _tensor_parallel_bases(program) if name == "QLoRA" else None
        if problem:
            out.append(AdapterVariant(name, False, None, None, error=problem))
            continue
        say(f"compare: {name}")
        try:
            other = explain(dataclasses.replace(compiled, program=program), seq_len=ex.seq_len,
                            micro_batch=ex.micro_batch, param_dtype=ex.param_dtype, gpu_memory=ex.gpu_memory,
                            trace=ex.trace is not None, reduce=reduce)
        except PlanRejected as e:
            reason = e.errors[0].message if e.errors else str(e)
            out.append(AdapterVariant(name, False, None, None, error=reason))
            continue
        out.append(AdapterVariant(name, False, other.rank0, other.parameter_counts()))
    return out


def _layers(reduction: Reduction) -> str:
    if not reduction.reduced:
        return "the whole model"
    return f"{len(reduction.kept)} of {reduction.length} layers"

