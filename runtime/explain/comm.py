"""Communication of one training step, per rank: which collectives, over which mesh
dimension, how many bytes.

Sources, in order of trust:

- Tensor / sequence parallel, loss parallel and the gradient all-reduce of replicated
  parameters are *counted*: `CommCounter` sees every collective DTensor issues while
  `runtime.explain.trace.trace_step` runs one forward + backward of the reduced model on fake
  tensors (activation checkpointing included, so recomputed collectives are counted).
  Collectives inside a block are multiplied by the number of layers the block stands
  for.
- FSDP2 is *derived* from the measured unit sizes, as FSDP2 issues it: per unit with
  parameters, one all-gather in forward (padded unsharded size, in the mixed-precision
  `param` dtype; an NF4 base as its codes, scalers and scales) and one more in backward
  when the unit reshards after forward; one reduce-scatter of the gradients in backward
  (in the `reduce` dtype, else the compute dtype); with HSDP (two mesh names) one
  all-reduce of the sharded gradients over the replicate dimension — even when that
  dimension has a single rank. Only parameters that require a gradient are reduced (a
  unit of frozen parameters reduces nothing). A shard group of one rank all-gathers and
  reduce-scatters nothing.
- Context parallelism is *derived* from the attention shapes, as `runtime.parallel.context` issues it:
  per attention layer, `rotate = allgather` all-gathers the stacked local K and V once
  in forward (again in backward when the layer is checkpointed) and reduce-scatters their
  gradients once in backward; `rotate = ring` shifts the stacked K/V block to the next
  rank cp − 1 times in forward (again when recomputed) and shifts the gradients back
  cp − 1 times in backward (each shift an `all_to_all_single` with one peer, reported as
  `send_recv`). The real-run test checks these counts and bytes.
- Expert parallelism is *derived* from the tokens per rank and the experts' shapes
  (`runtime.explain.experts`): its all-to-alls (counts, rows and results, both ways)
  under balanced routing, the `ep` rows; the experts' own FSDP units over `efsdp`.

`bytes` is the size of the collective's unsharded tensor — the all-gather output, the
reduce-scatter input, the all-reduce tensor (what `torch`'s `CommDebugMode` sees as the
operands); `wire_bytes` what a ring algorithm sends per rank: (n-1)/n of it for
all-gather, reduce-scatter and all-to-all, 2(n-1)/n for all-reduce.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.tensor import DTensor, Partial
from torch.utils._python_dispatch import TorchDispatchMode

from meshplan.planner.program import (
    Checkpoint,
    ContextParallel,
    FullyShard,
    MeshLayout,
    Parallelize,
    Program,
)

from ..parallel.apply import DTYPES
from ..parallel.mesh import MeshError, submesh
from .reduction import Reduction, inside
from .world import clean_name

if TYPE_CHECKING:
    from torch import nn
    from torch.distributed.device_mesh import DeviceMesh

    from .shards import ParamShard

__all__ = ["CommCounter", "CommEvent", "CommRow", "Unit", "cp_events", "fsdp_events", "fsdp_units",
           "group_names", "summarize"]

KINDS = ("fsdp", "hsdp", "tp", "loss", "grad", "cp", "ep")
KIND_LABELS = {"fsdp": "FSDP", "hsdp": "HSDP replicate", "tp": "TP/SP", "loss": "loss parallel",
               "grad": "replicated-param grads", "cp": "CP attention", "ep": "experts (balanced)"}
_OPS = {"all_gather_into_tensor": "all_gather", "all_gather_into_tensor_coalesced": "all_gather",
        "reduce_scatter_tensor": "reduce_scatter", "reduce_scatter_tensor_coalesced": "reduce_scatter",
        "all_reduce": "all_reduce", "all_reduce_coalesced": "all_reduce",
        "all_to_all_single": "all_to_all", "broadcast": "broadcast"}


@dataclass(frozen=True)
class CommEvent:
    """One collective on one rank."""

    kind: str  # one of KINDS
    op: str  # all_gather | reduce_scatter | all_reduce | all_to_all | broadcast | send_recv
    dim: str  # mesh dimension or submesh
    group_size: int
    bytes: int  # the unsharded tensor (see the module docstring)
    phase: str  # forward | backward
    layer: int | None = None  # the kept block it happened in (None: outside the blocks)
    # The module whose parameter's gradient it reduces ("grad"; else ""): places the
    # reductions outside the blocks on a pipeline stage (`runtime.explain.stages`).
    module: str = ""

    @property
    def wire_bytes(self) -> int:
        n = self.group_size
        if n <= 1:
            return 0
        if self.op == "all_reduce":
            return 2 * (n - 1) * self.bytes // n
        if self.op in ("send_recv", "broadcast"):
            return self.bytes
        return (n - 1) * self.bytes // n


@dataclass(frozen=True)
class CommRow:
    """Per rank and training step: one (mesh dimension, source, collective)."""

    dim: str
    kind: str
    op: str
    group_size: int
    count: int
    bytes: int
    wire_bytes: int
    forward: int  # how many of `count` run in forward
    backward: int


def group_names(mesh: DeviceMesh, layout: MeshLayout) -> dict[str, tuple[str, int]]:
    """Process-group name → (mesh dimension or submesh, size) for the rank's groups."""
    out: dict[str, tuple[str, int]] = {}
    names = list(mesh.mesh_dim_names or ()) + [n for n, _ in layout.submeshes]
    for name in names:
        try:
            sub = submesh(mesh, (name,))
            group = sub.get_group()
        except (MeshError, KeyError, RuntimeError, ValueError):
            continue
        out.setdefault(group.group_name, (name, sub.size()))
    return out


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, list | tuple):
        return [t for v in x for t in _tensors(v)]
    return []


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class CommCounter(TorchDispatchMode):
    """Records every functional collective (what DTensor issues) with its bytes, mesh
    dimension, phase and the kept block it ran in."""

    def __init__(self, groups: dict[str, tuple[str, int]], reduction: Reduction | None = None) -> None:
        super().__init__()
        from torch.distributed._tools.mod_tracker import ModTracker

        self.groups = groups
        self.reduction = reduction
        self.events: list[CommEvent] = []
        self.tracker = ModTracker()
        self.current: int | None = None  # the block running (see `watch`)

    def __enter__(self) -> CommCounter:
        self.tracker.__enter__()
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.tracker.__exit__(*exc)

    def watch(self, blocks: Iterable[nn.Module], layers: Sequence[int]) -> list[Any]:
        """Attribute collectives to blocks: in forward between a block's pre- and post-hook,
        in backward from the gradient of its output to the gradient of its input (module
        trackers keep stale entries in backward; tensor hooks do not). Returns the handles."""
        handles: list[Any] = []

        def in_backward() -> bool:
            return bool(torch._C._current_graph_task_id() != -1)

        def first_tensor(x: Any) -> torch.Tensor | None:
            if isinstance(x, torch.Tensor):
                return x
            if isinstance(x, tuple | list) and x and isinstance(x[0], torch.Tensor):
                return x[0]
            return getattr(x, "last_hidden_state", None)

        for block, layer in zip(blocks, layers, strict=True):

            def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                    layer: int = layer) -> None:
                if in_backward():
                    return  # a checkpointed block recomputing: still inside its backward
                self.current = layer
                x = first_tensor(args) if args else kwargs.get("hidden_states")
                if isinstance(x, torch.Tensor) and x.requires_grad:
                    x.register_hook(lambda g, layer=layer: self._leave(layer))

            def post(module: nn.Module, args: Any, output: Any, layer: int = layer) -> None:
                if in_backward():
                    return
                self.current = None
                y = first_tensor(output)
                if isinstance(y, torch.Tensor) and y.requires_grad:
                    y.register_hook(lambda g, layer=layer: self._enter(layer))

            handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(block.register_forward_hook(post))
        return handles

    def _enter(self, layer: int) -> None:
        self.current = layer

    def _leave(self, layer: int) -> None:
        if self.current == layer:
            self.current = None

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if any(t is DTensor for t in types):
            return NotImplemented  # let DTensor turn the op into local ops and collectives
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(getattr(func, "_overloadpacket", None), "__name__", "")
        namespace = getattr(func, "namespace", "")
        if namespace in ("_c10d_functional", "c10d_functional", "_c10d_functional_autograd") and name in _OPS:
            group = next((a for a in reversed([*args, *kwargs.values()]) if isinstance(a, str)), "")
            dim, size = self.groups.get(group, (group or "?", 0))
            op = _OPS[name]
            tensors = _tensors(args[0]) if args else []
            payload = sum(_nbytes(t) for t in tensors)
            if op == "all_gather":
                payload *= size
            # Outside every module: the loss (vocabulary-parallel cross-entropy).
            kind = "loss" if self.tracker.parents == {"Global"} else "tp"
            self.events.append(CommEvent(kind=kind, op=op, dim=dim, group_size=size, bytes=payload,
                                         phase="backward" if self.tracker.is_bw else "forward",
                                         layer=self.current))
        return out

    def grad_reductions(self, model: nn.Module) -> None:
        """Gradients left `Partial` (replicated parameters such as sequence-parallel norm
        weights) are all-reduced before the optimizer uses them (FSDP2 does it in its
        post-backward): one all-reduce each, in the gradient's dtype."""
        mesh_names = {v[0]: v for v in self.groups.values()}
        for name, p in model.named_parameters():
            grad = p.grad
            if not isinstance(grad, DTensor):
                continue
            dims = grad.device_mesh.mesh_dim_names or ()
            for dim, placement in zip(dims, grad.placements, strict=True):
                if isinstance(placement, Partial):
                    fqn = clean_name(name)
                    layer = None
                    if self.reduction is not None and self.reduction.reduced:
                        found = self.reduction.split(fqn)
                        layer = self.reduction.kept[found[0]] if found else None
                    size = mesh_names.get(dim, (dim, grad.device_mesh.size()))[1]
                    self.events.append(CommEvent(kind="grad", op="all_reduce", dim=dim, group_size=size,
                                                 bytes=_nbytes(grad._local_tensor), phase="backward",
                                                 layer=layer, module=fqn.rpartition(".")[0]))


# --------------------------------------------------------------------------- FSDP


@dataclass(frozen=True)
class Unit:
    """One FSDP unit of the full model (one `fully_shard` call)."""

    index: int  # position among the Program's FullyShard steps
    label: str  # "model.layers.3", "model.embed_tokens, lm_head", "root"
    step: FullyShard
    params: tuple[str, ...]  # full-model fqns it manages
    layer: int | None  # the stack layer it is, if it is one block


def fsdp_units(program: Program, parameters: Iterable[str], reduction: Reduction) -> list[Unit]:
    """The units in step order, each with the parameters it manages: a parameter belongs
    to the innermost unit holding its module (FSDP2 skips parameters an inner unit took)."""
    steps = list(program.steps_of(FullyShard))
    owned: dict[int, list[str]] = {i: [] for i in range(len(steps))}
    unit_of: dict[str, int] = {}  # a unit's root module → its step (the first, if named twice)
    for i, step in enumerate(steps):
        for root in step.fqns or ("",):
            unit_of.setdefault(root, i)
    for fqn in parameters:
        # The innermost unit: the module's nearest ancestor (itself included) that is a root.
        module = fqn.rsplit(".", 1)[0] if "." in fqn else ""
        parts = module.split(".") if module else []
        for end in range(len(parts), -1, -1):
            unit = unit_of.get(".".join(parts[:end]))
            if unit is not None:
                owned[unit].append(fqn)
                break
    units = []
    for i, step in enumerate(steps):
        label = ", ".join(step.fqns) if step.fqns else "root"
        layers = {reduction.layer_of(f) for f in step.fqns}
        layer = layers.pop() if len(layers) == 1 and len(step.fqns) == 1 else None
        if layer is not None and step.fqns[0] != f"{reduction.stack}.{layer}":
            layer = None
        units.append(Unit(index=i, label=label, step=step, params=tuple(owned[i]), layer=layer))
    return units


def unit_numels(unit: Unit, shards: dict[str, ParamShard], reduction: Reduction) -> tuple[int, int, int]:
    """(padded unsharded numel, padded sharded numel, local numel) of a unit on one rank."""
    unsharded = sharded = local = 0
    for fqn in unit.params:
        shard = shards.get(reduction.representative(fqn))
        if shard is None:
            continue
        unsharded += shard.unsharded_numel
        sharded += shard.storage_numel
        local += shard.local_numel
    return unsharded, sharded, local


def compute_dtype(step: FullyShard | None, storage: str) -> str:
    """The dtype forward/backward compute in: mixed precision's `param`, else storage."""
    if step is not None and step.mixed_precision is not None and step.mixed_precision.param:
        return step.mixed_precision.param
    return storage


def reduce_dtype(step: FullyShard, storage: str) -> str:
    mp = step.mixed_precision
    if mp is not None and mp.reduce:
        return mp.reduce
    return compute_dtype(step, storage)


def itemsize(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


def fsdp_events(program: Program, units: list[Unit], shards: dict[str, ParamShard],
                reduction: Reduction, storage: str) -> list[CommEvent]:
    """FSDP2's collectives per step, one rank (see the module docstring)."""
    events: list[CommEvent] = []
    for unit in units:
        _, sharded, _ = unit_numels(unit, shards, reduction)
        if not unit.params or not sharded:
            continue
        step = unit.step
        shard_dim = step.mesh_dims[-1]
        n = program.mesh.size(shard_dim)
        held = [s for s in (shards.get(reduction.representative(f)) for f in unit.params) if s is not None]
        gather = sum(s.gathered_bytes(itemsize(compute_dtype(step, storage))) for s in held)
        # FSDP2 reduces the gradients it has: none of a frozen parameter's.
        trainable = [s for s in held if s.requires_grad]
        reduce = itemsize(reduce_dtype(step, storage))
        if n > 1:
            events.append(CommEvent(kind="fsdp", op="all_gather", dim=shard_dim, group_size=n,
                                    bytes=gather, phase="forward", layer=unit.layer))
            if step.reshard_after_forward is not False:
                events.append(CommEvent(kind="fsdp", op="all_gather", dim=shard_dim, group_size=n,
                                        bytes=gather, phase="backward", layer=unit.layer))
            if trainable:
                events.append(CommEvent(kind="fsdp", op="reduce_scatter", dim=shard_dim, group_size=n,
                                        bytes=sum(s.unsharded_numel for s in trainable) * reduce,
                                        phase="backward", layer=unit.layer))
        if len(step.mesh_dims) == 2 and trainable:
            replicate = step.mesh_dims[0]
            events.append(CommEvent(kind="hsdp", op="all_reduce", dim=replicate,
                                    group_size=program.mesh.size(replicate),
                                    bytes=sum(s.storage_numel for s in trainable) * reduce, phase="backward",
                                    layer=unit.layer))
    return events


# --------------------------------------------------------------------------- context parallel


def cp_events(program: Program, graph: Any, reduction: Reduction, *, seq_len: int, micro_batch: int,
              dtype: str) -> list[CommEvent]:
    """Context-parallel collectives per kept block (see the module docstring)."""
    events: list[CommEvent] = []
    size = itemsize(dtype)
    checkpointed = [s.fqn for s in program.steps_of(Checkpoint) if s.fqn]
    for step in program.steps_of(ContextParallel):
        n = program.mesh.size(step.mesh_dim)
        if n <= 1:
            continue
        seen: set[str] = set()
        for fqn in step.fqns:
            rep = reduction.representative(fqn)
            if rep in seen:
                continue
            seen.add(rep)
            info = graph.module(fqn).attrs
            kv = int(info.get("num_kv_heads") or info.get("num_heads") or 1)
            head_dim = int(info.get("head_dim") or 1)
            layer = reduction.layer_of(rep)
            block = f"{reduction.stack}.{layer}" if layer is not None else ""
            tp = next((program.mesh.size(s.mesh_dim) for s in program.steps_of(Parallelize)
                       if s.fqn == block), 1)
            # K and V stacked, of every context-parallel rank: [2, B, kv/tp, seq_len, head_dim].
            full = 2 * micro_batch * max(1, kv // tp) * seq_len * head_dim * size
            recompute = any(inside(fqn, c) for c in checkpointed)

            def add(op: str, phase: str, nbytes: int, times: int, dim: str = step.mesh_dim,
                    n: int = n, layer: int | None = layer) -> None:
                events.extend([CommEvent(kind="cp", op=op, dim=dim, group_size=n, bytes=nbytes,
                                         phase=phase, layer=layer)] * times)

            if step.rotate == "allgather":
                add("all_gather", "forward", full, 1)
                add("all_gather", "backward", full, 1 if recompute else 0)
                add("reduce_scatter", "backward", full, 1)
            else:  # ring: the local block (1/n of it) travels n - 1 times each way
                add("send_recv", "forward", full // n, n - 1)
                add("send_recv", "backward", full // n, (n - 1) * (2 if recompute else 1))
    return events


# --------------------------------------------------------------------------- totals


def summarize(events: Iterable[CommEvent], reduction: Reduction) -> list[CommRow]:
    """Per-rank totals of one step by (dimension, source, collective); events inside a kept
    block count once per layer it stands for."""
    rows: dict[tuple[str, str, str], dict[str, int]] = {}
    for e in events:
        times = reduction.count(e.layer) if e.layer is not None and reduction.reduced else 1
        row = rows.setdefault((e.dim, e.kind, e.op), {"n": e.group_size, "count": 0, "bytes": 0,
                                                        "wire": 0, "fw": 0, "bw": 0})
        row["count"] += times
        row["bytes"] += times * e.bytes
        row["wire"] += times * e.wire_bytes
        row["fw" if e.phase == "forward" else "bw"] += times
    order = {k: i for i, k in enumerate(KINDS)}
    out = [CommRow(dim=d, kind=k, op=o, group_size=v["n"], count=v["count"], bytes=v["bytes"],
                   wire_bytes=v["wire"], forward=v["fw"], backward=v["bw"])
           for (d, k, o), v in rows.items()]
    out.sort(key=lambda r: (order.get(r.kind, 99), r.dim, r.op))
    return out


def total_bytes(rows: Iterable[CommRow]) -> int:
    return sum(r.bytes for r in rows)
