"""Tracing: `torch.export` of a meta model into a `RawTrace`, cached in-process.

`torch.export.export(model, (), {"input_ids": …, "use_cache": False}, strict=False)` on
meta tensors, `input_ids` of shape [batch, seq_len]. The defaults (2, 48) are chosen so
the traced sizes do not collide with model sizes (a size-1 batch or a sequence as long
as a head would make reshapes ambiguous) and divide by 2, 4, 8 and 16. A `RawTrace` is
in the traced model's own naming (a reduced copy names its blocks 0, 1, …);
`planner.graph.build` renames it to the full model's.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from .types import CallArg, Ref, Signature

DEFAULT_BATCH = 2
DEFAULT_SEQ_LEN = 48
# The experts implementation used for tracing MoE blocks: transformers' `batched_mm`
# (index + bmm: plain ATen ops with static shapes).
TRACE_EXPERTS_IMPLEMENTATION = "batched_mm"


@dataclass(frozen=True)
class RawTrace:
    """A trace in the traced model's own naming, cached and renamed per use."""

    nodes: list[dict[str, Any]]
    edges: list[tuple[str, str, tuple[Any, ...]]]
    signatures: dict[str, Signature]
    call_counts: dict[str, int]


_TRACE_CACHE: OrderedDict[Any, RawTrace] = OrderedDict()
_TRACE_CACHE_SIZE = 32
_TRACE_LOCK = threading.Lock()

_PATH_KEY = re.compile(r"\[['\"]?([^\]'\"]+)['\"]?\]")


def _clean_path(path: str) -> str:
    # torch versions spell module paths "model.layers.0.mlp" or "L['self'].model.layers[0]".
    path = path.replace("L['self']", "").replace("L__self__", "")
    path = _PATH_KEY.sub(r".\1", path)
    return ".".join(p for p in path.split(".") if p)


def _type_name(t: Any) -> str:
    if isinstance(t, type):
        return t.__name__
    return str(t).rsplit(".", 1)[-1].strip("'>")


def _op_name(node: fx.Node) -> str:
    if node.op in ("placeholder", "output"):
        return node.op
    target = node.target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)
    if isinstance(target, str):
        return target
    name = getattr(target, "__name__", str(target))
    return name


def _value(x: Any) -> Any:
    if isinstance(x, fx.Node):
        return Ref(x.name)
    if isinstance(x, (list, tuple)):
        return tuple(_value(v) for v in x)
    if isinstance(x, dict):
        return {k: _value(v) for k, v in x.items()}
    if isinstance(x, torch.SymInt):
        try:
            return int(x)
        except Exception:
            return str(x)
    return x


def _uses(x: Any, path: tuple[Any, ...]) -> Iterator[tuple[tuple[Any, ...], fx.Node]]:
    if isinstance(x, fx.Node):
        yield path, x
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            yield from _uses(v, (*path, i))
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from _uses(v, (*path, k))


def _tensor_facts(val: Any) -> dict[str, Any]:
    def dims(t: torch.Tensor) -> tuple[Any, ...]:
        out: list[Any] = []
        for s in t.shape:
            try:
                out.append(int(s))
            except Exception:
                out.append(str(s))
        return tuple(out)

    if isinstance(val, torch.Tensor):
        return {"shape": dims(val), "dtype": val.dtype}
    if isinstance(val, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in val):
        return {
            "shape": None,
            "dtype": None,
            "shapes": tuple(dims(v) if isinstance(v, torch.Tensor) else None for v in val),
            "dtypes": tuple(v.dtype if isinstance(v, torch.Tensor) else None for v in val),
        }
    return {"shape": None, "dtype": None}


def _children(spec: Any) -> list[Any]:
    # TreeSpec exposes `children()` in recent torch and `children_specs` in older ones.
    children = getattr(spec, "children", None)
    return list(children() if callable(children) else spec.children_specs)


def _leaf_names(spec: Any, prefix: str) -> list[str]:
    if spec.is_leaf():
        return [prefix]
    children = _children(spec)
    ctx = spec.context
    keys = (
        list(ctx)
        if isinstance(ctx, (list, tuple))
        and len(ctx) == len(children)
        and all(isinstance(k, str) for k in ctx)
        else None
    )
    names: list[str] = []
    for i, child in enumerate(children):
        if keys is not None:
            sub = f"{prefix}.{keys[i]}" if prefix else keys[i]
        else:
            sub = f"{prefix}[{i}]"
        names += _leaf_names(child, sub)
    return names


def _input_names(module: nn.Module | None, in_spec: Any) -> list[str] | None:
    try:
        args_spec, kwargs_spec = _children(in_spec)
        positional: list[str] = []
        if module is not None:
            for p in inspect.signature(module.forward).parameters.values():
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                    positional.append(p.name)
        names: list[str] = []
        arg_children = _children(args_spec)
        for i, child in enumerate(arg_children):
            base = positional[i] if i < len(positional) else f"args[{i}]"
            names += _leaf_names(child, base)
        names += _leaf_names(kwargs_spec, "")
        return names
    except Exception:
        return None


def _call_args(
    specs: list[Any], names: list[str] | None, known: set[str], ids: Mapping[str, str]
) -> tuple[CallArg, ...]:
    from torch.export.graph_signature import TensorArgument

    out = []
    for i, spec in enumerate(specs):
        node = ids.get(spec.name) if isinstance(spec, TensorArgument) else None
        if node is not None and node in known:
            name = names[i] if names is not None and i < len(names) else None
            out.append(CallArg(node, name))
    return tuple(out)


_CASTS = {
    "aten.to.dtype": 3,  # position of the `copy` argument
    "aten.to.device": 4,
    "aten.to.dtype_layout": None,
    "aten.to.other": 3,
    "aten.type_as.default": None,
}


def _is_noop_cast(node: fx.Node) -> bool:
    """A dtype/device cast whose input already has that dtype and device."""
    if node.op != "call_function" or str(node.target) not in _CASTS or not node.args:
        return False
    src = node.args[0]
    if not isinstance(src, fx.Node):
        return False
    copy_at = _CASTS[str(node.target)]
    if node.kwargs.get("copy") or (
        copy_at is not None and len(node.args) > copy_at and node.args[copy_at]
    ):
        return False
    out, inp = node.meta.get("val"), src.meta.get("val")
    return (
        isinstance(out, torch.Tensor)
        and isinstance(inp, torch.Tensor)
        and out.dtype == inp.dtype
        and out.device == inp.device
        and tuple(out.shape) == tuple(inp.shape)
    )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence torch.export's own reporting: on failure it prints the partial graph to
    stderr and logs warnings; the caller turns the exception into one line instead."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _no_stack_traces() -> Iterator[None]:
    """Export records the Python stack of every node it creates (a fifth of its time on
    one decoder block); the graph keeps only each node's module path, never its stack."""
    import torch.fx.config as fx_config

    old = fx_config.do_not_emit_stack_traces
    fx_config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        fx_config.do_not_emit_stack_traces = old


def _export(model: nn.Module, batch: int, seq_len: int) -> Any:
    try:
        device = next(iter(model.parameters())).device
    except StopIteration:
        device = torch.device("meta")
    ids = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = {}
    if "input_ids" in params:
        kwargs["input_ids"] = ids
    else:
        args = (ids,)
    if "use_cache" in params:
        kwargs["use_cache"] = False
    preserve = tuple(name for name, _ in model.named_modules() if name)
    was_training = model.training
    model.eval()
    try:
        # Under no_grad a module's own `torch.no_grad()` (rotary embeddings) is a no-op,
        # so export inlines its ops instead of hiding them in a set-grad HOP subgraph.
        with torch.no_grad(), _quiet(), _no_stack_traces():
            try:
                return torch.export.export(
                    model, args, kwargs, strict=False, preserve_module_call_signature=preserve
                )
            except Exception:
                # Keeping call signatures is a nicety (argument names); retry without it.
                if not preserve:
                    raise
                return torch.export.export(model, args, kwargs, strict=False)
    finally:
        model.train(was_training)


def _raw_trace(model: nn.Module, batch: int, seq_len: int) -> RawTrace:
    from torch.export.graph_signature import InputKind

    ep = _export(model, batch, seq_len)
    kinds = {
        InputKind.PARAMETER: "parameter",
        InputKind.BUFFER: "buffer",
        InputKind.CONSTANT_TENSOR: "constant",
        InputKind.USER_INPUT: "input",
    }
    placeholders: dict[str, tuple[str, str | None]] = {}
    for spec in ep.graph_signature.input_specs:
        name = getattr(spec.arg, "name", None)
        if name is not None:
            placeholders[name] = (kinds.get(spec.kind, str(spec.kind).lower()), spec.target)
    # Weights are identified by their fqn: that is their node id in the dataflow. A cast
    # to the dtype a tensor already has returns that very tensor, so it is no node:
    # its uses are uses of its input (otherwise Llama's residual add would seem to read
    # a value inside input_layernorm, where `hidden_states.to(float32)` is traced).
    ids: dict[str, str] = {}
    aliases: set[str] = set()
    for node in ep.graph.nodes:
        if node.op == "placeholder":
            kind, target = placeholders.get(node.name, ("input", None))
            ids[node.name] = target if target is not None and kind != "input" else node.name
        elif _is_noop_cast(node):
            ids[node.name] = ids[node.args[0].name]
            aliases.add(node.name)
        else:
            ids[node.name] = node.name

    def ref(x: Any) -> Any:
        if isinstance(x, fx.Node):
            return Ref(ids[x.name])
        if isinstance(x, (list, tuple)):
            return tuple(ref(v) for v in x)
        if isinstance(x, dict):
            return {k: ref(v) for k, v in x.items()}
        return _value(x)

    nodes: list[dict[str, Any]] = []
    edges: list[tuple[str, str, tuple[Any, ...]]] = []
    kept: set[str] = set()
    call_keys: dict[str, set[str]] = {}
    for node in ep.graph.nodes:
        op = _op_name(node)
        if node.name in aliases or op.startswith(("aten._assert", "aten.sym_constrain_range")):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        paths = []
        types = []
        for key, (path, typ) in stack.items():
            clean = _clean_path(str(path))
            if clean:
                paths.append(clean)
                types.append(_type_name(typ))
                call_keys.setdefault(clean, set()).add(str(key))
        attrs: dict[str, Any] = {
            "op": op,
            "target": node.target,
            "args": ref(node.args),
            "kwargs": ref(dict(node.kwargs)),
            "module": paths[-1] if paths else "",
            "module_stack": tuple(paths),
            "module_type": types[-1] if types else type(model).__name__,
            **_tensor_facts(node.meta.get("val")),
        }
        if node.op == "placeholder":
            kind, target = placeholders.get(node.name, ("input", None))
            attrs["kind"] = kind
            if target is not None and kind != "input":
                attrs["fqn"] = target
        nodes.append({"id": ids[node.name], **attrs})
        kept.add(ids[node.name])
        uses: dict[str, list[tuple[Any, ...]]] = {}
        for path, src in _uses(node.args, ()):
            uses.setdefault(ids[src.name], []).append(path)
        for path, src in _uses(dict(node.kwargs), ()):
            uses.setdefault(ids[src.name], []).append(path)
        for src_name, positions in uses.items():
            edges.append((src_name, ids[node.name], tuple(positions)))
    edges = [e for e in edges if e[0] in kept]

    modules = dict(model.named_modules())
    signatures: dict[str, Signature] = {}
    for entry in ep.module_call_graph:
        sig = entry.signature
        fqn = entry.fqn.split("@", 1)[0]
        if sig is None or not fqn or fqn in signatures:
            continue
        in_names = _input_names(modules.get(fqn), sig.in_spec)
        if in_names is not None and len(in_names) != len(sig.inputs):
            in_names = None
        try:
            out_names: list[str] | None = _leaf_names(sig.out_spec, "output")
        except Exception:
            out_names = None
        if out_names is not None and len(out_names) != len(sig.outputs):
            out_names = None
        signatures[fqn] = (
            _call_args(list(sig.inputs), in_names, kept, ids),
            _call_args(list(sig.outputs), out_names, kept, ids),
        )
    counts = {fqn: len(keys) for fqn, keys in call_keys.items()}
    return RawTrace(nodes=nodes, edges=edges, signatures=signatures, call_counts=counts)


def cached_raw_trace(model: nn.Module, key: Any, batch: int, seq_len: int) -> RawTrace:
    if key is None:
        return _raw_trace(model, batch, seq_len)
    with _TRACE_LOCK:
        hit = _TRACE_CACHE.get(key)
        if hit is not None:
            _TRACE_CACHE.move_to_end(key)
            return hit
    raw = _raw_trace(model, batch, seq_len)
    with _TRACE_LOCK:
        _TRACE_CACHE[key] = raw
        while len(_TRACE_CACHE) > _TRACE_CACHE_SIZE:
            _TRACE_CACHE.popitem(last=False)
    return raw


def trace_key(model: nn.Module, batch: int, seq_len: int) -> Any:
    config = getattr(model, "config", None)
    try:
        text = config.to_json_string(use_diff=False)  # type: ignore[union-attr]
    except Exception:
        return None
    cls = type(model)
    return (
        f"{cls.__module__}.{cls.__qualname__}",
        text,
        getattr(config, "_attn_implementation", None),
        getattr(config, "_experts_implementation", None),
        str(next((p.dtype for p in model.parameters()), None)),
        batch,
        seq_len,
    )
