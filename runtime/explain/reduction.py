"""Reducing a Program to one decoder block per kind, and how that block stands for the rest.

A 126-layer model whose layers are alike costs what a two-layer one does: the layers
of the model's decoder stack are grouped by (block kind, steps the Program applies to
the block, with the block's own name factored out), one layer of each group is kept,
and every figure measured on a kept block is scaled by the number of layers it stands
for. `Reduction` maps every layer of the full model to its kept block, and full-model
names to reduced-model names and back; `build_reduced_model` builds the meta model it
measures.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from meshplan.planner.program import Program

if TYPE_CHECKING:
    from meshplan.planner.graph import ModelGraph, Stack
    from meshplan.planner.models import ModelSource


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


def inside(fqn: str, ancestor: str) -> bool:
    return ancestor == "" or fqn == ancestor or fqn.startswith(ancestor + ".")


def _layer_signature(program: Program, block: str, steps: Iterable[int]) -> tuple[Any, ...]:
    """What the Program does to one block, with the block's own name factored out.
    `steps`: the indices of the steps naming a module inside the block (no other step
    has a signature there), in order."""
    return tuple(sig for index in steps if (sig := program.steps[index].signature(block, index)) is not None)


def _steps_by_layer(program: Program, stack: str) -> dict[int, list[int]]:
    """Layer → the indices of the steps naming a module inside it (`stack.i` or below).
    One pass over the steps: a Program has a unit step per layer, so asking every step
    for every layer is quadratic (16k signatures for the 126 layers of Llama-3.1-405B)."""
    prefix = stack + "."
    found: dict[int, list[int]] = {}
    for index, step in enumerate(program.steps):
        layers = {int(head) for f in step.modules() if f.startswith(prefix)
                  if (head := f[len(prefix):].partition(".")[0]).isdigit()}
        for i in layers:
            found.setdefault(i, []).append(index)
    return found


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
    touching = _steps_by_layer(program, stack.fqn) if reduce else {}
    for i in range(stack.length):
        key = (stack.kind_of(i).name, _layer_signature(program, stack.block(i), touching.get(i, ()))) \
            if reduce else i
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

    steps = [r for r in (step.renamed(rename) for step in program.steps) if r is not None]
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
