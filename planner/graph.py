"""Trace a model on the meta device into a `ModelGraph`: module facts plus ATen dataflow.

What a `ModelGraph` guarantees:

- `modules` holds a `ModuleInfo` for every module of the *full* model (named_modules
  order, root `""` included): class name, a coarse `kind`, direct parameter and buffer
  shapes, and the facts plan checks divide by (features, vocabulary, heads, key/value
  heads, head size, experts). Built from the meta model: no weights are allocated.
- `tied` lists groups of parameter fqns that are one tensor (GPT-2's and
  Llama-3.2-1B's `lm_head.weight` and token embedding), found by tensor identity.
- `stacks` lists the repeated blocks (an `nn.ModuleList` of same-class blocks, e.g.
  `model.layers`, `transformer.h`) grouped into kinds: blocks of one kind have the same
  submodules, parameter shapes and per-layer settings (Gemma-2: sliding vs global
  attention). Only one block per kind is traced: for a transformers model a copy with
  just those layers is built and checked to match the full model block by block (if it
  does not, the full model is traced). `representative(fqn)` maps any fqn inside a
  block to the same fqn in its kind's traced block, so an 80-layer model costs what a
  one-layer model does.
- `dataflow` is a `networkx.DiGraph` over the traced ATen nodes, in execution order.
  Node id = fx node name, except weights, whose id is their parameter/buffer fqn.
  Attributes: `op` ("aten.mm.default", "getitem", "placeholder", "output"), `target`,
  `args`/`kwargs` (with `Ref(node_id)` for values), `shape` (tuple, or None when the
  value is not one tensor; multi-output ops carry `shapes`/`dtypes`), `dtype`,
  `module` (innermost module fqn, in the full model's naming; "" at the root),
  `module_stack` (fqns outer → inner, root excluded), `module_type`. Placeholders
  carry `kind` ("parameter", "buffer", "constant", "input") and, for weights, `fqn`;
  a tied tensor is one node, under the first fqn of its group, with `tied` = the
  group. Edges go producer → consumer with `positions`: the argument paths (`(0,)`,
  `(1, 2)` for an element of a list argument, `("dim",)` for a keyword) where the
  value is used. Left out, because they compute nothing: assertion ops
  (`aten._assert_*`) and casts to the dtype and device a tensor already has (those
  return their input, so their uses are uses of the input: Llama's residual add reads
  the layer input, not a node inside `input_layernorm`).
- `calls(fqn)` gives a traced module's boundary: the values flowing in from outside
  (named by the module's forward arguments when known), the values flowing out, the
  weights used and the nodes inside.

How tracing is done: `torch.export.export(model, (), {"input_ids": …, "use_cache":
False}, strict=False)` on meta tensors, `input_ids` of shape [batch, seq_len]. The
defaults (2, 48) are chosen so the traced sizes do not collide with model sizes
(a size-1 batch or a sequence as long as a head would make reshapes ambiguous) and
divide by 2, 4, 8 and 16. MoE experts are traced with transformers' `batched_mm`
implementation (index + bmm: plain ATen ops with static shapes). Traces are cached
in-process per (model class, reduced config, settings).

Errors: a model that cannot be traced raises `GraphError` (one line) when it comes
from a factory or an `nn.Module`; for presets and config directories the failure is
recorded (`traced=False`, `trace_error`) and the module facts are still returned.
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
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
from torch import fx, nn

from .models import (
    PER_LAYER_CONFIG_LISTS,
    ModelSource,
    ModelSpecError,
    build_meta_model,
    resolve_model,
)

__all__ = [
    "BlockKind",
    "CallArg",
    "GraphError",
    "ModelGraph",
    "ModuleCall",
    "ModuleInfo",
    "Ref",
    "Stack",
    "build_graph",
]

DEFAULT_BATCH = 2
DEFAULT_SEQ_LEN = 48
# The experts implementation used for tracing MoE blocks (see the module docstring).
TRACE_EXPERTS_IMPLEMENTATION = "batched_mm"


class GraphError(ValueError):
    """The model could not be traced; the message is one line, for the user."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(s.strip() for s in str(message).splitlines() if s.strip()))


# --------------------------------------------------------------------------- data types


@dataclass(frozen=True)
class ModuleInfo:
    """Facts about one module of the full model.

    `kind` is one of: model, linear, embedding, conv1d (GPT-2's transposed Conv1D),
    norm, attention, mlp, moe, router, experts, rotary, activation, dropout,
    decoder_layer (a block of a stack), stack, other. `params`/`buffers` are the
    module's direct ones (local name -> shape). `attrs` holds kind-specific facts, e.g.
    in_features/out_features (linear; conv1d also has nx/nf), num_embeddings/
    embedding_dim, normalized_shape/eps (norm), num_heads/num_kv_heads/head_dim
    (attention), num_experts/top_k (moe, router, experts), stack/index/block_kind
    (decoder_layer).
    """

    fqn: str
    type: str
    kind: str
    params: Mapping[str, tuple[int, ...]] = field(default_factory=dict, hash=False)
    buffers: Mapping[str, tuple[int, ...]] = field(default_factory=dict, hash=False)
    attrs: Mapping[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class BlockKind:
    """Blocks of a stack that are alike; `representative` is the one that is traced."""

    name: str
    layers: tuple[int, ...]
    representative: int


@dataclass(frozen=True)
class Stack:
    """An `nn.ModuleList` of repeated blocks, e.g. `model.layers`."""

    fqn: str
    block_type: str
    length: int
    kinds: tuple[BlockKind, ...]

    def kind_of(self, index: int) -> BlockKind:
        for kind in self.kinds:
            if index in kind.layers:
                return kind
        raise IndexError(f"{self.fqn} has no block {index}")

    def block(self, index: int) -> str:
        return f"{self.fqn}.{index}"


@dataclass(frozen=True)
class Ref:
    """A reference to another dataflow node inside `args`/`kwargs`."""

    node: str


@dataclass(frozen=True)
class CallArg:
    """A value crossing a module boundary: the dataflow node and, when known, the
    forward argument it is passed as ("hidden_states", "position_embeddings[0]") or the
    output it is returned as ("output", "output[0]")."""

    node: str
    name: str | None = None


@dataclass(frozen=True)
class ModuleCall:
    """The traced boundary of one module (all of its calls, in execution order)."""

    fqn: str
    inputs: tuple[CallArg, ...]
    outputs: tuple[CallArg, ...]
    params: tuple[str, ...]
    nodes: tuple[str, ...]
    count: int

    def input(self, name: str) -> str:
        """The node passed as forward argument `name`."""
        for arg in self.inputs:
            if arg.name == name:
                return arg.node
        raise KeyError(f"{self.fqn} has no traced input named {name!r}")


# --------------------------------------------------------------------------- the graph


@dataclass(eq=False)
class ModelGraph:
    """A model's module facts and traced dataflow (see the module docstring).

    `parameters` maps every parameter fqn (tied aliases included) to its shape;
    `reduced` says whether a copy with one block per kind was traced, `traced_layers`
    which blocks of each stack the trace holds (full-model indices); `config` is the
    transformers config (None for plain modules); `batch`/`seq_len` the traced input.
    Treat it as read-only: traces are shared through an in-process cache.
    """

    name: str
    source: ModelSource
    modules: dict[str, ModuleInfo]
    parameters: dict[str, tuple[int, ...]]
    tied: tuple[tuple[str, ...], ...]
    stacks: tuple[Stack, ...]
    dataflow: nx.DiGraph
    traced: bool
    trace_error: str | None
    reduced: bool
    traced_layers: dict[str, tuple[int, ...]]
    config: Any
    batch: int
    seq_len: int
    _signatures: dict[str, tuple[tuple[CallArg, ...], tuple[CallArg, ...]]] = field(
        default_factory=dict, repr=False
    )
    _call_counts: dict[str, int] = field(default_factory=dict, repr=False)
    _members: dict[str, list[str]] = field(default_factory=dict, repr=False)
    _calls: dict[str, ModuleCall] = field(default_factory=dict, repr=False)

    def fqns(self, include_root: bool = False) -> list[str]:
        """Module fqns in `named_modules()` order (the root `""` only if asked)."""
        return [f for f in self.modules if include_root or f]

    def module(self, fqn: str) -> ModuleInfo:
        try:
            return self.modules[fqn]
        except KeyError:
            raise KeyError(f"{self.name} has no module {fqn!r}") from None

    def num_parameters(self) -> int:
        """Parameter count, each tied tensor counted once."""
        seen = {group[0] for group in self.tied}
        dup = {fqn for group in self.tied for fqn in group[1:]}
        total = 0
        for fqn, shape in self.parameters.items():
            if fqn in dup and fqn not in seen:
                continue
            n = 1
            for s in shape:
                n *= s
            total += n
        return total

    def stack_of(self, fqn: str) -> tuple[Stack, int] | None:
        """The stack and block index `fqn` lies in, if any."""
        for stack in self.stacks:
            prefix = stack.fqn + "."
            if fqn.startswith(prefix):
                head = fqn[len(prefix) :].split(".", 1)[0]
                if head.isdigit():
                    return stack, int(head)
        return None

    def representative(self, fqn: str) -> str:
        """The fqn standing for `fqn` in the trace: the same path in the traced block of
        its kind (`model.layers.37.mlp` -> `model.layers.0.mlp`); itself outside stacks.
        Accepts module and parameter fqns."""
        if fqn not in self.modules and fqn not in self.parameters:
            raise KeyError(f"{self.name} has no module or parameter {fqn!r}")
        found = self.stack_of(fqn)
        if found is None:
            return fqn
        stack, index = found
        prefix = f"{stack.fqn}.{index}"
        return f"{stack.fqn}.{stack.kind_of(index).representative}{fqn[len(prefix) :]}"

    def is_traced(self, fqn: str) -> bool:
        """Whether the module's representative ran in the trace."""
        return self.traced and bool(self._members.get(self.representative(fqn)))

    def ops(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Dataflow nodes in execution order, as (node id, attributes)."""
        yield from self.dataflow.nodes(data=True)

    def calls(self, fqn: str) -> ModuleCall:
        """The boundary of module `fqn` (mapped to its representative) in the trace."""
        if not self.traced:
            raise GraphError(f"the graph of {self.name} was not traced: {self.trace_error}")
        rep = self.representative(fqn)
        if rep not in self._calls:
            self._calls[rep] = self._compute_call(rep)
        return self._calls[rep]

    def _compute_call(self, fqn: str) -> ModuleCall:
        g = self.dataflow
        inside = self._members.get(fqn, [])
        members = set(inside)
        params: list[str] = []
        external: list[str] = []
        for node in inside:
            for pred in g.predecessors(node):
                if pred in members:
                    continue
                attrs = g.nodes[pred]
                if attrs.get("kind") in ("parameter", "buffer", "constant"):
                    if pred not in params:
                        params.append(pred)
                elif pred not in external:
                    external.append(pred)
        leaving = [n for n in inside if any(s not in members for s in g.successors(n))]
        sig_in, sig_out = self._signatures.get(fqn, ((), ()))
        inputs = list(sig_in)
        known = {a.node for a in inputs}
        inputs += [CallArg(n) for n in external if n not in known]
        outputs = list(sig_out)
        known = {a.node for a in outputs}
        outputs += [CallArg(n) for n in leaving if n not in known]
        return ModuleCall(
            fqn=fqn,
            inputs=tuple(inputs),
            outputs=tuple(outputs),
            params=tuple(params),
            nodes=tuple(inside),
            count=self._call_counts.get(fqn, 1 if inside else 0),
        )


# --------------------------------------------------------------------------- module facts

_PER_INDEX_ATTR = re.compile(
    r"(^|_)(layer_?(idx|id|index|number|num)|block_?(idx|id|index)|idx|index)$"
)


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def _first_int(*values: Any) -> int | None:
    for v in values:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def _classify(fqn: str, module: nn.Module, stack_blocks: set[str], stack_fqns: set[str]) -> str:
    name = type(module).__name__
    lower = name.lower()
    if fqn in stack_blocks:
        return "decoder_layer"
    if fqn in stack_fqns:
        return "stack"
    if name == "Conv1D":
        return "conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)) or lower.endswith("norm"):
        return "norm"
    if isinstance(module, nn.Dropout):
        return "dropout"
    if "rotary" in lower:
        return "rotary"
    if "attention" in lower:
        return "attention"
    if "experts" in lower:
        return "experts"
    if "router" in lower:
        return "router"
    if "moe" in lower:
        return "moe"
    if lower.endswith(("mlp", "feedforward", "ffn")):
        return "mlp"
    mod = type(module).__module__
    if mod.startswith(("transformers.activations", "torch.nn.modules.activation")):
        return "activation"
    if fqn == "" or lower.endswith("model") or lower.endswith("lmheadmodel"):
        return "model"
    return "other"


def _attention_attrs(module: nn.Module, config: Any) -> dict[str, Any]:
    heads = _first_int(
        getattr(module, "num_heads", None),
        getattr(module, "num_attention_heads", None),
        getattr(config, "num_attention_heads", None),
    )
    hidden = getattr(config, "hidden_size", None)
    head_dim = _first_int(
        getattr(module, "head_dim", None),
        getattr(config, "head_dim", None),
        hidden // heads if isinstance(hidden, int) and heads else None,
    )
    groups = getattr(module, "num_key_value_groups", None)
    kv = _first_int(
        getattr(module, "num_key_value_heads", None),
        getattr(module, "num_kv_heads", None),
        heads // groups if heads and isinstance(groups, int) and groups else None,
        getattr(config, "num_key_value_heads", None),
        heads,
    )
    attrs: dict[str, Any] = {"num_heads": heads, "num_kv_heads": kv, "head_dim": head_dim}
    for key in ("sliding_window", "is_causal", "attn_logit_softcapping"):
        value = getattr(module, key, None)
        if isinstance(value, (bool, int, float)):
            attrs[key] = value
    return attrs


def _module_attrs(kind: str, module: nn.Module, config: Any) -> dict[str, Any]:
    if kind == "linear":
        assert isinstance(module, nn.Linear)
        return {
            "in_features": module.in_features,
            "out_features": module.out_features,
            "bias": module.bias is not None,
        }
    if kind == "conv1d":
        # transformers' Conv1D stores weight as (nx, nf) = (in, out): a transposed Linear.
        nx_, nf = _first_int(getattr(module, "nx", None)), _first_int(getattr(module, "nf", None))
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            nx_ = nx_ if nx_ is not None else int(weight.shape[0])
            nf = nf if nf is not None else int(weight.shape[1])
        return {"nx": nx_, "nf": nf, "in_features": nx_, "out_features": nf, "bias": True}
    if kind == "embedding":
        assert isinstance(module, nn.Embedding)
        return {
            "num_embeddings": module.num_embeddings,
            "embedding_dim": module.embedding_dim,
            "padding_idx": module.padding_idx,
        }
    if kind == "norm":
        shape = getattr(module, "normalized_shape", None)
        weight = getattr(module, "weight", None)
        if shape is None and isinstance(weight, torch.Tensor):
            shape = _shape(weight)
        eps = next(
            (
                getattr(module, k)
                for k in ("eps", "variance_epsilon", "epsilon")
                if isinstance(getattr(module, k, None), float)
            ),
            None,
        )
        return {"normalized_shape": tuple(shape) if shape is not None else None, "eps": eps}
    if kind == "attention":
        return _attention_attrs(module, config)
    if kind in ("experts", "router", "moe"):
        attrs: dict[str, Any] = {
            "num_experts": _first_int(
                getattr(module, "num_experts", None),
                getattr(config, "num_local_experts", None),
                getattr(config, "num_experts", None),
            ),
            "top_k": _first_int(
                getattr(module, "top_k", None), getattr(config, "num_experts_per_tok", None)
            ),
        }
        if kind == "experts":
            attrs["hidden_dim"] = _first_int(getattr(module, "hidden_dim", None))
            attrs["intermediate_dim"] = _first_int(getattr(module, "intermediate_dim", None))
            # transformers 5 stores all experts of a layer as 3-D tensors [experts, …].
            attrs["fused"] = any(p.dim() == 3 for p in module.parameters(recurse=False))
        return attrs
    if kind == "mlp":
        hidden = _first_int(
            getattr(module, "hidden_size", None), getattr(config, "hidden_size", None)
        )
        # The down projection maps intermediate -> hidden: its input size is the
        # intermediate size when no attribute says so (GPT-2's n_inner may be None).
        down = [
            _module_attrs(k, child, config).get("in_features")
            for child in module.children()
            for k in (_classify("-", child, set(), set()),)
            if k in ("linear", "conv1d")
            and _module_attrs(k, child, config).get("out_features") == hidden
        ]
        return {
            "hidden_size": hidden,
            "intermediate_size": _first_int(
                getattr(module, "intermediate_size", None),
                getattr(config, "intermediate_size", None),
                getattr(config, "n_inner", None),
                *down,
            ),
        }
    if kind == "rotary":
        rope_type = getattr(module, "rope_type", None)
        return {"rope_type": rope_type} if isinstance(rope_type, str) else {}
    return {}


def _module_infos(
    model: nn.Module, config: Any, stacks: tuple[Stack, ...]
) -> dict[str, ModuleInfo]:
    blocks: dict[str, tuple[Stack, int]] = {
        stack.block(i): (stack, i) for stack in stacks for i in range(stack.length)
    }
    stack_fqns = {s.fqn for s in stacks}
    block_fqns = set(blocks)
    infos: dict[str, ModuleInfo] = {}
    for fqn, module in model.named_modules(remove_duplicate=False):
        if fqn in infos:
            continue
        kind = _classify(fqn, module, block_fqns, stack_fqns)
        if kind == "decoder_layer":
            stack, index = blocks[fqn]
            attrs: dict[str, Any] = {
                "stack": stack.fqn,
                "index": index,
                "block_kind": stack.kind_of(index).name,
            }
        elif kind == "stack":
            stack = next(s for s in stacks if s.fqn == fqn)
            attrs = {
                "length": stack.length,
                "block_type": stack.block_type,
                "kinds": tuple(k.name for k in stack.kinds),
            }
        else:
            attrs = _module_attrs(kind, module, config)
        infos[fqn] = ModuleInfo(
            fqn=fqn,
            type=type(module).__name__,
            kind=kind,
            params={n: _shape(p) for n, p in module.named_parameters(recurse=False)},
            buffers={n: _shape(b) for n, b in module.named_buffers(recurse=False) if b is not None},
            attrs=attrs,
        )
    return infos


def _tied_groups(model: nn.Module) -> tuple[tuple[str, ...], ...]:
    by_tensor: dict[int, list[str]] = {}
    for fqn, p in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), []).append(fqn)
    return tuple(tuple(names) for names in by_tensor.values() if len(names) > 1)


# --------------------------------------------------------------------------- stacks


def _block_structure(block: nn.Module) -> tuple[Any, ...]:
    return tuple(
        (
            rel,
            type(m).__qualname__,
            tuple((n, _shape(p), str(p.dtype)) for n, p in m.named_parameters(recurse=False)),
            tuple(
                (n, _shape(b), str(b.dtype))
                for n, b in m.named_buffers(recurse=False)
                if b is not None
            ),
        )
        for rel, m in block.named_modules()
    )


def _block_settings(block: nn.Module) -> tuple[Any, ...]:
    # Scalar attributes (is_sliding, sliding_window, …) distinguish blocks whose
    # structure is the same but which compute differently; per-index ones do not.
    out = []
    for rel, m in block.named_modules():
        scalars = tuple(
            sorted(
                (k, v)
                for k, v in vars(m).items()
                if not k.startswith("_")
                and k != "training"
                and not _PER_INDEX_ATTR.search(k)
                and (v is None or isinstance(v, (bool, int, float, str)))
            )
        )
        out.append((rel, scalars))
    return tuple(out)


def _per_layer_values(config: Any, index: int, length: int) -> tuple[tuple[str, Any], ...]:
    values = []
    for attr in PER_LAYER_CONFIG_LISTS:
        value = getattr(config, attr, None)
        if isinstance(value, (list, tuple)) and len(value) == length:
            values.append((attr, value[index]))
    return tuple(values)


def _find_stacks(model: nn.Module, config: Any) -> tuple[Stack, ...]:
    stacks: list[Stack] = []
    taken: list[str] = []
    n_layers = getattr(config, "num_hidden_layers", None)
    for fqn, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(fqn.startswith(t + ".") for t in taken):
            continue  # a list inside a block (e.g. per-expert modules) is part of the block
        blocks = list(module)
        block_type = type(blocks[0])
        if not all(type(b) is block_type for b in blocks):
            continue
        if not any(True for _ in blocks[0].parameters()):
            continue
        groups: OrderedDict[Any, list[int]] = OrderedDict()
        config_values: dict[Any, tuple[tuple[str, Any], ...]] = {}
        for i, block in enumerate(blocks):
            per_layer = _per_layer_values(config, i, len(blocks)) if len(blocks) == n_layers else ()
            key = (_block_structure(block), _block_settings(block), per_layer)
            groups.setdefault(key, []).append(i)
            config_values[key] = per_layer
        kinds = []
        labels = ["/".join(str(v) for _, v in config_values[key]) for key in groups]
        distinct = len(set(labels)) == len(labels) and all(labels)
        for k, layers in enumerate(groups.values()):
            if distinct:
                name = labels[k]
            elif len(groups) == 1:
                name = labels[k] or "block"
            else:
                name = f"{labels[k] or 'variant'}#{k}"
            kinds.append(BlockKind(name=name, layers=tuple(layers), representative=layers[0]))
        stacks.append(
            Stack(fqn=fqn, block_type=block_type.__name__, length=len(blocks), kinds=tuple(kinds))
        )
        taken.append(fqn)
    return tuple(stacks)


# --------------------------------------------------------------------------- tracing


@dataclass
class _RawTrace:
    """A trace in the traced model's own naming, cached and renamed per use."""

    nodes: list[dict[str, Any]]
    edges: list[tuple[str, str, tuple[Any, ...]]]
    signatures: dict[str, tuple[tuple[CallArg, ...], tuple[CallArg, ...]]]
    call_counts: dict[str, int]


_TRACE_CACHE: OrderedDict[Any, _RawTrace] = OrderedDict()
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
        with torch.no_grad(), _quiet():
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


def _raw_trace(model: nn.Module, batch: int, seq_len: int) -> _RawTrace:
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
    signatures: dict[str, tuple[tuple[CallArg, ...], tuple[CallArg, ...]]] = {}
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
    return _RawTrace(nodes=nodes, edges=edges, signatures=signatures, call_counts=counts)


def _cached_raw_trace(model: nn.Module, key: Any, batch: int, seq_len: int) -> _RawTrace:
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


def _trace_key(model: nn.Module, batch: int, seq_len: int) -> Any:
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


# --------------------------------------------------------------------------- building


def _renamer(stack: Stack | None, layers: tuple[int, ...]) -> Any:
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
            n: _shape(p) for n, p in a.named_parameters(recurse=False)
        } != {n: _shape(p) for n, p in b.named_parameters(recurse=False)}:
            return False
    for j, i in enumerate(layers):
        a = full_mods.get(f"{stack.fqn}.{i}")
        b = red_mods.get(f"{stack.fqn}.{j}")
        if a is None or b is None or rename(f"{stack.fqn}.{j}") != f"{stack.fqn}.{i}":
            return False
        if _block_structure(a) != _block_structure(b) or _block_settings(a) != _block_settings(b):
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
    stacks = _find_stacks(full, config)
    modules = _module_infos(full, config, stacks)
    parameters = {n: _shape(p) for n, p in full.named_parameters(remove_duplicate=False)}
    tied = _tied_groups(full)

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

    dataflow = nx.DiGraph()
    trace_error: str | None = None
    raw: _RawTrace | None = None
    try:
        key = _trace_key(traced_model, batch, seq_len) if src.module is None else None
        raw = _cached_raw_trace(traced_model, key, batch, seq_len)
    except Exception as exc:
        first = " ".join(str(exc).split("\n", 3)[:3]).strip()
        trace_error = f"torch.export failed for {src.name}: {type(exc).__name__}: {first}"
        if not allow_untraced:
            raise GraphError(trace_error) from None

    graph = ModelGraph(
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
    )
    if raw is None:
        return graph

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
            graph._members.setdefault(m, []).append(nid)
    for src_name, dst, positions in raw.edges:
        dataflow.add_edge(node_id(src_name), node_id(dst), positions=positions)
    graph._signatures = {
        rename(k): (
            tuple(CallArg(node_id(a.node), a.name) for a in ins),
            tuple(CallArg(node_id(a.node), a.name) for a in outs),
        )
        for k, (ins, outs) in raw.signatures.items()
    }
    graph._call_counts = {rename(k): v for k, v in raw.call_counts.items()}
    return graph
