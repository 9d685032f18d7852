"""Expert parallelism per rank: the memory of its experts and the exchanges of one step.

Memory (exact, from the dry run's shards): the rank's E/ep experts of every MoE layer
(`gate_up_proj`, `down_proj`) as the experts' own FSDP unit over `efsdp` leaves them —
the padded shard of each, its gradient when it trains, AdamW's two states of its local
shard (as `runtime.explain.memory` counts every parameter).

Exchanges (derived, as `runtime.parallel.experts` issues them, per MoE layer and rank;
T tokens per rank = seq_len / cp × micro-batch, of which the rank routes its slice
T/d when d ranks of its ep group hold the same tokens; A = that slice × top-k
assignment rows of H values):

- all-to-all: the per-expert counts (E int64, forward), then the rows (`dispatch`:
  the rank's A rows to the experts' ranks) and the results back (`combine`: the rows it
  received); backward runs both in reverse (the gradient of what was received is sent
  back, and so on); a checkpointed MoE layer runs the forward exchanges again;
- all-gather (`dispatch = allgather`): counts and rows to every rank of the group
  (ep·A rows in, whatever the routing), results summed back the same way;
- token replicas (d > 1): the outputs gathered over the replicas in forward, the input
  gradients in backward (all-gathers made of all-to-alls).

Routing decides how many rows each rank receives. `balanced`: every expert receives
tokens·k / E of every rank's assignments (each rank receives what it sends).
`worst`: every token of every rank of the ep group routed to the experts of one rank —
the figures of that rank, which receives and returns the rows of the whole group. Per
exchange: `bytes` is the tensor the rank hands the collective (what comm.py calls a
collective's bytes), `sent` what of it leaves for other ranks, `received` what arrives.
The balanced exchanges are also the `ep` rows of the communication table; the experts'
FSDP unit is accounted over `efsdp` (`expert_units`, `expert_fsdp_events`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meshplan.planner.program import Checkpoint, ExpertParallel, FullyShard, Program

from ..parallel.apply import DTYPES
from ..parallel.experts import EXPERT_PARAMS
from .comm import CommEvent, Unit, compute_dtype, itemsize, reduce_dtype
from .memory import training_bytes
from .reduction import Reduction, inside

if TYPE_CHECKING:
    from .shards import ParamShard

__all__ = ["ExpertExchange", "ExpertFigures", "ExpertMemory", "Traffic", "dense_parameters", "expert_events",
           "expert_figures", "expert_fsdp_events", "expert_step", "expert_units"]

COUNT_ITEMSIZE = 8  # the per-expert counts travel as int64


def expert_step(program: Program) -> ExpertParallel | None:
    return next(iter(program.steps_of(ExpertParallel)), None)


def _is_expert(fqn: str, step: ExpertParallel) -> bool:
    module, _, name = fqn.rpartition(".")
    return name in EXPERT_PARAMS and module in step.fqns


def dense_parameters(program: Program, parameters: Sequence[str]) -> list[str]:
    """The parameters the plan's FSDP units manage: all but the experts', which their own
    unit over efsdp holds (FSDP2 leaves an inner unit's parameters to it)."""
    step = expert_step(program)
    return list(parameters) if step is None else [p for p in parameters if not _is_expert(p, step)]


def _efsdp_dims(step: ExpertParallel) -> tuple[str, ...]:
    return ("dp_replicate", "efsdp") if step.hsdp else ("efsdp",)


def expert_units(program: Program, parameters: Sequence[str], reduction: Reduction, start: int) -> list[Unit]:
    """The experts' own FSDP units (one per MoE layer, over efsdp), numbered from
    `start`, as the memory and the units table count them."""
    step = expert_step(program)
    if step is None or not step.fsdp:
        return []
    units = []
    for i, fqn in enumerate(step.fqns):
        unit_step = FullyShard(fqns=(fqn,), mesh_dims=_efsdp_dims(step),
                               reshard_after_forward=step.reshard_after_forward,
                               mixed_precision=step.mixed_precision, span=step.span)
        params = tuple(f"{fqn}.{name}" for name in EXPERT_PARAMS if f"{fqn}.{name}" in parameters)
        units.append(Unit(index=start + i, label=fqn, step=unit_step, params=params,
                          layer=reduction.layer_of(fqn)))
    return units


def _sizes(program: Program, step: ExpertParallel) -> tuple[int, int, int]:
    """(ep, efsdp, token replicas d)."""
    ep = step.size
    pool = math.prod(program.mesh.size(d) for d in ("dp_shard", "cp", "tp"))
    replicated = math.prod(program.mesh.size(d) for d in step.replicas)
    return ep, pool // ep, min(ep, replicated) if replicated > 1 else 1


def expert_fsdp_events(program: Program, units: list[Unit], shards: dict[str, ParamShard],
                       reduction: Reduction, storage: str) -> list[CommEvent]:
    """The experts' units' collectives (as `comm.fsdp_events` counts FSDP2's), over efsdp."""
    step = expert_step(program)
    if step is None:
        return []
    _, efsdp, _ = _sizes(program, step)
    events: list[CommEvent] = []
    for unit in units:
        held = [s for s in (shards.get(reduction.representative(f)) for f in unit.params) if s is not None]
        trainable = [s for s in held if s.requires_grad]
        gather = sum(s.gathered_bytes(itemsize(compute_dtype(unit.step, storage))) for s in held)
        reduce = itemsize(reduce_dtype(unit.step, storage))
        if efsdp > 1 and held:
            events.append(CommEvent(kind="fsdp", op="all_gather", dim="efsdp", group_size=efsdp, bytes=gather,
                                    phase="forward", layer=unit.layer))
            if unit.step.reshard_after_forward is not False:
                events.append(CommEvent(kind="fsdp", op="all_gather", dim="efsdp", group_size=efsdp,
                                        bytes=gather, phase="backward", layer=unit.layer))
            if trainable:
                events.append(CommEvent(kind="fsdp", op="reduce_scatter", dim="efsdp", group_size=efsdp,
                                        bytes=sum(s.unsharded_numel for s in trainable) * reduce,
                                        phase="backward", layer=unit.layer))
        if step.hsdp and trainable:
            events.append(CommEvent(kind="hsdp", op="all_reduce", dim="dp_replicate",
                                    group_size=program.mesh.size("dp_replicate"),
                                    bytes=sum(s.storage_numel for s in trainable) * reduce, phase="backward",
                                    layer=unit.layer))
    return events


# --------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class ExpertMemory:
    """The rank's experts, every MoE layer together (bytes)."""

    parameters: int
    gradients: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer

    def to_json(self) -> dict[str, int]:
        return {"parameters_bytes": self.parameters, "gradients_bytes": self.gradients,
                "optimizer_bytes": self.optimizer, "total_bytes": self.total}


@dataclass(frozen=True)
class Traffic:
    """One exchange on one rank: the tensor it hands the collective, what of it leaves
    for other ranks, what arrives from them (bytes)."""

    bytes: int
    sent: int
    received: int

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(self.bytes + other.bytes, self.sent + other.sent, self.received + other.received)

    def times(self, n: int) -> Traffic:
        return Traffic(self.bytes * n, self.sent * n, self.received * n)

    def to_json(self) -> dict[str, int]:
        return {"bytes": self.bytes, "sent_bytes": self.sent, "received_bytes": self.received}


NOTHING = Traffic(0, 0, 0)


@dataclass(frozen=True)
class ExpertExchange:
    """One exchange of one MoE layer, per rank, and how often a step runs it."""

    what: str  # counts | dispatch | combine | replicas
    op: str  # all_to_all | all_gather
    phase: str  # forward | backward (recomputed forwards are in backward)
    dim: str  # ep, or the replica group
    group_size: int
    per_step: int  # MoE layers × (1, or 2 for a recomputed forward)
    balanced: Traffic  # per call
    worst: Traffic

    def to_json(self) -> dict[str, Any]:
        return {"exchange": self.what, "op": self.op, "phase": self.phase, "dim": self.dim,
                "group_size": self.group_size, "count": self.per_step,
                "balanced": self.balanced.times(self.per_step).to_json(),
                "worst": self.worst.times(self.per_step).to_json()}


@dataclass(frozen=True)
class ExpertFigures:
    """Expert parallelism as one rank sees it: its experts' memory, one step's exchanges."""

    rank: int
    ep: int
    efsdp: int
    replicas: int  # d: ranks of the ep group holding the same tokens
    dispatch: str
    experts: int  # E per layer
    local_experts: int  # E / ep on this rank
    layers: int  # MoE layers
    top_k: int
    tokens: int  # tokens per rank and micro-batch (after the context-parallel split)
    routed: int  # of which this rank routes (its replica slice)
    memory: ExpertMemory
    exchanges: tuple[ExpertExchange, ...]

    def total(self, which: str, replicas: bool | None = None) -> Traffic:
        """One step's exchanges (`balanced` or `worst`): all of them, or only the token
        replicas' gathers (`replicas=True`), or all but those (False)."""
        out = NOTHING
        for x in self.exchanges:
            if replicas is None or replicas == x.what.startswith("replicas"):
                out = out + (x.balanced if which == "balanced" else x.worst).times(x.per_step)
        return out

    def events(self, layers: dict[int | None, int]) -> list[CommEvent]:
        """The balanced exchanges as communication-table events: `layers` maps a kept MoE
        block to its calls (1: `summarize` counts it for every layer it stands for), or
        None to the MoE layers when the model is not reduced."""
        return [CommEvent(kind="ep", op=x.op, dim=x.dim, group_size=x.group_size, bytes=x.balanced.bytes,
                          phase=x.phase, layer=layer)
                for x in self.exchanges for layer, times in layers.items() for _ in range(times)]

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "ep": self.ep, "efsdp": self.efsdp, "token_replicas": self.replicas,
                "dispatch": self.dispatch, "experts": self.experts, "local_experts": self.local_experts,
                "moe_layers": self.layers, "top_k": self.top_k, "tokens_per_rank": self.tokens,
                "routed_tokens": self.routed, "memory": self.memory.to_json(),
                "exchanges": [x.to_json() for x in self.exchanges],
                "balanced": self.total("balanced").to_json(), "worst": self.total("worst").to_json()}


def expert_memory(step: ExpertParallel, parameters: Sequence[str], shards: dict[str, ParamShard],
                  reduction: Reduction) -> ExpertMemory:
    return ExpertMemory(*training_bytes(shards, [f for f in parameters if _is_expert(f, step)], reduction))


def _split(n: int, parts: int) -> list[int]:
    """`n` rows cut as `torch.tensor_split` cuts them (the first pieces one longer)."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def _recomputed(program: Program, step: ExpertParallel) -> bool:
    """Does a checkpoint recompute the experts' forward (its exchanges) in backward?"""
    checkpointed = [s.fqn for s in program.steps_of(Checkpoint) if s.fqn]
    return any(inside(step.fqns[0], c) for c in checkpointed)


def expert_figures(program: Program, shards: dict[str, ParamShard], parameters: Sequence[str],
                   reduction: Reduction, *, rank: int, tokens: int, top_k: int, rows_dtype: str,
                   storage: str) -> ExpertFigures | None:
    """The figures of `rank` (see the module docstring); `shards` are its class's,
    `tokens` its tokens per micro-batch, `rows_dtype` the dtype of the MoE block's
    hidden states (the compute dtype). None without expert parallelism."""
    step = expert_step(program)
    if step is None:
        return None
    ep, efsdp, d = _sizes(program, step)
    sample = shards.get(reduction.representative(f"{step.fqns[0]}.{EXPERT_PARAMS[0]}"))
    if sample is None:
        return None
    experts, hidden = sample.global_shape[0], sample.global_shape[-1]
    names = {str(v): k for k, v in DTYPES.items()}
    # The experts compute in their unit's mixed-precision dtype, else in their storage dtype.
    mp = step.mixed_precision
    out_dtype = mp.param if step.fsdp and mp is not None and mp.param else names.get(sample.dtype, storage)
    s_in, s_out = itemsize(rows_dtype), itemsize(out_dtype)
    ep_rank = rank % ep  # the expert mesh is (…, efsdp, ep) over the pool, ep innermost
    slices = _split(tokens, d)
    assigned = [slices[s % d] * top_k for s in range(ep)]  # rows each rank of the ep group routes
    mine, group = assigned[ep_rank], sum(assigned)
    others = group - mine
    layers = len(step.fqns)
    recomputed = _recomputed(program, step)
    xs: list[ExpertExchange] = []

    def add(what: str, op: str, phase: str, balanced: Traffic, worst: Traffic | None = None,
            dim: str = step.mesh_dim, n: int = ep) -> None:
        xs.append(ExpertExchange(what, op, phase, dim, n, layers, balanced, worst or balanced))
        if phase == "forward" and recomputed:  # the checkpointed forward runs again in backward
            xs.append(ExpertExchange(f"{what} (recomputed)", op, "backward", dim, n, layers, balanced,
                                     worst or balanced))

    row_in, row_out = hidden * s_in, hidden * s_out
    if step.dispatch == "alltoall":
        counts = experts * COUNT_ITEMSIZE
        local = counts // ep
        add("counts", "all_to_all", "forward", Traffic(counts, counts - local, counts - local))
        # Balanced: each rank of the group sends 1/ep of its rows to every rank, itself included.
        recv = group // ep
        add("dispatch", "all_to_all", "forward",
            Traffic(mine * row_in, (mine - mine // ep) * row_in, (recv - mine // ep) * row_in),
            # The hot rank keeps its own rows and receives every other rank's.
            Traffic(mine * row_in, 0, others * row_in))
        add("combine", "all_to_all", "forward",
            Traffic(recv * row_out, (recv - mine // ep) * row_out, (mine - mine // ep) * row_out),
            Traffic(group * row_out, others * row_out, 0))
        add("combine", "all_to_all", "backward",
            Traffic(mine * row_out, (mine - mine // ep) * row_out, (recv - mine // ep) * row_out),
            Traffic(mine * row_out, 0, others * row_out))
        add("dispatch", "all_to_all", "backward",
            Traffic(recv * row_in, (recv - mine // ep) * row_in, (mine - mine // ep) * row_in),
            Traffic(group * row_in, others * row_in, 0))
    else:
        counts = experts * COUNT_ITEMSIZE
        add("counts", "all_gather", "forward", Traffic(ep * counts, (ep - 1) * counts, (ep - 1) * counts))
        add("dispatch", "all_gather", "forward",
            Traffic(ep * mine * row_in, (ep - 1) * mine * row_in, others * row_in))
        add("combine", "all_gather", "forward",
            Traffic(group * row_out, others * row_out, (ep - 1) * mine * row_out))
        add("combine", "all_gather", "backward",
            Traffic(ep * mine * row_out, (ep - 1) * mine * row_out, others * row_out))
        add("dispatch", "all_gather", "backward",
            Traffic(group * row_in, others * row_in, (ep - 1) * mine * row_in))
    if d > 1:
        own = slices[ep_rank % d]
        dim = step.mesh_dim if d == ep else " × ".join(step.replicas)
        rest = tokens - own
        add("replicas", "all_gather", "forward",
            Traffic(d * own * top_k * row_out, (d - 1) * own * top_k * row_out, rest * top_k * row_out), dim=dim, n=d)
        add("replicas", "all_gather", "backward",
            Traffic(d * own * row_in, (d - 1) * own * row_in, rest * row_in), dim=dim, n=d)
    return ExpertFigures(rank=rank, ep=ep, efsdp=efsdp, replicas=d, dispatch=step.dispatch, experts=experts,
                         local_experts=experts // ep, layers=layers, top_k=top_k, tokens=tokens, routed=slices[ep_rank % d],
                         memory=expert_memory(step, parameters, shards, reduction), exchanges=tuple(xs))


def expert_events(figures: ExpertFigures, program: Program, reduction: Reduction) -> list[CommEvent]:
    """The balanced exchanges for the communication table: per kept MoE block, counted by
    `summarize` once for every layer it stands for."""
    step = expert_step(program)
    if step is None:
        return []
    if not reduction.reduced:
        return figures.events({None: figures.layers})
    return figures.events({reduction.layer_of(reduction.representative(f)): 1 for f in step.fqns})
