"""Abstract layouts of activations along the tensor-parallel dimension.

Every traced value gets a `Layout`: replicated, sharded on one tensor dimension,
partial (a sum still to be reduced), or unknown; and whether it is a DTensor (which
knows its own layout, so torch redistributes it correctly) or a plain local tensor
(which does not — the case where plans go silently wrong, because ParallelStyles hand
plain tensors to the code between planned modules). What each ATen op does to layouts
is in `planner.ops`; the walk over the traced graph is `planner.passes.layouts`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from meshplan.dsl.errors import Span

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Layout:
    kind: Literal["replicate", "shard", "partial", "unknown"]
    dim: int | None = None  # for shard: a non-negative tensor dimension
    parts: int = 1  # a fused value: the local tensor is the parts' shards, concatenated
    dtensor: bool = False
    # The plan line that made this value non-replicated (for messages); not compared.
    origin: Span | None = field(default=None, compare=False)
    # A replicated value `expand`ed from size 1 along these dims: equal along them, so
    # it fits a value sharded there, whatever the traced size; not compared.
    expanded: frozenset[int] = field(default=frozenset(), compare=False)

    def describe(self) -> str:
        what = {
            "replicate": "replicated",
            "partial": "a partial sum",
            "unknown": "of unknown layout",
        }.get(self.kind, f"sharded on dim {self.dim}")
        if self.parts > 1:
            what += f" ({self.parts} fused parts)"
        return what + (" (DTensor)" if self.dtensor else " (plain tensor)")

    def same_placement(self, other: Layout) -> bool:
        return (self.kind, self.dim, self.parts) == (other.kind, other.dim, other.parts)


REPLICATE = Layout("replicate")
UNKNOWN = Layout("unknown")


class LayoutProblem(Exception):
    """An op rule's refusal: the message (the walk adds where), its code (E506 a layout
    that does not fit, E507 an unreduced partial sum) and a hint."""

    def __init__(self, message: str, code: str = "E506", hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.hint = hint


def normalize(dim: int, rank: int) -> int:
    """A tensor dimension as a non-negative index (`-1` of a rank-3 tensor is 2)."""
    return dim % rank if rank else dim
