"""Pipeline stages in the dry run: what each stage, and each pipeline rank, holds and sends.

The dry run keeps one decoder block per kind and applies the Program without its
Pipeline step (it cannot cut real layer indices on the reduced model), so the stages are
accounted for here, from the step itself (`Pipeline.stages`, `.ranks`, `.embed`,
`.head`) and the figures the dry run measured:

- **parameters, gradients, optimizer**: exact, as the dense figures
  (`runtime.explain.memory`): the shards of one class of ranks (FSDP2's padded shards,
  TP's local pieces), summed over the parameters a stage holds: its decoder layers, the
  embedding on the first stage, the final norm and the head on the last (anything else
  on the last, as the compiler counts it for W104). A pipeline rank holds the stages
  the schedule deals it (looped: r, r + pp, …; zbv: r and 2·pp − 1 − r).
- **activations**: per microbatch of a stage, what its layers keep as the plan runs
  them (`BlockActivations.kept` × the stage's layers of that kind), plus what is live
  when its first layer starts (the first stage's embeddings, the other stages' received
  hidden state of the same size, the rotary tables on each: the traced `before`), plus
  on the last stage what the norm, head and loss saved (`outside`: it stays until the
  microbatch's backward). A rank holds several microbatches at once: its peak walks the
  schedule's order of forwards and backwards on that rank, as torch builds it
  (`_actions`): GPipe all m; 1F1B min(m, pp − s) on stage s; interleaved schedules
  their warm-up forwards (torch's `_get_warmup_ops`) spread over the rank's stages in
  rounds; zbv its V-shaped warm-up. Zero-bubble schedules count a microbatch's
  activations as freed at its input-gradient step (their weight-gradient step, later,
  still needs the matmuls' inputs: not modelled). On top, once: the larger of one
  block's forward beyond what it keeps, one checkpointed block recomputed, and on the
  last stage the norm/logits/loss high-water mark (`after`).
- **FSDP buffers, backward temporaries, buffers**: the dense rules
  (`memory.fsdp_buffers`) over the FSDP units restricted to the rank's stages (the root
  unit wraps each stage module); temporaries over the rank's blocks (and the head's on
  the last stage); the model's buffers (the rotary tables) on every stage.
- **FSDP traffic**: `comm.fsdp_events` over the rank's units: under a pipeline a unit
  that keeps its parameters after forward gathers them once per step (at its first
  microbatch) and reduce-scatters once (torch's stages skip the gradient sync until the
  last microbatch); a unit that reshards after forward gathers again per microbatch
  (W105), which is not counted.
- **collectives**: per pipeline rank and step, its FSDP units' (above) and the traced
  tensor-parallel ones of its stages: those of one microbatch's forward and backward,
  times the microbatches, a block's once per layer of the rank's stages, those outside
  the blocks on the first stage when they come before the blocks' forward or after
  their backward (the embedding's), else on the last (norm, head, loss), the all-reduce of gradients left partial once. Context-parallel traffic
  is not split by stage (W205).
- **point-to-point**: per step, each stage boundary between two pipeline ranks carries,
  per microbatch, the hidden state forward (its local tensor as the traced block input
  has it: micro-batch × seq / (cp, and tp under sequence parallelism) × hidden, in the
  compute dtype) with the int64 position ids, and the hidden state's gradient backward;
  zbv's two middle stages sit on one rank and pass it without sending.
- **bubble**: (pp − 1) / (m + pp − 1) for GPipe and 1F1B, (pp − 1) / (v·m + pp − 1) for
  the schedules with v stages per rank (an upper bound for the zero-bubble ones, which
  fill part of it with weight-gradient work).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from meshplan.planner.program import Pipeline, Program

from .comm import CommEvent, CommRow, Unit, fsdp_events
from .memory import BlockActivations, fsdp_buffers
from .reduction import Reduction, inside
from .shards import ParamShard, RankClass
from .trace import BlockTrace, StepTrace

__all__ = ["PipelineFigures", "PipelineRank", "StageFigures", "bubble_fraction", "in_flight_peak",
           "pipeline_figures", "stage_of"]

_POSITION_ITEMSIZE = 8  # position ids travel with the hidden state, int64


@dataclass(frozen=True)
class StageFigures:
    """One stage, on one rank of the class the figures are for; bytes."""

    index: int
    pp_rank: int
    layers: tuple[int, ...]
    parameters: int
    gradients: int
    optimizer: int
    activations_per_microbatch: int
    in_flight: int  # its microbatches held at the rank's peak
    sends_forward: int  # per step, to the next stage (0: the last stage, or one on the same rank)
    sends_backward: int  # per step, to the previous stage

    @property
    def first(self) -> bool:
        return self.index == 0

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.index, "pp_rank": self.pp_rank, "layers": list(self.layers),
                "parameters_bytes": self.parameters, "gradients_bytes": self.gradients,
                "optimizer_bytes": self.optimizer, "activations_per_microbatch_bytes": self.activations_per_microbatch,
                "microbatches_in_flight": self.in_flight, "p2p_forward_bytes": self.sends_forward,
                "p2p_backward_bytes": self.sends_backward}


@dataclass(frozen=True)
class PipelineRank:
    """One pipeline rank (coordinate along pp): its stages and memory; bytes."""

    pp_rank: int
    stages: tuple[int, ...]
    parameters: int
    gradients: int
    optimizer: int
    buffers: int
    activations: int
    fsdp_buffers: int
    temporaries: int
    sends: int  # point-to-point bytes per step, forward and backward
    fsdp_gathered: int = 0  # FSDP all-gather bytes per step of the rank's units (`comm.fsdp_events`)
    fsdp_reduced: int = 0  # FSDP reduce-scatter bytes per step
    collectives: tuple[CommRow, ...] = ()  # per step: the rank's FSDP units, its stages' TP/SP × microbatches

    @property
    def peak(self) -> int:
        return (self.parameters + self.gradients + self.optimizer + self.buffers + self.activations
                + self.fsdp_buffers + self.temporaries)

    def to_json(self) -> dict[str, Any]:
        return {"pp_rank": self.pp_rank, "stages": list(self.stages), "parameters_bytes": self.parameters,
                "gradients_bytes": self.gradients, "optimizer_bytes": self.optimizer,
                "buffers_bytes": self.buffers, "activations_bytes": self.activations,
                "fsdp_buffers_bytes": self.fsdp_buffers, "temporaries_bytes": self.temporaries,
                "peak_bytes": self.peak, "p2p_bytes": self.sends, "fsdp_all_gather_bytes": self.fsdp_gathered,
                "fsdp_reduce_scatter_bytes": self.fsdp_reduced,
                "communication": [{"dim": r.dim, "source": r.kind, "op": r.op, "group_size": r.group_size,
                                   "count": r.count, "bytes": r.bytes, "wire_bytes": r.wire_bytes,
                                   "forward": r.forward, "backward": r.backward} for r in self.collectives]}


@dataclass(frozen=True)
class PipelineFigures:
    """The pipeline of a Program, for the ranks of one class (`rank`: its first rank)."""

    mesh_dim: str
    schedule: str
    pp: int
    microbatches: int
    virtual_stages: int
    micro_batch: int  # sequences per microbatch
    rank: int
    bubble: float
    hidden_bytes: int  # one microbatch's hidden state at a boundary (its gradient is as large)
    position_bytes: int  # one microbatch's position ids
    stages: tuple[StageFigures, ...]
    ranks: tuple[PipelineRank, ...]

    def of_rank(self, pp_rank: int) -> tuple[PipelineRank, list[StageFigures]]:
        held = self.ranks[pp_rank]
        return held, [self.stages[i] for i in held.stages]

    def to_json(self) -> dict[str, Any]:
        return {"mesh_dim": self.mesh_dim, "schedule": self.schedule, "pp": self.pp,
                "microbatches": self.microbatches, "virtual_stages": self.virtual_stages,
                "micro_batch": self.micro_batch, "class_rank": self.rank, "bubble": self.bubble,
                "hidden_bytes_per_microbatch": self.hidden_bytes,
                "position_bytes_per_microbatch": self.position_bytes,
                "stages": [s.to_json() for s in self.stages], "ranks": [r.to_json() for r in self.ranks]}


def bubble_fraction(schedule: str, pp: int, microbatches: int, virtual_stages: int) -> float:
    """The idle share of a step: (pp − 1) / (v·m + pp − 1), v = 1 for GPipe and 1F1B."""
    v = 1 if schedule in ("gpipe", "1f1b") else virtual_stages
    return (pp - 1) / (v * microbatches + pp - 1)


def stage_of(step: Pipeline, fqn: str) -> int:
    """The stage holding a parameter (full-model name)."""
    prefix = step.layers + "."
    last = len(step.stages) - 1
    if fqn.startswith(prefix):
        head = fqn[len(prefix):].split(".", 1)[0]
        if head.isdigit():
            layer = int(head)
            return next(s for s, layers in enumerate(step.stages) if layer in layers)
    if any(inside(fqn, e) for e in step.embed):
        return 0
    return last


def _actions(schedule: str, pp: int, v: int, m: int, rank: int, held: Sequence[int]) -> list[tuple[bool, int]]:
    """The forwards (True) and backwards (False) of one rank, by stage, in torch's order."""
    if schedule == "gpipe":
        return [(True, held[0])] * m + [(False, held[0])] * m
    if schedule == "1f1b":
        warmup = min(m, pp - held[0])
        out = [(True, held[0])] * warmup
        for _ in range(m - warmup):  # one backward, then one forward
            out += [(False, held[0]), (True, held[0])]
        return out + [(False, held[0])] * warmup
    if schedule == "zbv":
        n = max(2 * pp - 1, m)
        c0, c1 = held
        f0 = f1 = 0
        out = []
        for _ in range(2 * (pp - rank) - 1):
            out.append((True, c0))
            f0 += 1
        for _ in range(rank):
            out += [(True, c1), (True, c0)]
            f1, f0 = f1 + 1, f0 + 1
        for _ in range(pp - rank):
            out += [(True, c1), (False, c1)]
            f1 += 1
        while f1 < f0 or f0 < n:
            if f0 < n:
                out.append((True, c0))
                f0 += 1
            out += [(False, c0), (True, c1), (False, c1)]
            f1 += 1
        return out  # the cool-down only frees
    # Interleaved 1F1B and interleaved zero bubble (torch's `_get_warmup_ops`, factor 2 / 1).
    rounds = max(1, m // pp)
    per_round = m // rounds
    factor = 2 if schedule == "interleaved_1f1b" else 1
    warmup = min((v - 1) * per_round + factor * (pp - 1 - rank), m * v)

    def forward(op: int) -> int:
        return ((op // per_round) % v) * pp + rank

    def backward(op: int) -> int:
        return (v - 1 - ((op - warmup) // per_round) % v) * pp + rank

    out = [(True, forward(op)) for op in range(warmup)]
    for op in range(warmup, m * v):
        out += [(True, forward(op)), (False, backward(op))]
    return out + [(False, backward(op)) for op in range(m * v, m * v + warmup)]


def in_flight_peak(schedule: str, pp: int, v: int, m: int, rank: int, held: Sequence[int],
                   per_microbatch: dict[int, int]) -> tuple[int, dict[int, int]]:
    """(peak bytes of activations held, microbatches of each stage held then) on one rank."""
    live = 0
    counts = dict.fromkeys(held, 0)
    peak, at_peak = 0, dict(counts)
    for is_forward, stage in _actions(schedule, pp, v, m, rank, held):
        sign = 1 if is_forward else -1
        live += sign * per_microbatch[stage]
        counts[stage] += sign
        if is_forward and (live > peak or (live == peak and sum(counts.values()) > sum(at_peak.values()))):
            peak, at_peak = live, dict(counts)
    return peak, at_peak


def _stage_units(units: list[Unit], step: Pipeline, stages: Sequence[int]) -> list[Unit]:
    """The FSDP units of a rank's stages: each unit's parameters on those stages; the root
    unit (no modules) once per stage, as it wraps each stage module."""
    out: list[Unit] = []
    for unit in units:
        if unit.step.fqns:
            params = tuple(p for p in unit.params if stage_of(step, p) in stages)
            if params:
                out.append(dataclasses.replace(unit, params=params))
            continue
        for s in stages:
            params = tuple(p for p in unit.params if stage_of(step, p) == s)
            if params:
                out.append(dataclasses.replace(unit, params=params))
    return out


def _collectives(step: Pipeline, reduction: Reduction, held: Sequence[int], fsdp: Sequence[CommEvent],
                 traced: Sequence[CommEvent]) -> tuple[CommRow, ...]:
    """One pipeline rank's collectives per step: its FSDP units' once; the traced ones of its
    stages (one microbatch's forward and backward) once per microbatch, a block's once per
    layer of the rank's stages it stands for, those outside the blocks on the first or the
    last stage by their order (see below); the all-reduce of gradients left partial
    once per step (the gradients of every microbatch are summed first)."""
    layers = {i for s in held for i in step.stages[s]}
    rows: dict[tuple[str, str, str], list[int]] = {}

    def add(e: CommEvent, times: int) -> None:
        if times <= 0:
            return
        row = rows.setdefault((e.dim, e.kind, e.op), [e.group_size, 0, 0, 0, 0, 0])
        row[1] += times
        row[2] += times * e.bytes
        row[3] += times * e.wire_bytes
        row[4 if e.phase == "forward" else 5] += times

    for e in fsdp:
        add(e, 1)
    # A collective outside the blocks belongs to the first stage when it comes before the
    # first block's forward or after the last block's backward (the embedding's), else
    # to the last (norm, head, loss). By order, not by module: a tensor-parallel output
    # hook runs after its module has left, and module trackers keep stale entries in
    # backward.
    in_blocks = [i for i, e in enumerate(traced) if e.layer is not None and e.kind != "grad"]
    forward_blocks = [i for i in in_blocks if traced[i].phase == "forward"]
    backward_blocks = [i for i in in_blocks if traced[i].phase == "backward"]
    first, last = 0, len(step.stages) - 1
    for i, e in enumerate(traced):
        if e.layer is not None:
            n = (sum(1 for j in layers if reduction.represents[j] == e.layer) if reduction.reduced
                 else int(e.layer in layers))
        else:
            if e.kind == "loss":
                stage = last
            elif e.kind == "grad":  # after the backward, named by its parameter's module
                stage = stage_of(step, e.module)
            elif e.phase == "forward":
                stage = first if not forward_blocks or i < forward_blocks[0] else last
            else:
                stage = first if not backward_blocks or i > backward_blocks[-1] else last
            n = int(stage in held)
        add(e, n * (1 if e.kind == "grad" else step.microbatches))
    order = {k: i for i, k in enumerate(("fsdp", "hsdp", "tp", "loss", "grad", "cp"))}
    out = [CommRow(dim=d, kind=k, op=o, group_size=v[0], count=v[1], bytes=v[2], wire_bytes=v[3], forward=v[4],
                   backward=v[5]) for (d, k, o), v in rows.items()]
    return tuple(sorted(out, key=lambda r: (order.get(r.kind, 99), r.dim, r.op)))


def pipeline_figures(program: Program, cls: RankClass, *, parameters: Sequence[str], reduction: Reduction,
                     units: list[Unit], trace: StepTrace | None, blocks: list[BlockActivations],
                     storage: str, buffer_bytes: int, micro_batch: int) -> PipelineFigures | None:
    """Per stage and per pipeline rank, for the ranks of `cls` (see the module docstring);
    None without a Pipeline step that cuts the model (pp > 1)."""
    step = next((s for s in program.steps_of(Pipeline) if program.mesh.size(s.mesh_dim) > 1), None)
    if step is None:
        return None
    pp, m, n = program.mesh.size(step.mesh_dim), step.microbatches, len(step.stages)
    virtual_stages = n // pp
    where = {s: r for r, held in enumerate(step.ranks) for s in held}
    # Parameters, gradients and optimizer states per stage: the dense rules.
    memory = [[0, 0, 0] for _ in range(n)]
    for fqn in parameters:
        shard: ParamShard | None = cls.shards.get(reduction.representative(fqn))
        if shard is None:
            continue
        figures = memory[stage_of(step, fqn)]
        figures[0] += shard.storage_bytes
        if shard.requires_grad:
            figures[1] += shard.storage_bytes
            figures[2] += 2 * shard.local_bytes
    # Activations per microbatch, and the hidden state a boundary carries.
    traced: dict[int, BlockTrace] = trace.blocks if trace is not None else {}
    empty = BlockTrace(0, 0, 0, 0, 0)

    def overlap(b: BlockActivations, s: int) -> int:
        return len(set(b.layers) & set(step.stages[s]))

    per_mb: dict[int, int] = {}
    for s in range(n):
        kept = sum(b.kept * overlap(b, s) for b in blocks)
        per_mb[s] = (trace.before + kept + (trace.outside if s == n - 1 else 0)) if trace is not None else 0
    hidden = max((traced.get(b.layer, empty).boundary for b in blocks), default=0)
    positions = micro_batch * trace.seq_len * _POSITION_ITEMSIZE if trace is not None else 0
    stage_rows = []
    for s in range(n):
        forward = m * (hidden + positions) if s < n - 1 and where[s + 1] != where[s] else 0
        backward = m * hidden if s > 0 and where[s - 1] != where[s] else 0
        stage_rows.append([s, forward, backward])
    rank_rows = []
    counts: dict[int, int] = {}
    for r, held in enumerate(step.ranks):
        peak, at_peak = in_flight_peak(step.schedule, pp, virtual_stages, m, r, held, per_mb)
        counts.update(at_peak)
        mine = [b for b in blocks if any(overlap(b, s) for s in held)]
        last = n - 1 in held
        extra = 0
        if trace is not None:
            extra = max([trace.after if last else 0,
                         *(traced.get(b.layer, empty).transient - b.kept for b in mine),
                         *(traced.get(b.layer, empty).retained - b.kept for b in mine if b.mode)])
        temporaries = max([trace.outside if trace is not None and last else 0, *(b.saved for b in mine)])
        rank_units = _stage_units(units, step, held)
        # Each of the rank's units once (a unit is a full-model one: no scaling by layers).
        events = fsdp_events(program, rank_units, cls.shards, reduction, storage)
        rank_rows.append(PipelineRank(
            pp_rank=r, stages=tuple(held), parameters=sum(memory[s][0] for s in held),
            gradients=sum(memory[s][1] for s in held), optimizer=sum(memory[s][2] for s in held),
            buffers=buffer_bytes, activations=peak + max(extra, 0),
            fsdp_buffers=fsdp_buffers(rank_units, cls.shards, reduction, storage) if rank_units else 0,
            temporaries=temporaries, sends=sum(stage_rows[s][1] + stage_rows[s][2] for s in held),
            fsdp_gathered=sum(e.bytes for e in events if e.kind == "fsdp" and e.op == "all_gather"),
            fsdp_reduced=sum(e.bytes for e in events if e.kind == "fsdp" and e.op == "reduce_scatter"),
            collectives=_collectives(step, reduction, held, events, trace.events if trace is not None else ())))
    stages = tuple(StageFigures(
        index=s, pp_rank=where[s], layers=tuple(step.stages[s]), parameters=memory[s][0],
        gradients=memory[s][1], optimizer=memory[s][2], activations_per_microbatch=per_mb[s],
        in_flight=counts.get(s, 0), sends_forward=stage_rows[s][1], sends_backward=stage_rows[s][2])
        for s in range(n))
    return PipelineFigures(
        mesh_dim=step.mesh_dim, schedule=step.schedule, pp=pp, microbatches=m, virtual_stages=virtual_stages,
        micro_batch=micro_batch, rank=cls.rank, bubble=bubble_fraction(step.schedule, pp, m, virtual_stages),
        hidden_bytes=hidden, position_bytes=positions, stages=stages, ranks=tuple(rank_rows))
