"""Per-rank memory of one training step: what each figure is and how it is obtained.

Exact (from the dry run's shards, as FSDP2 and DTensor allocate them):

- **parameters**: every parameter's storage on this rank, in its dtype as the dry run
  leaves it (the dtype the model is built in: fp32 unless `--param-dtype` says
  otherwise, or an Adapters step's `dtype` for its adapters; FSDP2 keeps sharded
  parameters in it and casts to `mixed_precision.param` only for compute). An
  FSDP-managed parameter costs its *padded* shard (FSDP2 pads every shard to the
  first one's size); other parameters their local (TP) shard. A base weight an
  Adapters step quantises costs its NF4 bytes (`runtime.explain.sizes.nf4_bytes`:
  4 bits a value plus its scalers) — of its shard under FSDP2, which splits it evenly.
- **gradients**: the same sizes as the parameters that require a gradient (FSDP2 writes
  each sharded gradient into the padded reduce-scatter output, cast back to the storage
  dtype); a frozen parameter (every non-adapter one under an Adapters step) has none.
- **optimizer**: AdamW's `exp_avg` and `exp_avg_sq`, two tensors like each trainable
  parameter's local shard (unpadded), in its dtype; AdamW creates no state for a
  parameter that never has a gradient. Its `step` counters are host scalars and not
  counted.
- **buffers**: module buffers (e.g. rotary inverse frequencies), not sharded.

Estimated:

- **activations**: traced on fake tensors (`runtime.explain.trace.trace_step`): one forward
  of the reduced model with the plan's tensor/sequence parallelism applied (so the
  per-rank reductions are the real ones), in the compute dtype, at the plan's sequence
  length (split by context parallelism) and `--micro-batch`, tracking the live bytes of
  every tensor storage the forward creates (DTensor's global-shape shape inference
  excluded) and what autograd saves. Per block: `retained` (live growth across it),
  `transient` (its high-water mark above its entry), its input, and the saved outputs
  of matmuls and attention. A block keeps `retained` without checkpointing, only its
  input with full checkpointing, input + saved matmul/attention outputs with selective
  checkpointing. The estimate is

      live at the first block + Σ per layer what its block keeps
      + max(the final norm / logits / loss high-water mark,
            one block's forward beyond what it keeps,
            one checkpointed block recomputed in backward)

  i.e. the high-water mark of activation memory (the `Activation` category of torch's
  `FSDPMemTracker`, which the tests compare against: within 25 % on the tiny models).
- **FSDP buffers**: unsharded parameters (compute dtype; an NF4 weight gathered as its
  codes, scalers and scales, `nf4_gathered_bytes`) of the units that do not reshard
  after forward — held from their forward to their backward — plus, for the units that
  do reshard, the largest one unsharded twice (the unit computing and the one
  prefetched), plus the largest unit's reduce-scatter input (unsharded gradients of
  its trainable parameters, in the reduce dtype: FSDP2 reduces only parameters with a
  gradient).
- **backward temporaries**: gradients of activations in flight, taken as the largest of
  one block's saved activations and the tensors saved outside the blocks (the logits'
  gradient is as large as their saved fp32 copy).

**peak** = parameters + gradients + optimizer + buffers + activations + FSDP buffers +
backward temporaries: an upper bound of the step's high-water mark (gradients and
activations do not all coexist).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meshplan.planner.program import Checkpoint, Program

from .comm import Unit, compute_dtype, itemsize, reduce_dtype
from .reduction import Reduction
from .shards import ParamShard, RankClass
from .trace import BlockTrace, StepTrace

__all__ = ["BlockActivations", "Memory", "block_activations", "buffer_bytes", "fsdp_buffers", "memory_of"]


@dataclass(frozen=True)
class Memory:
    """One class of ranks; every figure in bytes per rank."""

    rank: int
    count: int
    parameters: int
    gradients: int
    optimizer: int
    buffers: int
    activations: int  # as the plan runs (its checkpointing applied)
    activations_no_ac: int
    fsdp_buffers: int
    temporaries: int

    @property
    def peak(self) -> int:
        return (self.parameters + self.gradients + self.optimizer + self.buffers + self.activations
                + self.fsdp_buffers + self.temporaries)

    def to_json(self) -> dict[str, int]:
        return {"rank": self.rank, "ranks": self.count, "parameters_bytes": self.parameters,
                "gradients_bytes": self.gradients, "optimizer_bytes": self.optimizer,
                "buffers_bytes": self.buffers, "activations_bytes": self.activations,
                "activations_no_ac_bytes": self.activations_no_ac,
                "fsdp_buffers_bytes": self.fsdp_buffers, "temporaries_bytes": self.temporaries,
                "peak_bytes": self.peak}


@dataclass(frozen=True)
class BlockActivations:
    """Activations of the layers one kept block stands for, per layer, on one rank."""

    layer: int  # the kept block (full-model index)
    layers: tuple[int, ...]  # the full-model layers it stands for
    saved: int  # without checkpointing
    kept: int  # as the plan runs them (= saved without checkpointing)
    mode: str | None  # "full" | "selective" | None


def checkpoint_modes(program: Program, reduction: Reduction) -> dict[int, str]:
    """Full-model layer → checkpoint mode, for the layers the Program checkpoints."""
    out: dict[int, str] = {}
    for step in program.steps_of(Checkpoint):
        layer = reduction.layer_of(step.fqn)
        if layer is not None:
            out[layer] = step.mode
    return out


def block_activations(program: Program, reduction: Reduction, trace: StepTrace) -> list[BlockActivations]:
    modes = checkpoint_modes(program, reduction)
    by_kept: dict[tuple[int, str | None], list[int]] = {}
    if reduction.reduced:
        for i, rep in enumerate(reduction.represents):
            by_kept.setdefault((rep, modes.get(i)), []).append(i)
    else:
        for i in trace.blocks:
            by_kept.setdefault((i, modes.get(i)), []).append(i)
    out = []
    for (rep, mode), layers in sorted(by_kept.items(), key=lambda kv: kv[1][0]):
        block = trace.blocks.get(rep, BlockTrace(0, 0, 0, 0, 0))
        out.append(BlockActivations(layer=rep, layers=tuple(layers), saved=block.saved,
                                    kept=_kept(block, mode), mode=mode))
    return out


def _kept(block: BlockTrace, mode: str | None) -> int:
    """What a block keeps alive from its forward to its backward."""
    if mode == "full":
        return block.inputs
    if mode == "selective":
        return min(block.retained, block.inputs + block.selective)
    return block.retained


def _activations(blocks: list[BlockActivations], trace: StepTrace) -> tuple[int, int, int]:
    """(as the plan runs, without checkpointing, backward temporaries)."""
    traced = {b.layer: trace.blocks.get(b.layer, BlockTrace(0, 0, 0, 0, 0)) for b in blocks}
    held = trace.before + sum(b.kept * len(b.layers) for b in blocks)
    # On top of what is held: the final norm, logits and loss; one block's forward; or,
    # in backward, one checkpointed block recomputed.
    extra = max([trace.after, *(traced[b.layer].transient - b.kept for b in blocks),
                 *(traced[b.layer].retained - b.kept for b in blocks if b.mode)])
    no_ac = trace.before + sum(traced[b.layer].retained * len(b.layers) for b in blocks)
    no_ac_extra = max([trace.after, *(traced[b.layer].transient - traced[b.layer].retained for b in blocks)])
    temporaries = max([trace.outside, *(b.saved for b in blocks)])
    return held + max(extra, 0), no_ac + max(no_ac_extra, 0), temporaries


def buffer_bytes(graph: Any, itemsizes: dict[str, int], reduction: Reduction) -> int:
    """Every buffer of the full model, in the dtype its kept counterpart has (else fp32)."""
    total = 0
    for fqn, info in graph.modules.items():
        for name, shape in info.buffers.items():
            full = f"{fqn}.{name}" if fqn else name
            numel = 1
            for s in shape:
                numel *= s
            total += numel * itemsizes.get(reduction.representative(full), 4)
    return total


def training_bytes(shards: Mapping[str, ParamShard], parameters: Iterable[str],
                   reduction: Reduction) -> tuple[int, int, int]:
    """(parameter, gradient, AdamW state) bytes of `parameters` on one rank: its shards'
    storage; a gradient of that size per trainable shard, none for a frozen one; two
    optimizer states of the shard's local size per trainable shard."""
    params = grads = optimizer = 0
    for fqn in parameters:
        shard = shards.get(reduction.representative(fqn))
        if shard is None:
            continue
        params += shard.storage_bytes
        if shard.requires_grad:
            grads += shard.storage_bytes
            optimizer += 2 * shard.local_bytes
    return params, grads, optimizer


def memory_of(cls: RankClass, *, program: Program, parameters: Sequence[str], reduction: Reduction,
              units: list[Unit], trace: StepTrace | None, blocks: list[BlockActivations], storage: str,
              buffer_bytes: int) -> Memory:
    """The memory of one rank class (activations are rank 0's: they do not depend on the
    rank when shards are even, which the compiler requires for sharded activations).
    `parameters`: full-model names of the model's parameters as the Program leaves them
    (`runtime.explain.shards.model_parameters`)."""
    params, grads, optimizer = training_bytes(cls.shards, parameters, reduction)
    activations = no_ac = temporaries = 0
    if trace is not None:
        activations, no_ac, temporaries = _activations(blocks, trace)
    return Memory(rank=cls.rank, count=cls.count, parameters=params, gradients=grads,
                  optimizer=optimizer, buffers=buffer_bytes, activations=activations,
                  activations_no_ac=no_ac, fsdp_buffers=fsdp_buffers(units, cls.shards, reduction, storage),
                  temporaries=temporaries)


def _unit_bytes(unit: Unit, shards: dict[str, ParamShard], reduction: Reduction,
                storage: str) -> tuple[int, int]:
    """(bytes FSDP2 all-gathers, bytes it reduce-scatters) for one unit on one rank."""
    gathered = reduced = 0
    compute, reduce = itemsize(compute_dtype(unit.step, storage)), itemsize(reduce_dtype(unit.step, storage))
    for fqn in unit.params:
        shard = shards.get(reduction.representative(fqn))
        if shard is None or not shard.unsharded_numel:
            continue
        gathered += shard.gathered_bytes(compute)
        if shard.requires_grad:
            reduced += shard.unsharded_numel * reduce
    return gathered, reduced


def fsdp_buffers(units: list[Unit], shards: dict[str, ParamShard], reduction: Reduction, storage: str) -> int:
    """See the module docstring: unsharded units held, in flight, and being reduced."""
    held = 0
    largest = 0
    resharding = 0
    reducing = 0
    for unit in units:
        gathered, reduced = _unit_bytes(unit, shards, reduction, storage)
        if not gathered:
            continue
        if unit.step.reshard_after_forward is False:
            held += gathered
        else:
            resharding += 1
            largest = max(largest, gathered)
        reducing = max(reducing, reduced)
    return held + largest * min(resharding, 2) + reducing
