"""Derived mesh facts: what the mesh means for data, loss, sharding and the sequence.

One home for the arithmetic that the compiler's passes, `plan explain`, `plan run` and
the training topology all need (as torchtitan's `ParallelDims`):

- the data-parallel dimensions (the `dp` submesh, else dp_replicate × dp_shard): ranks
  that read different batches; tensor- and context-parallel peers read the same ones;
- the loss dimensions (the `loss` submesh, else the data-parallel ones × cp): ranks whose
  tokens make up one global batch;
- the dimensions gradients must be averaged over (dp_replicate, dp_shard, cp), which the
  FSDP mesh must cover;
- the expert dimensions: `ep` is carved out of dp_shard × cp × tp (innermost: an ep group
  takes tp ranks first, which then split their replicated tokens), and the experts' FSDP
  group is the complement (pool / ep ranks);
- pipeline stages per rank (`virtual_stages`, at least one);
- the sequence multiple a training sequence length must divide by: sequence parallelism
  splits it tp ways; context parallelism cuts it into 2·cp chunks (head-tail) or cp;
  both together split each cp rank's seq_len / cp tokens tp ways again.

Nothing here imports torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from meshplan.dsl.errors import Span

if TYPE_CHECKING:
    from meshplan.dsl.spec import PlanSpec

    from .program import MeshLayout, Program

# Dimensions whose ranks hold different data: gradients must be averaged over them.
DATA_PARALLEL: tuple[str, ...] = ("dp_replicate", "dp_shard", "cp")
# The ranks the expert dimension is carved out of (torchtitan: ep divides dp_shard·cp·tp).
EXPERT_POOL: tuple[str, ...] = ("dp_shard", "cp", "tp")


def sequence_multiple(*, sp: int = 1, cp: int = 1, headtail: bool = True) -> int:
    """What a training sequence length must be a multiple of, for sequence parallelism
    over `sp` ranks (1: none) and context parallelism over `cp` ranks (1: none).

    SP alone: sp. CP alone: 2·cp chunks with head-tail balancing, cp without. Both: each
    cp rank holds seq_len / cp tokens, which SP splits sp ways again (cp · sp), and the
    CP chunking still holds.
    """
    if sp < 1 or cp < 1:
        raise ValueError(f"sequence_multiple: sp and cp must be ≥ 1, got {sp} and {cp}")
    chunks = (2 * cp if headtail else cp) if cp > 1 else 1
    return math.lcm(cp * sp, chunks)


def plan_seq_len(spec: PlanSpec) -> tuple[int, Span] | None:
    """The training sequence length a plan declares and where: packing's, else an integer
    `seq_len` param (a boolean is not a length)."""
    if spec.packing is not None:
        return spec.packing.seq_len, spec.packing.span
    value = spec.params.get("seq_len")
    if isinstance(value, int) and not isinstance(value, bool):
        return value, spec.param_spans.get("seq_len", spec.header_span)
    return None


@dataclass(frozen=True)
class MeshFacts:
    """What a concrete mesh layout implies (see the module docstring)."""

    mesh: MeshLayout

    def size(self, name: str) -> int:
        return self.mesh.size(name)

    def product(self, dims: tuple[str, ...]) -> int:
        return math.prod(self.mesh.size(d) for d in dims)

    @property
    def world_size(self) -> int:
        """The ranks the mesh spans: the product of its dimensions, `ep` excepted (the
        expert mesh reuses ranks of dp_shard × cp)."""
        return self.mesh.world_size

    @property
    def dp_dims(self) -> tuple[str, ...]:
        """Ranks that read different batches: the `dp` submesh, else dp_replicate, dp_shard."""
        sub = dict(self.mesh.submeshes).get("dp")
        if sub is not None:
            return sub
        return tuple(d for d in ("dp_replicate", "dp_shard") if d in self.mesh.names)

    @property
    def dp_size(self) -> int:
        return self.product(self.dp_dims)

    @property
    def loss_dims(self) -> tuple[str, ...]:
        """Ranks whose tokens make one global batch: the `loss` submesh, else dp × cp."""
        sub = dict(self.mesh.submeshes).get("loss")
        if sub is not None:
            return sub
        return (*self.dp_dims, *(("cp",) if "cp" in self.mesh.names else ()))

    @property
    def loss_size(self) -> int:
        return self.product(self.loss_dims)

    def fsdp_dims(self, on: tuple[str, ...]) -> tuple[str, ...]:
        """The product dimensions an FSDP mesh `on` (dimension or submesh names) spans."""
        return tuple(d for name in on for d in self.mesh.expand(name))

    def uncovered(self, on: tuple[str, ...]) -> tuple[str, ...]:
        """Data-parallel dimensions with more than one rank that the FSDP mesh `on`
        leaves out: nothing would average gradients over them."""
        covered = set(self.fsdp_dims(on))
        return tuple(d for d in DATA_PARALLEL if self.size(d) > 1 and d not in covered)

    @property
    def ep_pool(self) -> int:
        """The ranks the expert dimension is carved out of (dp_shard × cp × tp)."""
        return self.product(EXPERT_POOL)

    @property
    def ep(self) -> int:
        return self.size("ep")

    @property
    def ep_fsdp(self) -> int:
        """The experts' FSDP group: the complement of ep in dp_shard × cp × tp."""
        return self.ep_pool // self.ep if self.ep_pool % self.ep == 0 else 0

    @property
    def pp(self) -> int:
        return self.size("pp")

    def stages(self, virtual_stages: int = 1) -> int:
        """Pipeline stages in all: pp ranks, `virtual_stages` per rank."""
        if virtual_stages < 1:
            raise ValueError(f"virtual_stages must be ≥ 1, got {virtual_stages}")
        return self.pp * virtual_stages

    def sequence_multiple(self, *, sp_on: str | None = None, cp_on: str | None = None,
                          headtail: bool = True) -> int:
        """`sequence_multiple` for SP over `sp_on` and CP over `cp_on` on this mesh."""
        return sequence_multiple(sp=self.size(sp_on) if sp_on else 1, cp=self.size(cp_on) if cp_on else 1,
                                 headtail=headtail)


def program_sequence_multiple(program: Program) -> int:
    """What a training sequence length must divide by for a compiled Program: its
    sequence parallelism (a style that shards the sequence) and context split."""
    from .program import ContextParallel, Parallelize

    facts = MeshFacts(program.mesh)
    sp_on = next((s.mesh_dim for s in program.steps_of(Parallelize)
                  if any(c.shards_sequence for _, c in s.plan)), None)
    cp = next((s for s in program.steps_of(ContextParallel) if facts.size(s.mesh_dim) > 1), None)
    return facts.sequence_multiple(sp_on=sp_on, cp_on=cp.mesh_dim if cp else None,
                                   headtail=cp is None or cp.load_balance == "headtail")
