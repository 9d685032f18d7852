"""Tied parameters through tensor parallelism: `parallelize_module` unties them.

A tied embedding and head (`model.embed_tokens.weight is lm_head.weight`) is one
Parameter reachable under two modules. Each ParallelStyle replaces its own module's
parameter with a new DTensor Parameter, so after `parallelize_module` the two modules
hold two copies: each is trained by half of the gradient, and the copies drift apart
(measured: Gemma-2's tied head under the shipped plan). `tied_groups(model)` records
the ties before any step; `retie(groups)` puts them back after a step, when every copy
is laid out alike (same mesh, placements and shape, as a vocabulary-sharded embedding
and head are): the modules then share the first copy again, and its gradient sums both
uses, as in one process. Copies laid out differently cannot share one tensor; they are
left alone (the compiler rejects such a plan: E504).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import DTensor

__all__ = ["TiedGroup", "retie", "tied_groups"]

TiedGroup = tuple[tuple[nn.Module, str], ...]  # (module, parameter attribute) sharing one tensor


def tied_groups(model: nn.Module) -> list[TiedGroup]:
    """Every parameter reachable under more than one (module, attribute)."""
    seen: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None:
                places = seen.setdefault(id(p), [])
                if all(m is not module or a != attr for m, a in places):
                    places.append((module, attr))
    return [tuple(places) for places in seen.values() if len(places) > 1]


def _alike(a: nn.Parameter, b: nn.Parameter) -> bool:
    if isinstance(a, DTensor) != isinstance(b, DTensor) or a.shape != b.shape:
        return False
    if isinstance(a, DTensor) and isinstance(b, DTensor):
        return a.device_mesh == b.device_mesh and a.placements == b.placements
    return True


def retie(groups: list[TiedGroup]) -> None:
    """Make each group's modules share one parameter again where their copies agree."""
    for group in groups:
        first_module, first_attr = group[0]
        first = first_module._parameters[first_attr]
        if first is None:
            continue
        for module, attr in group[1:]:
            current = module._parameters[attr]
            if current is not None and current is not first and _alike(first, current):
                module._parameters[attr] = first
