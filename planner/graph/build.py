"""Building a `ModelGraph`: resolve the model, collect its facts, trace, rename.

For a transformers model a copy with one block per kind is traced when it matches the
full model block by block (`_matches`); the trace is then renamed to the full model's
naming, so a reduced trace reads like the full model's first blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import networkx as nx
from torch import nn

from ..models import ModelSource, ModelSpecError, build_meta_model, resolve_model
from .facts import block_settings, block_structure, find_stacks, module_infos, shape_of, tied_groups
from .trace import (
    DEFAULT_BATCH,
    DEFAULT_SEQ_LEN,
    TRACE_EXPERTS_IMPLEMENTATION,
    RawTrace,
    cached_raw_trace,
    trace_key,
)
from .types import Boundaries, CallArg, GraphError, ModelGraph, Ref, Stack


def _renamer(stack: Stack | None, layers: tuple[int, ...]) -> Callable[[str], str]:
    """Maps the reduced model's names (block j) to the full model's (block layers[j])."""
    if stack is None:
        return lambda name: name
    prefix = stack.fqn + "."

    def rename(name: str) -> str:
        if not name.startswith(prefix):
            return name
        head, sep, rest = name[len(prefix) :].partition(".")
        if not head.isdigit():
            return name
        return f"{prefix}{layers[int(head)]}{sep}{rest}"

    return rename


def _matches(full: nn.Module, reduced: nn.Module, stack: Stack, layers: tuple[int, ...]) -> bool:
    """Whether the reduced model is the full model with just `layers` of `stack`."""
    full_mods = dict(full.named_modules())
    red_mods = dict(reduced.named_modules())
    rename = _renamer(stack, layers)
    outside_full = {n for n in full_mods if not n.startswith(stack.fqn + ".")}
    outside_red = {n for n in red_mods if not n.startswith(stack.fqn + ".")}
    if outside_full != outside_red:
        return False
    for name in outside_full:
        a, b = full_mods[name], red_mods[name]
        if type(a) is not type(b) or {
            n: shape_of(p) for n, p in a.named_parameters(recurse=False)
        } != {n: shape_of(p) for n, p in b.named_parameters(recurse=False)}:
            return False
    for j, i in enumerate(layers):
        a = full_mods.get(f"{stack.fqn}.{i}")
        b = red_mods.get(f"{stack.fqn}.{j}")
        if a is None or b is None or rename(f"{stack.fqn}.{j}") != f"{stack.fqn}.{i}":
            return False
        if block_structure(a) != block_structure(b) or block_settings(a) != block_settings(b):
            return False
    return True


def build_graph(
    model: str | nn.Module | ModelSource,
    *,
    batch: int = DEFAULT_BATCH,
    seq_len: int = DEFAULT_SEQ_LEN,
    attn_implementation: str | None = None,
    reduce: bool = True,
    allow_untraced: bool | None = None,
) -> ModelGraph:
    """Resolve `model`, build it on meta, collect module facts and trace its dataflow.

    `reduce=False` traces every layer. `allow_untraced` (default: True for presets and
    config directories, False for factories and modules) says whether a failed trace is
    recorded in the graph (`traced=False`) or raised as `GraphError`.
    """
    if batch < 1 or seq_len < 1:
        raise ValueError(f"batch and seq_len must be positive, not {batch} and {seq_len}")
    src = resolve_model(model)
    if allow_untraced is None:
        allow_untraced = src.kind in ("preset", "directory")
    full = build_meta_model(src, attn_implementation=attn_implementation)
    config = src.config if src.config is not None else getattr(full, "config", None)
    stacks = find_stacks(full, config)
    modules = module_infos(full, config, stacks)
    parameters = {n: shape_of(p) for n, p in full.named_parameters(remove_duplicate=False)}
    tied = tied_groups(full)

    # Choose what to trace: a reduced copy with one block per kind when possible.
    n_layers = src.num_layers
    candidates = [s for s in stacks if s.length == n_layers]
    trace_stack = candidates[0] if len(candidates) == 1 else None
    traced_model: nn.Module = full
    layers: tuple[int, ...] = ()
    reduced = False
    if reduce and src.can_reduce and trace_stack is not None:
        layers = tuple(sorted(k.representative for k in trace_stack.kinds))
        try:
            candidate = build_meta_model(
                src,
                layers=layers,
                attn_implementation=attn_implementation,
                experts_implementation=TRACE_EXPERTS_IMPLEMENTATION,
            )
        except (ModelSpecError, ValueError):
            candidate = None
        if candidate is not None and _matches(full, candidate, trace_stack, layers):
            traced_model, reduced = candidate, True
    if not reduced and src.module is None and src.can_reduce:
        # A full copy of a config-built model, so MoE experts trace with static shapes.
        traced_model = build_meta_model(
            src,
            attn_implementation=attn_implementation,
            experts_implementation=TRACE_EXPERTS_IMPLEMENTATION,
        )
    rename = _renamer(trace_stack if reduced else None, layers)
    traced_layers = {
        s.fqn: (layers if reduced and s is trace_stack else tuple(range(s.length))) for s in stacks
    }

    trace_error: str | None = None
    raw: RawTrace | None = None
    try:
        key = trace_key(traced_model, batch, seq_len) if src.module is None else None
        raw = cached_raw_trace(traced_model, key, batch, seq_len)
    except Exception as exc:
        first = " ".join(str(exc).split("\n", 3)[:3]).strip()
        trace_error = f"torch.export failed for {src.name}: {type(exc).__name__}: {first}"
        if not allow_untraced:
            raise GraphError(trace_error) from None
    dataflow, boundaries = (
        _dataflow(raw, tied, rename) if raw is not None else (nx.DiGraph(), Boundaries())
    )
    return ModelGraph(
        name=src.name,
        source=src,
        modules=modules,
        parameters=parameters,
        tied=tied,
        stacks=stacks,
        dataflow=dataflow,
        traced=raw is not None,
        trace_error=trace_error,
        reduced=reduced,
        traced_layers=traced_layers,
        config=config,
        batch=batch,
        seq_len=seq_len,
        boundaries=boundaries,
    )


def _dataflow(
    raw: RawTrace, tied: tuple[tuple[str, ...], ...], rename: Callable[[str], str]
) -> tuple[nx.DiGraph, Boundaries]:
    """The trace in the full model's naming, as a DiGraph, and its module boundaries."""
    dataflow = nx.DiGraph()
    members: dict[str, list[str]] = {}
    # Weight node ids are fqns in the traced model's naming: rename them, and every
    # reference to them, to the full model's naming.
    # A tied tensor is one placeholder, named by the first fqn of its group (export
    # names it after whichever alias it met last, and leaves the other one unused).
    canonical = {fqn: group[0] for group in tied for fqn in group}
    weight_ids = {
        r["id"]: canonical.get(rename(r["id"]), rename(r["id"])) for r in raw.nodes if "fqn" in r
    }

    def node_id(name: str) -> str:
        return weight_ids.get(name, name)

    def refs(x: Any) -> Any:
        if isinstance(x, Ref):
            return Ref(node_id(x.node))
        if isinstance(x, tuple):
            return tuple(refs(v) for v in x)
        if isinstance(x, dict):
            return {k: refs(v) for k, v in x.items()}
        return x

    for record in raw.nodes:
        attrs = dict(record)
        nid = node_id(attrs.pop("id"))
        attrs["module"] = rename(attrs["module"])
        attrs["module_stack"] = tuple(rename(m) for m in attrs["module_stack"])
        if "fqn" in attrs:
            if nid in dataflow:
                continue  # the other name of a tied tensor
            attrs["fqn"] = nid
            attrs["target"] = nid
            group = next((g for g in tied if nid in g), None)
            if group is not None:
                attrs["tied"] = group
        if weight_ids:
            attrs["args"] = refs(attrs["args"])
            attrs["kwargs"] = refs(attrs["kwargs"])
        dataflow.add_node(nid, **attrs)
        for m in attrs["module_stack"]:
            members.setdefault(m, []).append(nid)
    for src_name, dst, positions in raw.edges:
        dataflow.add_edge(node_id(src_name), node_id(dst), positions=positions)
    signatures = {
        rename(k): (
            tuple(CallArg(node_id(a.node), a.name) for a in ins),
            tuple(CallArg(node_id(a.node), a.name) for a in outs),
        )
        for k, (ins, outs) in raw.signatures.items()
    }
    return dataflow, Boundaries(
        members={m: tuple(nodes) for m, nodes in members.items()},
        signatures=signatures,
        call_counts={rename(k): v for k, v in raw.call_counts.items()},
    )
