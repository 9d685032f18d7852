"""What passes share: the inputs, the facts passes establish, and the diagnostics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from meshplan.dsl.errors import PlanError, Span
from meshplan.dsl.spec import CheckpointSpec, PatternSpec, PlanSpec, TPRuleSpec, UnitSpec

from ..mesh_facts import MeshFacts, plan_seq_len
from ..program import MeshLayout, Pipeline

if TYPE_CHECKING:
    from ..graph import ModelGraph


@dataclass(frozen=True)
class ResolvedUnit:
    """One FSDP unit after pattern resolution: the modules of one `fully_shard` call."""

    fqns: tuple[str, ...]  # () for the root
    spec: UnitSpec


@dataclass
class Context:
    spec: PlanSpec
    graph: ModelGraph
    world_size: int
    diagnostics: list[PlanError] = field(default_factory=list)
    # Established by passes, in pass order:
    mesh: MeshLayout | None = None                                # mesh
    tp_rules: dict[str, TPRuleSpec] = field(default_factory=dict)  # patterns: fqn → its rule
    checkpoints: dict[str, CheckpointSpec] = field(default_factory=dict)
    cp_modules: dict[str, PatternSpec] = field(default_factory=dict)
    ep_modules: dict[str, PatternSpec] = field(default_factory=dict)
    units: list[ResolvedUnit] = field(default_factory=list)
    adapters: dict[str, PatternSpec] = field(default_factory=dict)  # adapters: fqn → its targets pattern
    pipeline: Pipeline | None = None                               # pipeline: the stage cut

    def error(self, span: Span, code: str, message: str, hint: str | None = None,
              related: tuple[tuple[Span, str], ...] = ()) -> None:
        self.diagnostics.append(PlanError(span, code, message, hint, related=related))

    def warn(self, span: Span, code: str, message: str, hint: str | None = None) -> None:
        self.diagnostics.append(PlanError(span, code, message, hint, severity="warning"))

    @property
    def failed(self) -> bool:
        return any(d.severity == "error" for d in self.diagnostics)

    def size(self, name: str) -> int:
        """Size of a mesh dimension or submesh; 1 if the mesh is unknown or lacks it."""
        return self.mesh.size(name) if self.mesh else 1

    @property
    def facts(self) -> MeshFacts | None:
        """What the mesh implies (`planner.mesh_facts`); None until the mesh pass ran."""
        return MeshFacts(self.mesh) if self.mesh is not None else None

    @property
    def seq_len(self) -> tuple[int, Span] | None:
        """The training sequence length: packing's, else a `seq_len` param."""
        return plan_seq_len(self.spec)


class Pass(Protocol):
    name: str

    def apply(self, ctx: Context) -> None: ...
