"""The compiler pipeline: plan + model + world size → Program, or every error.

    spec  = dsl.load(plan, overrides)          # language and model-free checks
    graph = graph.build_graph(model)           # meta-device model, traced once per block kind
    passes over (spec, graph, world size)      # the compiler's promises, one pass each
    program = lower(context)                   # ordered, typed steps with spans
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from meshplan.dsl import load
from meshplan.dsl.errors import PlanError, PlanRejected

from .passes.adapters import AdapterPlacement
from .passes.checkpoints import Checkpoints
from .passes.context import Context, Pass
from .passes.coverage import Coverage
from .passes.divisibility import Divisibility
from .passes.experts import ExpertPlacement
from .passes.fsdp import FsdpStructure
from .passes.layouts import Layouts
from .passes.mesh import MeshArithmetic
from .passes.patterns import ResolvePatterns
from .passes.pipeline import PipelineStages
from .passes.styles import StyleFit
from .program import Program

if TYPE_CHECKING:
    from torch import nn

    from .graph import ModelGraph

# In order: later passes rely on what earlier ones established (ctx.mesh, matches).
PASSES: tuple[type[Pass], ...] = (
    MeshArithmetic,
    Coverage,
    ResolvePatterns,
    StyleFit,
    Divisibility,
    AdapterPlacement,  # after the styles: reads each adapted module's rule and the FSDP units
    ExpertPlacement,
    PipelineStages,
    Layouts,
    Checkpoints,
    FsdpStructure,
)


@dataclass(frozen=True)
class Compiled:
    program: Program
    graph: ModelGraph
    warnings: tuple[PlanError, ...]


def compile_plan(plan: str | Path, model: str | nn.Module | ModelGraph, world_size: int,
                 overrides: Iterable[str] | None = None, *, check: bool = True) -> Compiled:
    """Compile, keeping the model graph and the warnings (what the CLI shows).

    `check=False` lowers the plan even when passes report errors (they come back as the
    `warnings`, errors included), so that a rejected plan can still be applied and its
    numerics measured (`tests/truth.py`). Errors that leave nothing to lower — the
    language's own, or a mesh that does not fit the world — still raise `PlanRejected`.
    """
    from .graph import ModelGraph, build_graph

    if world_size < 1:
        raise ValueError(f"world size must be ≥ 1, got {world_size}")
    spec, warnings = load(plan, overrides or ())
    graph = model if isinstance(model, ModelGraph) else build_graph(model)
    ctx = Context(spec=spec, graph=graph, world_size=world_size)
    arch = graph.source.architecture
    if spec.archs and arch and arch not in spec.archs:
        ctx.warn(spec.header_span, "W103", f"plan `{spec.name}` is written for {', '.join(spec.archs)}; "
                 f"the model is {arch}")
    for pass_type in PASSES:
        pass_type().apply(ctx)
    if ctx.failed and (check or ctx.mesh is None):
        raise PlanRejected([*warnings, *ctx.diagnostics])
    from .lower import lower

    return Compiled(lower(ctx), graph, (*warnings, *ctx.diagnostics))


def compile(plan: str | Path, model: str | nn.Module, world_size: int,
            overrides: Iterable[str] | None = None) -> Program:
    """`meshplan.planner.compile(plan, model, world_size, overrides)` → Program.

    `plan` is a path or plan text; `model` a preset name, a Hugging Face directory, a
    `package.module:factory` spec (which runs that code) or an `nn.Module`. Raises
    `PlanRejected` carrying every diagnostic, or `ModelSpecError` for a model that
    cannot be resolved.
    """
    return compile_plan(plan, model, world_size, overrides).program
