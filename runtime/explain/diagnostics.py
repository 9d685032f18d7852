"""What the dry run finds, as coded diagnostics on the plan lines responsible.

Warnings (the plan runs, but probably not as meant), each on the span of the Program
step that causes it:

- W201 uneven shards: a parameter's shards differ in size across ranks (FSDP2 pads
  every shard to the first one's size); on the `fully_shard` unit managing the
  parameter when its shard group splits it unevenly, else on the tensor-parallel step.
- W202 idle ranks: some ranks hold no element of a parameter, yet store the padded
  shard and join its collectives.
- W203 a collective over a dimension of size 1 (e.g. HSDP's replicate all-reduce over
  `dp_replicate = 1`); on the first step issuing it.
- W204 a rank class's estimated peak exceeds `--gpu-memory`; on the first `fully_shard`
  step (the line deciding how parameters, gradients and optimizer states are sharded).
- W205 what the per-stage pipeline figures (`runtime.explain.stages`) leave out: the
  weight gradients zero-bubble schedules defer (their inputs outlive the activations
  counted), context-parallel traffic (not split by stage); on the `pipeline` line.

Errors: E601, a model that fails while the dry run applies or traces it
(`runtime.explain.failure.TraceFailure`), on the step that touched the failing module,
naming the module and the line of the model's source that raised.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from meshplan.dsl.errors import NOWHERE, PlanError, Span
from meshplan.planner.program import ContextParallel, FullyShard, Parallelize, Program, Step

from .comm import KIND_LABELS, CommRow, Unit
from .failure import TraceFailure, touching_step
from .memory import Memory
from .reduction import Reduction
from .shards import ParamShard, RankClass, uneven
from .sizes import human_bytes

__all__ = ["as_json", "dry_run_error", "findings"]

_SHOWN = 3  # parameters named per diagnostic


def _span(step: Step | None, program: Program) -> Span:
    if step is not None and step.span.line > 0:
        return step.span
    return Span.point(program.source, 0, 0) if program.source else NOWHERE


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _more(items: Sequence[str], noun: str) -> str:
    shown = "; ".join(items[:_SHOWN])
    rest = len(items) - _SHOWN
    return shown + (f"; and {rest} more {noun}{'s' if rest != 1 else ''}" if rest > 0 else "")


# --------------------------------------------------------------------------- uneven shards


@dataclass(frozen=True)
class _Uneven:
    pattern: str  # `model.layers.*.mlp.up_proj.weight` (layers folded)
    shard: ParamShard  # rank 0's
    sizes: tuple[tuple[tuple[int, ...], int], ...]  # (local shape, ranks), largest first
    step: Step | None  # the step whose split is uneven


def _uneven_params(program: Program, classes: list[RankClass], reduction: Reduction,
                   units: list[Unit]) -> list[_Uneven]:
    unit_of = {fqn: u for u in units for fqn in u.params}
    out: dict[str, _Uneven] = {}
    for fqn, base in classes[0].shards.items():
        sizes: dict[tuple[int, ...], int] = {}
        for cls in classes:
            shape = cls.shards[fqn].local_shape
            sizes[shape] = sizes.get(shape, 0) + cls.count
        if len(sizes) < 2:
            continue
        found = reduction.split(fqn)
        pattern = f"{reduction.stack}.*.{found[1]}" if found else fqn
        ordered = tuple(sorted(sizes.items(), key=lambda kv: -math.prod(kv[0])))
        out[pattern] = _Uneven(pattern, base, ordered, _culprit(program, base, unit_of.get(fqn)))
    return list(out.values())


def _culprit(program: Program, shard: ParamShard, unit: Unit | None) -> Step | None:
    """The FSDP unit when its shard group splits the parameter unevenly, else the step
    that shards the module over the other dimensions (tensor parallel)."""
    others = tuple(d for d in shard.mesh_dims if d != shard.fsdp_dim)
    if unit is not None and shard.fsdp_dim and not uneven(shard, program.mesh, others):
        return unit.step
    step = touching_step(program, shard.fqn.rsplit(".", 1)[0] if "." in shard.fqn else "")
    if isinstance(step, Parallelize) or unit is None:
        return step
    return unit.step


def _by_step(items: Iterable[_Uneven]) -> dict[Span | None, tuple[Step | None, list[_Uneven]]]:
    """Parameters grouped by the plan line of their step (one unit line: one diagnostic)."""
    groups: dict[Span | None, tuple[Step | None, list[_Uneven]]] = {}
    for item in items:
        key = item.step.span if item.step is not None else None
        groups.setdefault(key, (item.step, []))[1].append(item)
    return groups


def _uneven_diagnostics(program: Program, params: list[_Uneven]) -> list[PlanError]:
    out: list[PlanError] = []
    for step, items in _by_step(params).values():
        lines = []
        for p in items:
            parts = [f"{list(shape)} on {_plural(n, 'rank')}" for shape, n in p.sizes]
            lines.append(f"{p.pattern} {list(p.shard.global_shape)} is {', '.join(parts)}")
        fsdp = isinstance(step, FullyShard)
        over = f"`{step.mesh_dims[-1]}`" if isinstance(step, FullyShard) else (
            f"`{step.mesh_dim}`" if isinstance(step, Parallelize) else "its mesh")
        hint = ("FSDP pads every shard to the largest, so every rank stores and communicates the padding; "
                if fsdp else "") + f"a size of {over} that divides these dimensions splits them evenly"
        out.append(PlanError(_span(step, program), "W201", "uneven shards: " + _more(lines, "parameter"),
                             hint=hint, severity="warning"))
    return out


def _idle_diagnostics(program: Program, params: list[_Uneven]) -> list[PlanError]:
    out: list[PlanError] = []
    idle = [p for p in params if any(math.prod(shape) == 0 for shape, _ in p.sizes)]
    for step, items in _by_step(idle).values():
        names = [f"{p.pattern} ({_plural(sum(n for s, n in p.sizes if math.prod(s) == 0), 'rank')})"
                 for p in items]
        out.append(PlanError(
            _span(step, program), "W202",
            f"idle ranks: some ranks hold no element of {_more(names, 'parameter')}, yet store the padded "
            "shard and join the collectives",
            hint="shard these parameters over fewer ranks than their sharded dimension has rows",
            severity="warning"))
    return out


# --------------------------------------------------------------------------- collectives, memory


def _issuer(program: Program, dim: str, kind: str) -> Step | None:
    """The first step issuing a collective of `kind` over `dim`."""
    steps: Sequence[Step]
    if kind in ("fsdp", "hsdp"):
        steps = [s for s in program.steps_of(FullyShard) if dim in s.mesh_dims]
    elif kind == "cp":
        steps = [s for s in program.steps_of(ContextParallel) if s.mesh_dim == dim]
    else:
        steps = [s for s in program.steps_of(Parallelize) if s.mesh_dim == dim]
    return steps[0] if steps else None


def _single_rank_diagnostics(program: Program, rows: list[CommRow]) -> list[PlanError]:
    out: list[PlanError] = []
    for dim, op, kind in sorted({(r.dim, r.op, r.kind) for r in rows if r.group_size == 1}):
        name = op.replace("_", "-")
        per = "FSDP unit" if kind in ("fsdp", "hsdp") else "call"
        hint = (f"a 1-D FSDP mesh (`fully_shard on` without `{dim}`) issues no replicate all-reduce"
                if kind == "hsdp" else f"drop `{dim}` from the section's `on`")
        out.append(PlanError(
            _span(_issuer(program, dim, kind), program), "W203",
            f"`{dim}` has size 1 but still runs {'an' if name[0] in 'aeiou' else 'a'} {name} per {per} "
            f"({KIND_LABELS.get(kind, kind)})", hint=hint, severity="warning"))
    return out


# Each part of a rank's memory, and what lowers it.
_PARTS = (
    ("parameters", "parameters", "shard them over more ranks or store them in bf16 (--param-dtype)"),
    ("gradients", "gradients", "shard the parameters over more ranks or store them in bf16 (--param-dtype)"),
    ("optimizer", "optimizer states", "shard the parameters over more ranks or store them in bf16 "
                                      "(--param-dtype)"),
    ("activations", "activations", "checkpoint more blocks, lower --micro-batch, or split the sequence "
                                   "(sequence or context parallel)"),
    ("fsdp_buffers", "FSDP buffers", "use smaller FSDP units, or reshard more of them after forward"),
    ("temporaries", "backward temporaries", "lower --micro-batch, or split the sequence (sequence or context "
                                            "parallel)"),
    ("buffers", "buffers", "buffers are not sharded"),
)


def _memory_diagnostics(program: Program, memory: list[Memory], budget: int | None) -> list[PlanError]:
    if budget is None:
        return []
    fsdp = program.steps_of(FullyShard)
    span = _span(fsdp[0] if fsdp else (program.steps[0] if program.steps else None), program)
    out = []
    for m in memory:
        if m.peak <= budget:
            continue
        part, label, remedy = max(_PARTS, key=lambda p: int(getattr(m, p[0])))
        out.append(PlanError(
            span, "W204",
            f"rank {m.rank} ({_plural(m.count, 'rank')}): estimated peak {human_bytes(m.peak)} exceeds "
            f"--gpu-memory {human_bytes(budget)}",
            hint=f"the largest part is {label} ({human_bytes(int(getattr(m, part)))}): {remedy}",
            severity="warning"))
    return out


def _pipeline_diagnostics(program: Program) -> list[PlanError]:
    """W205 for what the per-stage figures (`runtime.explain.stages`) leave out."""
    from meshplan.planner.program import Pipeline

    out = []
    cp = [s for s in program.steps_of(ContextParallel) if program.mesh.size(s.mesh_dim) > 1]
    for step in program.steps_of(Pipeline):
        if program.mesh.size(step.mesh_dim) <= 1:
            continue
        missing, hints = [], []
        if step.schedule in ("interleaved_zero_bubble", "zbv"):
            missing.append(f"{step.schedule} defers each microbatch's weight gradients, whose inputs stay alive "
                           "longer than the activations counted (freed at the input gradients)")
            hints.append("read the stages' activations as a lower bound")
        if cp:
            missing.append("the context-parallel traffic is that of a rank holding every stage, for one microbatch "
                           "(not split by stage)")
            hints.append("scale it by a stage's share of the layers and by the microbatches")
        if missing:
            out.append(PlanError(step.span, "W205", "pipeline figures not modelled by the dry run: "
                                 + "; ".join(missing), "; ".join(hints), severity="warning"))
    return out


def findings(program: Program, classes: list[RankClass], reduction: Reduction, units: list[Unit],
             rows: list[CommRow], memory: list[Memory], budget: int | None) -> list[PlanError]:
    """Every warning of the dry run, sorted by plan line (see the module docstring)."""
    params = _uneven_params(program, classes, reduction, units)
    out = (_uneven_diagnostics(program, params) + _idle_diagnostics(program, params)
           + _single_rank_diagnostics(program, rows) + _memory_diagnostics(program, memory, budget)
           + _pipeline_diagnostics(program))
    return sorted(out, key=PlanError.sort_key)


# --------------------------------------------------------------------------- errors


def dry_run_error(program: Program, failure: TraceFailure) -> PlanError:
    """E601 for a model that failed in the dry run, on the step touching the module."""
    step = failure.step or touching_step(program, failure.module)
    module = f"`{failure.module}`" if failure.module else "the model"
    where = f", {failure.source}" if failure.source else ""
    related: tuple[tuple[Span, str], ...] = ()
    if failure.source is not None:
        src = failure.source
        related = ((Span(src.file, src.line, 1, src.line, 2), f"raised in `{src.text}`" if src.text
                    else "raised here"),)
    what = step.kind.replace("_", " ") if step is not None else "the plan"
    return PlanError(
        _span(step, program), "E601",
        f"the dry run failed in {module} ({failure.phase}{where}): {failure.error}",
        hint=f"the dry run runs the model on fake tensors with this line's {what} applied; "
             "`--debug` shows the traceback",
        related=related)


def as_json(diagnostics: Iterable[PlanError]) -> list[dict[str, Any]]:
    return [d.to_json() for d in sorted(diagnostics, key=PlanError.sort_key)]
