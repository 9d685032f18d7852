"""The style registry's torch half: a Program's style call → the ParallelStyle to apply.

The registry (`meshplan.dsl.styles`) says, torch-free, which constructor builds a style
and with which arguments; here the constructor is imported by its dotted name and the
arguments' placements become torch's. `--emit python` writes the same constructor call
as source, from the same record.
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import Any

from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor import Placement as TorchPlacement
from torch.distributed.tensor.parallel.style import ParallelStyle

from meshplan.dsl.spec import Placement
from meshplan.dsl.styles import STYLES, Arg, CallArgs, Named

__all__ = ["constructor", "make_style", "resolve", "torch_placement"]


def torch_placement(p: Placement | None) -> TorchPlacement | None:
    """A registry placement → torch's (None stays None: "leave as is")."""
    if p is None:
        return None
    if p.kind == "shard":
        return Shard(p.dim if p.dim is not None else 0)
    return Replicate() if p.kind == "replicate" else Partial()


def _value(arg: Arg) -> Any:
    if isinstance(arg, Placement) or arg is None:
        return torch_placement(arg)
    if isinstance(arg, Named):
        return {name: torch_placement(p) for name, p in arg.pairs}
    if isinstance(arg, tuple):
        return tuple(torch_placement(p) for p in arg)
    return arg


@cache
def resolve(dotted: str) -> Any:
    """What a registry record names by its dotted name, imported."""
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def constructor(dotted: str) -> type[ParallelStyle]:
    """The class a registry record names, imported (`torch.distributed…ColwiseParallel`)."""
    cls = resolve(dotted)
    if not (isinstance(cls, type) and issubclass(cls, ParallelStyle)):
        raise TypeError(f"style constructor {dotted} is not a ParallelStyle")
    return cls


def make_style(call: CallArgs) -> ParallelStyle:
    """The ParallelStyle instance the runtime applies for a Program's style call."""
    record = STYLES.get(call.style)
    if record is None:
        raise ValueError(f"unknown style {call.style!r}")
    built = record.construct(call)
    cls = constructor(built.constructor)
    return cls(*(_value(a) for a in built.args), **{k: _value(v) for k, v in built.kwargs})
