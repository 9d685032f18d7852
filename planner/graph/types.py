"""The graph's data types: module facts, stacks, dataflow references, module boundaries.

`ModelGraph` is immutable once built (traces are shared through an in-process cache);
`planner.graph.build` makes one, nothing else does.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from ..models import ModelSource


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


Signature = tuple[tuple[CallArg, ...], tuple[CallArg, ...]]


@dataclass(frozen=True)
class Boundaries:
    """Where traced modules sit in the dataflow, the raw material of `ModelGraph.calls`.

    `members`: the dataflow nodes each module (and its submodules) ran, in execution
    order; `signatures`: the named inputs and outputs torch.export recorded for a
    module's call, where it kept them; `call_counts`: how often each module was called.
    All in the full model's naming.
    """

    members: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    signatures: Mapping[str, Signature] = field(default_factory=dict)
    call_counts: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class ModelGraph:
    """A model's module facts and traced dataflow (see `planner.graph`).

    `parameters` maps every parameter fqn (tied aliases included) to its shape;
    `reduced` says whether a copy with one block per kind was traced, `traced_layers`
    which blocks of each stack the trace holds (full-model indices); `config` is the
    transformers config (None for plain modules); `batch`/`seq_len` the traced input.
    Read-only: traces are shared through an in-process cache; `dataflow` is
    never modified after `build_graph` returns.
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
    boundaries: Boundaries = field(default_factory=lambda: Boundaries(), repr=False)
    # Memo of `calls`, filled on first use: derived from the fields above, never set.
    _calls: dict[str, ModuleCall] = field(default_factory=dict, init=False, repr=False)

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
        return self.traced and bool(self.boundaries.members.get(self.representative(fqn)))

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
        inside = self.boundaries.members.get(fqn, ())
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
        sig_in, sig_out = self.boundaries.signatures.get(fqn, ((), ()))
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
            count=self.boundaries.call_counts.get(fqn, 1 if inside else 0),
        )
