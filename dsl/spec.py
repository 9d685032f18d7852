"""The checked plan: what `dsl.checks` makes of a syntax tree.

Typed, with `param`s and `--set` overrides substituted and defaults filled in, so the
planner never looks at raw syntax. Spans are kept on everything a later error may need
to point at. Nothing here imports torch: placements and dtypes are plain names that the
planner and the runtime map to torch objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from .errors import NOWHERE, Span

# The mesh dimensions a plan may declare, in the one order it must declare them in.
# Ranks are laid out row-major over this order, so `tp` is innermost (neighbouring
# ranks, the fastest links) and `pp` outermost. `ep` is not part of the product: the
# expert mesh is carved out of the same ranks (dp_shard × cp [× tp]).
MESH_DIMS: tuple[str, ...] = ("pp", "dp_replicate", "dp_shard", "cp", "tp", "ep")
PRODUCT_DIMS: tuple[str, ...] = MESH_DIMS[:-1]

Dtype = Literal["bf16", "fp16", "fp32", "fp64"]
ReshardAfterForward = bool | int | Literal["auto"]


@dataclass(frozen=True)
class Placement:
    """How a tensor lies along one mesh dimension: `replicate`, `shard(d)` or `partial`."""

    kind: Literal["replicate", "shard", "partial"]
    dim: int | None = None

    def __str__(self) -> str:
        return f"shard({self.dim})" if self.kind == "shard" else self.kind


REPLICATE = Placement("replicate")
PARTIAL = Placement("partial")


def shard(dim: int) -> Placement:
    return Placement("shard", dim)


@dataclass(frozen=True)
class Conversion:
    """One input or output of `prepare_input` / `prepare_output`.

    `source` is the layout the value arrives in, `target` the one the module wants;
    None for either means "leave this value alone" (written `none`).
    """

    name: str | None
    source: Placement | None
    target: Placement | None
    span: Span = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class StyleSpec:
    name: str
    args: Mapping[str, object]
    conversions: tuple[Conversion, ...] = ()
    span: Span = field(default=NOWHERE, compare=False)

    def arg(self, key: str) -> object:
        return self.args[key]


@dataclass(frozen=True)
class PatternSpec:
    text: str
    span: Span = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class MeshDimSpec:
    name: str
    size: int | None  # None: `auto`, fixed once the world size is known
    span: Span = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class SubmeshSpec:
    name: str
    dims: tuple[str, ...]
    span: Span = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class MeshSpec:
    dims: tuple[MeshDimSpec, ...]
    submeshes: tuple[SubmeshSpec, ...]
    span: Span = field(default=NOWHERE, compare=False)

    def dim(self, name: str) -> MeshDimSpec | None:
        return next((d for d in self.dims if d.name == name), None)

    def submesh(self, name: str) -> SubmeshSpec | None:
        return next((s for s in self.submeshes if s.name == name), None)

    def expand(self, name: str) -> tuple[str, ...]:
        """The mesh dimensions behind a dimension or submesh name."""
        sub = self.submesh(name)
        return sub.dims if sub else (name,)


@dataclass(frozen=True)
class TPRuleSpec:
    pattern: PatternSpec
    style: StyleSpec
    span: Span = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class TensorParallelSpec:
    on: str
    rules: tuple[TPRuleSpec, ...]
    span: Span = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class CheckpointSpec:
    patterns: tuple[PatternSpec, ...]
    mode: Literal["full", "selective"]
    every: int
    span: Span = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class MixedPrecisionSpec:
    param: Dtype | None
    reduce: Dtype | None
    output: Dtype | None
    cast_forward_inputs: bool
    span: Span = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class OffloadSpec:
    pin_memory: bool
    span: Span = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class UnitSpec:
    patterns: tuple[PatternSpec, ...]  # empty for the root unit
    reshard_after_forward: ReshardAfterForward
    span: Span = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class FullyShardSpec:
    on: tuple[str, ...]
    units: tuple[UnitSpec, ...]
    root: UnitSpec | None
    mixed_precision: MixedPrecisionSpec | None
    offload: OffloadSpec | None
    span: Span = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class ContextParallelSpec:
    on: str
    attention: tuple[PatternSpec, ...]
    load_balance: Literal["headtail", "none"]
    rotate: Literal["allgather", "ring"]
    span: Span = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class ExpertParallelSpec:
    on: str
    experts: tuple[PatternSpec, ...]
    dispatch: Literal["alltoall", "allgather"]
    span: Span = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class PipelineSpec:
    on: str
    schedule: str
    microbatches: int
    virtual_stages: int
    splits: tuple[PatternSpec, ...]
    span: Span = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class QuantizeSpec:
    """`quantize { … }` inside `adapters`: a 4-bit frozen base (QLoRA)."""

    format: Literal["nf4"]
    backend: Literal["torchao", "bitsandbytes"]
    compute: Dtype
    storage: str  # "uint8" or a dtype name
    block_size: int
    scaler_block_size: int
    span: Span = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class AdaptersSpec:
    """`adapters { … }`: PEFT adapters on the base modules `targets` name."""

    method: Literal["lora"]
    targets: tuple[PatternSpec, ...]
    rank: int
    alpha: float
    dropout: float
    dtype: Dtype | None
    quantize: QuantizeSpec | None
    span: Span = field(default=NOWHERE, compare=False)
    # Where each setting was written (for errors that point at `rank = 12`).
    setting_spans: Mapping[str, Span] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class PackingSpec:
    algorithm: Literal["ffd", "bfd", "greedy"]
    seq_len: int
    format: Literal["varlen", "thd", "segment_ids", "padded"]
    max_per_bin: int | None
    overlong: Literal["error", "drop", "truncate", "split"]
    seed: int
    span: Span = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class PlanSpec:
    name: str
    archs: tuple[str, ...]
    file: str
    params: Mapping[str, object]
    mesh: MeshSpec
    tensor_parallel: TensorParallelSpec | None = None
    checkpoints: tuple[CheckpointSpec, ...] = ()
    fully_shard: FullyShardSpec | None = None
    context_parallel: ContextParallelSpec | None = None
    expert_parallel: ExpertParallelSpec | None = None
    pipeline: PipelineSpec | None = None
    adapters: AdaptersSpec | None = None
    packing: PackingSpec | None = None
    span: Span = field(default=NOWHERE, compare=False)
    header_span: Span = field(default=NOWHERE, compare=False)
    param_spans: Mapping[str, Span] = field(default_factory=dict, compare=False)
