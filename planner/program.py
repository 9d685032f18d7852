"""The Program: what a compiled plan is. Data, not code.

A Program is the mesh plus an ordered list of steps. Each step is a frozen,
keyword-only dataclass that validates itself in `__post_init__` and carries the span
of the plan line it came from, so that even a failure at run time names that line.
Programs round-trip through JSON (`to_json` / `from_json`, versioned) and can be
emitted as a standalone Python function that uses only torch APIs
(`planner.emit.to_python`, which depends on this module, not the other way round).

Step order is the compiler's business (see `planner.lower`), the runtime walks it as
given: tensor parallel → context parallel → activation checkpointing → FSDP, children
before parents.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, Literal, TypeVar

from meshplan.dsl.errors import NOWHERE, Span
from meshplan.dsl.spec import MESH_DIMS, Placement, StyleSpec
from meshplan.dsl.styles import STYLES, placement_of, shards_sequence

SCHEMA_VERSION = 1
DTYPES = ("bf16", "fp16", "fp32", "fp64")


def _placement_ok(text: object) -> bool:
    try:
        return isinstance(text, str) and placement_of(text) is not None
    except ValueError:
        return False


@dataclass(frozen=True, kw_only=True)
class StyleCall:
    """One ParallelStyle instance: a registered style name and its resolved arguments.

    Placements are written as text (`shard(1)`), None for "leave as is".
    `inputs`/`outputs` are the conversions of prepare_input / prepare_output:
    (name or None, from, to).
    """

    style: str
    input: str | None = None
    output: str | None = None
    local_output: bool = True
    parts: int = 1
    dim: int = 1
    conversions: tuple[tuple[str | None, str | None, str | None], ...] = ()
    rope: int = 0  # mla_kv_a: the width of the output's shared rotary part

    def __post_init__(self) -> None:
        if not isinstance(self.style, str) or self.style not in STYLES:
            raise ValueError(f"StyleCall: unknown style {self.style!r}; styles are {', '.join(STYLES)}")
        if not isinstance(self.local_output, bool):
            raise ValueError(f"StyleCall {self.style}: local_output must be true or false, got {self.local_output!r}")
        for what, number in (("parts", self.parts), ("dim", self.dim), ("rope", self.rope)):
            if isinstance(number, bool) or not isinstance(number, int):
                raise ValueError(f"StyleCall {self.style}: {what} must be an integer, got {number!r}")
        for conv in self.conversions:
            if not (isinstance(conv, tuple) and len(conv) == 3 and (conv[0] is None or isinstance(conv[0], str))):
                raise ValueError(f"StyleCall {self.style}: a conversion is (name or None, from, to), got {conv!r}")
        for what, value in (("input", self.input), ("output", self.output)):
            if value is not None and not _placement_ok(value):
                raise ValueError(f"StyleCall {self.style}: {what} placement {value!r} is not a placement")
        for name, src, dst in self.conversions:
            for value in (src, dst):
                if value is not None and not _placement_ok(value):
                    raise ValueError(f"StyleCall {self.style}: conversion {name!r} has bad placement {value!r}")
        if self.parts < 1:
            raise ValueError(f"StyleCall {self.style}: parts must be ≥ 1, got {self.parts}")

    def placements(self) -> tuple[str | None, ...]:
        """Every placement the call names: input, output, then each conversion's pair."""
        return (self.input, self.output, *(p for _, src, dst in self.conversions for p in (src, dst)))

    @property
    def shards_sequence(self) -> bool:
        """Does the style split activations along the sequence (dim 1)?"""
        return bool(shards_sequence(self.style, self.placements()))


def style_call(style: StyleSpec) -> StyleCall:
    """The Program's call of a checked plan's style (placements as text)."""

    def placement(value: object) -> str | None:
        return str(value) if isinstance(value, Placement) else None

    args = style.args
    return StyleCall(
        style=style.name,
        input=placement(args.get("input")),
        output=placement(args.get("output")),
        local_output=bool(args.get("local_output", True)),
        parts=int(str(args.get("parts", 1))),
        dim=int(str(args.get("dim", 1))),
        conversions=tuple((c.name, placement(c.source), placement(c.target)) for c in style.conversions),
        rope=int(str(args.get("rope", 0))),
    )


# Field names by which a step names the modules and the mesh dimensions it touches.
_MODULE_FIELDS = ("fqn", "fqns")
_DIM_FIELDS = ("mesh_dim", "mesh_dims")


@dataclass(frozen=True, kw_only=True)
class Step:
    """One step of a Program: the step protocol.

    A step kind is one subclass here plus one entry in each table that gives it
    meaning: how the runtime applies it (`runtime.parallel.apply.STEPS`) and how the
    script spells it (`planner.emit.EMITTERS`); the dry run applies it through the
    runtime's table. Everything else asks a step what it touches:

    - `modules()`: the FQNs of the modules it changes ("" is the root module);
      `targets()`: those its call is made on (what a failure names);
    - `dims()`: the mesh dimensions and submeshes it runs on;
    - `renamed(rename)`: the same step on renamed modules (the dry run keeps one block
      of each kind), None when none of its modules remain;
    - `in_dry_run`: whether the dry run applies it (else it derives its cost);
    - `signature(block, index)`: what it does inside `block`, with the block's own name
      factored out, None when it does nothing there (blocks with equal signatures are
      measured once).

    By default a step names its modules in the fields `fqn` / `fqns` and its mesh
    dimensions in `mesh_dim` / `mesh_dims`; a kind that names them otherwise overrides
    the methods.
    """

    kind: ClassVar[str] = "step"
    # Does the dry run (`plan explain`) apply it to the meta model? False for a step that
    # changes no parameter and needs real batches; its cost is derived instead.
    in_dry_run: ClassVar[bool] = True
    span: Span = field(default=NOWHERE, compare=False)

    def _named(self, names: tuple[str, ...]) -> tuple[str, ...]:
        out: list[str] = []
        for f in fields(self):
            if f.name in names:
                value = getattr(self, f.name)
                out += [value] if isinstance(value, str) else list(value)
        return tuple(out)

    def check_names(self) -> None:
        """ValueError unless every module and dimension name field holds strings (the
        script writes them; a Program read from JSON may hold anything)."""
        for f in fields(self):
            if f.name not in (*_MODULE_FIELDS, *_DIM_FIELDS):
                continue
            value = getattr(self, f.name)
            one = f.name in ("fqn", "mesh_dim")
            if not (isinstance(value, str) if one else
                    isinstance(value, tuple) and all(isinstance(v, str) for v in value)):
                raise ValueError(f"Program: a {self.kind} step's {f.name} is not "
                                 f"{'a string' if one else 'a list of strings'}: {value!r}")

    def modules(self) -> tuple[str, ...]:
        return self._named(_MODULE_FIELDS)

    def targets(self) -> tuple[str, ...]:
        """The modules the step's call is made on (what a failure names); by default
        every module it touches."""
        return self.modules()

    def dims(self) -> tuple[str, ...]:
        return self._named(_DIM_FIELDS)

    def renamed(self, rename: Callable[[str], str | None]) -> Step | None:
        changes: dict[str, Any] = {}
        for f in fields(self):
            if f.name not in _MODULE_FIELDS:
                continue
            value = getattr(self, f.name)
            if isinstance(value, str):
                name = rename(value)
                if name is None:
                    return None
                changes[f.name] = name
            else:
                after = tuple(n for n in map(rename, value) if n is not None)
                if value and not after:
                    return None
                changes[f.name] = after
        return replace(self, **changes)

    def signature(self, block: str, index: int) -> tuple[Any, ...] | None:
        mine = tuple(f[len(block):] for f in self.modules() if f and _inside(f, block))
        if not mine:
            return None
        rest = tuple(getattr(self, f.name) for f in fields(self)
                     if f.name not in (*_MODULE_FIELDS, "span"))
        return (self.kind, mine, rest)


def _inside(fqn: str, ancestor: str) -> bool:
    return ancestor == "" or fqn == ancestor or fqn.startswith(ancestor + ".")


@dataclass(frozen=True, kw_only=True)
class Parallelize(Step):
    """`parallelize_module(model.get_submodule(fqn), mesh[mesh_dim], plan)`.

    `plan` maps FQNs relative to `fqn` to styles; grouped per block as torchtitan
    applies a layer plan, so one call covers one decoder layer.
    """

    kind: ClassVar[str] = "parallelize"
    fqn: str
    mesh_dim: str
    plan: tuple[tuple[str, StyleCall], ...]

    def __post_init__(self) -> None:
        if not self.plan:
            raise ValueError(f"Parallelize {self.fqn!r}: empty plan")
        if not self.mesh_dim:
            raise ValueError(f"Parallelize {self.fqn!r}: no mesh dimension")

    def modules(self) -> tuple[str, ...]:
        return (self.fqn, *(f"{self.fqn}.{r}".strip(".") for r, _ in self.plan if r))

    def targets(self) -> tuple[str, ...]:
        return (self.fqn,)  # one parallelize_module call on the block

    def signature(self, block: str, index: int) -> tuple[Any, ...] | None:
        # One call per block: the call on this block, its plan already block-relative.
        return (self.kind, self.mesh_dim, self.plan) if self.fqn == block else None


@dataclass(frozen=True, kw_only=True)
class Checkpoint(Step):
    """Wrap `fqn` for activation checkpointing (full: whole module; selective: op policy)."""

    kind: ClassVar[str] = "checkpoint"
    fqn: str
    mode: Literal["full", "selective"]

    def __post_init__(self) -> None:
        if self.mode not in ("full", "selective"):
            raise ValueError(f"Checkpoint {self.fqn!r}: mode {self.mode!r} is not full or selective")


@dataclass(frozen=True, kw_only=True)
class ContextParallel(Step):
    """Replace the attention of `fqns` by meshplan's context-parallel attention on `mesh_dim`."""

    kind: ClassVar[str] = "context_parallel"
    in_dry_run: ClassVar[bool] = False  # swaps attention only; runtime.explain.comm derives its traffic
    fqns: tuple[str, ...]
    mesh_dim: str
    load_balance: Literal["headtail", "none"]
    rotate: Literal["allgather", "ring"]

    def __post_init__(self) -> None:
        if not self.fqns:
            raise ValueError("ContextParallel: no attention modules")
        if not self.mesh_dim:
            raise ValueError("ContextParallel: no mesh dimension")
        if self.load_balance not in ("headtail", "none") or self.rotate not in ("allgather", "ring"):
            raise ValueError(f"ContextParallel: bad load_balance/rotate {self.load_balance!r}/{self.rotate!r}")


@dataclass(frozen=True, kw_only=True)
class MixedPrecision:
    param: str | None = None
    reduce: str | None = None
    output: str | None = None
    cast_forward_inputs: bool = True

    def __post_init__(self) -> None:
        for name in ("param", "reduce", "output"):
            value = getattr(self, name)
            if value is not None and value not in DTYPES:
                raise ValueError(f"MixedPrecision: {name} dtype {value!r} is not one of {DTYPES}")
        if not isinstance(self.cast_forward_inputs, bool):
            raise ValueError(f"MixedPrecision: cast_forward_inputs must be true or false, "
                             f"got {self.cast_forward_inputs!r}")


@dataclass(frozen=True, kw_only=True)
class Offload:
    pin_memory: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.pin_memory, bool):
            raise ValueError(f"Offload: pin_memory must be true or false, got {self.pin_memory!r}")


@dataclass(frozen=True, kw_only=True)
class FullyShard(Step):
    """`fully_shard([modules…], mesh=mesh[mesh_dims], …)`; fqns () is the root module."""

    kind: ClassVar[str] = "fully_shard"
    fqns: tuple[str, ...]
    mesh_dims: tuple[str, ...]
    reshard_after_forward: bool | int
    mixed_precision: MixedPrecision | None = None
    offload: Offload | None = None

    def __post_init__(self) -> None:
        if not 1 <= len(self.mesh_dims) <= 2:
            raise ValueError(f"FullyShard {self.fqns}: 1 or 2 mesh dims (FSDP / HSDP), got {self.mesh_dims}")
        value = self.reshard_after_forward
        if not isinstance(value, bool | int):
            raise ValueError(f"FullyShard {self.fqns}: reshard_after_forward must be a bool or an int, "
                             f"got {value!r} (`auto` is resolved by the compiler)")
        if isinstance(value, int) and not isinstance(value, bool) and value < 2:
            raise ValueError(f"FullyShard {self.fqns}: reshard_after_forward={value} (an int must be ≥ 2)")

    def signature(self, block: str, index: int) -> tuple[Any, ...] | None:
        if not self.fqns:
            return None  # the root unit is the same for every block
        found = super().signature(block, index)
        if found is None:
            return None
        # A unit that also holds modules outside the block is one unit, shared: blocks in
        # different such units differ by the unit's position in the program.
        spans = len(self.fqns) != len(found[1])
        return (*found, spans, index if spans else -1)


@dataclass(frozen=True, kw_only=True)
class ExpertParallel(Step):
    """Shard the fused experts `fqns` (3-D `gate_up_proj`/`down_proj`) `Shard(0)` over the
    expert mesh: `mesh_dim` (ep) ranks carved, innermost, out of dp_shard × cp × tp.

    Tokens travel to the rank owning their expert by `dispatch` (all-to-all with
    uneven splits, or all-gather) and come back in order. `replicas`: the dimensions
    over which the experts' inputs are replicated (tp): each of those ranks routes a
    slice of the tokens, and the outputs are gathered back. With `fsdp`, the experts get
    their own FSDP2 unit over the rest of the pool (efsdp = dp_shard·cp·tp / ep, times
    dp_replicate for HSDP), their gradients divided by `gradient_divide_factor` so that
    they match the dense parameters' average."""

    kind: ClassVar[str] = "expert_parallel"
    fqns: tuple[str, ...]
    mesh_dim: str
    size: int
    dispatch: Literal["alltoall", "allgather"] = "alltoall"
    replicas: tuple[str, ...] = ()
    fsdp: bool = False
    hsdp: bool = False
    reshard_after_forward: bool = True
    gradient_divide_factor: int = 1
    mixed_precision: MixedPrecision | None = None

    def __post_init__(self) -> None:
        if not self.fqns:
            raise ValueError("ExpertParallel: no expert modules")
        if not self.mesh_dim:
            raise ValueError("ExpertParallel: no mesh dimension")
        if self.size < 2:
            raise ValueError(f"ExpertParallel: size (ep) must be ≥ 2, got {self.size}")
        if self.dispatch not in ("alltoall", "allgather"):
            raise ValueError(f"ExpertParallel: dispatch {self.dispatch!r} is not alltoall or allgather")
        if self.gradient_divide_factor < 1:
            raise ValueError(f"ExpertParallel: gradient_divide_factor must be ≥ 1, got {self.gradient_divide_factor}")


@dataclass(frozen=True, kw_only=True)
class Pipeline(Step):
    """Cut the decoder into `len(stages)` pipeline stages over `mesh_dim` (pp) and run
    them with `schedule` over `microbatches` microbatches.

    `stages[i]` are the indices (in the stack `layers`, e.g. `model.layers`) of stage
    i's decoder layers; stage 0 also holds `embed`, the last stage `head` (the final norm
    and the output projection); every stage holds `rotary`. Rank r of pp holds the stages
    `ranks[r]` (looped schedules: r, r + pp, …; V-shaped: r and 2·pp − 1 − r). It is the
    first step of a Program: every later step applies to the stage modules that hold its
    modules (the root FSDP unit wraps each stage module)."""

    kind: ClassVar[str] = "pipeline"
    # The dry run keeps one block per kind, so it cannot cut the real layer indices:
    # explain accounts for the stages from the step itself.
    in_dry_run: ClassVar[bool] = False
    mesh_dim: str
    schedule: str
    microbatches: int
    layers: str
    stages: tuple[tuple[int, ...], ...]
    ranks: tuple[tuple[int, ...], ...]
    embed: tuple[str, ...] = ()
    head: tuple[str, ...] = ()
    rotary: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.microbatches < 1:
            raise ValueError(f"Pipeline: microbatches must be ≥ 1, got {self.microbatches}")
        if len(self.stages) < 2:
            raise ValueError(f"Pipeline: needs at least two stages, got {len(self.stages)}")
        dealt = sorted(i for r in self.ranks for i in r)
        if dealt != list(range(len(self.stages))):
            raise ValueError(f"Pipeline: ranks {self.ranks} do not hold each of {len(self.stages)} stages once")
        flat = [i for st in self.stages for i in st]
        if flat != sorted(set(flat)):
            raise ValueError(f"Pipeline: stage layers {self.stages} repeat or are out of order")

    def modules(self) -> tuple[str, ...]:
        return ("",)

    def renamed(self, rename: Callable[[str], str | None]) -> Step | None:
        return self  # it cuts the whole model: the dry run keeps it as it is

    def signature(self, block: str, index: int) -> tuple[Any, ...] | None:
        return None  # the same in every block

    def stage_of_layer(self, index: int) -> int:
        return next(s for s, layers in enumerate(self.stages) if index in layers)


ADAPTER_METHODS = ("lora",)
QUANT_FORMATS = ("nf4",)
QUANT_BACKENDS = ("torchao", "bitsandbytes")
QUANT_STORAGE = ("uint8", *DTYPES)


@dataclass(frozen=True, kw_only=True)
class Quantize:
    """A frozen 4-bit base (QLoRA): each adapted module's base weight held as NF4 blocks.

    `backend` is the library holding the blocks (torchao's NF4Tensor, which FSDP2 shards;
    or bitsandbytes' Linear4bit); `compute` the dtype the weight is dequantised to for
    the matmul; `storage` the dtype the packed 4-bit data is stored in (bitsandbytes'
    quant_storage; torchao always packs into uint8). `block_size` values share one
    absmax scaler; `scaler_block_size` scalers share one int8 scale (double quantisation)."""

    format: str = "nf4"
    backend: str = "torchao"
    compute: str = "bf16"
    storage: str = "uint8"
    block_size: int = 64
    scaler_block_size: int = 256

    def __post_init__(self) -> None:
        if self.format not in QUANT_FORMATS:
            raise ValueError(f"Quantize: format {self.format!r} is not one of {QUANT_FORMATS}")
        if self.backend not in QUANT_BACKENDS:
            raise ValueError(f"Quantize: backend {self.backend!r} is not one of {QUANT_BACKENDS}")
        if self.compute not in DTYPES:
            raise ValueError(f"Quantize: compute dtype {self.compute!r} is not one of {DTYPES}")
        if self.storage not in QUANT_STORAGE:
            raise ValueError(f"Quantize: storage {self.storage!r} is not one of {QUANT_STORAGE}")
        for what, number in (("block_size", self.block_size), ("scaler_block_size", self.scaler_block_size)):
            if isinstance(number, bool) or not isinstance(number, int) or number < 1:
                raise ValueError(f"Quantize: {what} must be a positive integer, got {number!r}")


@dataclass(frozen=True, kw_only=True)
class Adapters(Step):
    """Inject PEFT adapters (`peft.inject_adapter_in_model`, adapter name `default`) into
    the base modules `fqns` and freeze everything else; with `quantize`, hold those
    modules' base weights in 4 bits.

    It is a Program's first step after the pipeline cut: the later steps keep naming
    base modules (`q_proj`), and the runtime applies a tensor-parallel style on an
    adapted module to its `base_layer` and the style's adapter layout to `lora_A` /
    `lora_B` (the style registry's `adapter` field); FSDP2 units shard base and
    adapters together. `dtype` is the adapters' parameter dtype (None: the base's)."""

    kind: ClassVar[str] = "adapters"
    fqns: tuple[str, ...]
    method: str = "lora"
    rank: int
    alpha: float
    dropout: float = 0.0
    dtype: str | None = None
    quantize: Quantize | None = None

    def __post_init__(self) -> None:
        if not self.fqns:
            raise ValueError("Adapters: no target modules")
        if self.method not in ADAPTER_METHODS:
            raise ValueError(f"Adapters: method {self.method!r} is not one of {ADAPTER_METHODS}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"Adapters: rank must be a positive integer, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or self.alpha <= 0:
            raise ValueError(f"Adapters: alpha must be a positive number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float) \
                or not 0 <= self.dropout < 1:
            raise ValueError(f"Adapters: dropout must be in [0, 1), got {self.dropout!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"Adapters: dtype {self.dtype!r} is not one of {DTYPES}")

    @property
    def scaling(self) -> float:
        """What LoRA multiplies the adapter's output by (alpha / rank)."""
        return float(self.alpha) / self.rank


STEP_TYPES: Mapping[str, type[Step]] = {
    t.kind: t for t in (Adapters, Parallelize, Checkpoint, ContextParallel, ExpertParallel, FullyShard,
                        Pipeline)
}


S = TypeVar("S", bound=Step)


@dataclass(frozen=True, kw_only=True)
class MeshLayout:
    """The device mesh: dimension names and sizes in canonical order, and submeshes."""

    names: tuple[str, ...]
    shape: tuple[int, ...]
    submeshes: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def __post_init__(self) -> None:
        if len(self.names) != len(self.shape):
            raise ValueError(f"MeshLayout: names {self.names} and shape {self.shape} differ in length")
        if any(n not in MESH_DIMS for n in self.names):
            raise ValueError(f"MeshLayout: unknown dimension in {self.names}")
        if list(self.names) != sorted(set(self.names), key=MESH_DIMS.index):
            raise ValueError(f"MeshLayout: dimensions {self.names} repeat or are out of the order {MESH_DIMS}")
        if any(isinstance(s, bool) or not isinstance(s, int) for s in self.shape):
            raise ValueError(f"MeshLayout: sizes must be integers, got {self.shape}")
        if any(s < 1 for s in self.shape):
            raise ValueError(f"MeshLayout: sizes must be ≥ 1, got {self.shape}")
        for name, dims in self.submeshes:
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(f"MeshLayout: submesh name {name!r} is not a name")
            if name in MESH_DIMS:
                raise ValueError(f"MeshLayout: submesh {name!r} has the name of a mesh dimension")
            if any(d not in self.names for d in dims):
                raise ValueError(f"MeshLayout: submesh {name!r} uses undeclared dimensions {dims}")

    @property
    def world_size(self) -> int:
        size = 1
        for name, n in zip(self.names, self.shape, strict=True):
            if name != "ep":
                size *= n
        return size

    def size(self, name: str) -> int:
        """The size of a dimension or submesh (1 for an undeclared dimension)."""
        sub = dict(self.submeshes).get(name)
        if sub is not None:
            out = 1
            for d in sub:
                out *= self.size(d)
            return out
        return self.shape[self.names.index(name)] if name in self.names else 1

    def expand(self, name: str) -> tuple[str, ...]:
        return dict(self.submeshes).get(name, (name,))


@dataclass(frozen=True, kw_only=True)
class Program:
    plan: str
    model: str
    world_size: int
    mesh: MeshLayout
    steps: tuple[Step, ...]
    source: str = ""  # the plan file

    def __post_init__(self) -> None:
        for what, text in (("plan", self.plan), ("model", self.model), ("source", self.source)):
            if not isinstance(text, str):
                raise ValueError(f"Program: {what} must be a string, got {text!r}")
        if isinstance(self.world_size, bool) or not isinstance(self.world_size, int):
            raise ValueError(f"Program: world_size must be an integer, got {self.world_size!r}")
        if self.world_size < 1:
            raise ValueError(f"Program: world_size must be ≥ 1, got {self.world_size}")
        if self.mesh.world_size != self.world_size:
            raise ValueError(f"Program: mesh {dict(zip(self.mesh.names, self.mesh.shape, strict=True))} "
                             f"has {self.mesh.world_size} ranks, world_size is {self.world_size}")
        known = set(self.mesh.names) | {n for n, _ in self.mesh.submeshes}
        for step in self.steps:
            step.check_names()
            missing = [d for d in step.dims() if d not in known]
            if missing:
                raise ValueError(f"Program: a {step.kind} step uses mesh dimension {missing[0]!r}, which the "
                                 f"mesh ({', '.join(sorted(known))}) does not have")

    def steps_of(self, kind: type[S]) -> tuple[S, ...]:
        """The Program's steps of one kind, in program order."""
        return tuple(s for s in self.steps if isinstance(s, kind))

    # ------------------------------------------------------------------ JSON

    def to_json(self) -> str:
        return json.dumps(_encode(self), indent=2)

    @staticmethod
    def from_json(text: str) -> Program:
        """Parse a Program; any malformed input is a ValueError saying what is wrong."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"Program JSON is not JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"Program JSON must be an object, not {type(data).__name__}")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"Program JSON has schema_version {version!r}; this meshplan reads {SCHEMA_VERSION}")
        try:
            return _decode_program(data)
        except KeyError as e:
            raise ValueError(f"Program JSON lacks the field {e.args[0]!r}") from None
        except (TypeError, AttributeError) as e:
            raise ValueError(f"Program JSON is malformed: {e}") from None


def _encode_span(span: Span) -> dict[str, Any] | None:
    if span == NOWHERE or span.line == 0:
        return None
    return {"file": span.file, "line": span.line, "column": span.column,
            "end_line": span.end_line, "end_column": span.end_column}


def _encode(obj: Any) -> Any:
    if isinstance(obj, Program):
        return {"schema_version": SCHEMA_VERSION, "plan": obj.plan, "model": obj.model,
                "source": obj.source, "world_size": obj.world_size,
                "mesh": {"names": list(obj.mesh.names), "shape": list(obj.mesh.shape),
                         "submeshes": {n: list(d) for n, d in obj.mesh.submeshes}},
                "steps": [_encode(s) for s in obj.steps]}
    if isinstance(obj, Step):
        out: dict[str, Any] = {"kind": obj.kind}
        for f in fields(obj):
            out[f.name] = _encode_span(obj.span) if f.name == "span" else _encode(getattr(obj, f.name))
        return out
    if isinstance(obj, StyleCall | MixedPrecision | Offload | Quantize):
        return {f.name: _encode(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple):
        return [_encode(x) for x in obj]
    return obj


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _decode_step(data: Mapping[str, Any]) -> Step:
    kind = data.get("kind")
    cls = STEP_TYPES.get(str(kind))
    if cls is None:
        raise ValueError(f"Program JSON: unknown step kind {kind!r}")
    extra = sorted(set(data) - {f.name for f in fields(cls)} - {"kind"})
    if extra:
        raise ValueError(f"Program JSON is malformed: a {kind} step has unknown fields {', '.join(extra)}")
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        if f.name == "span":
            kwargs["span"] = Span(**value) if value else NOWHERE
        elif f.name == "plan":
            kwargs["plan"] = tuple((fqn, StyleCall(**{k: _tuples(v) for k, v in call.items()}))
                                   for fqn, call in value)
        elif f.name == "mixed_precision":
            kwargs[f.name] = MixedPrecision(**value) if value else None
        elif f.name == "offload":
            kwargs[f.name] = Offload(**value) if value else None
        elif f.name == "quantize":
            kwargs[f.name] = Quantize(**value) if value else None
        else:
            kwargs[f.name] = _tuples(value)
    return cls(**kwargs)


def _decode_program(data: Mapping[str, Any]) -> Program:
    mesh = data["mesh"]
    layout = MeshLayout(names=tuple(mesh["names"]), shape=tuple(mesh["shape"]),
                        submeshes=tuple((n, tuple(d)) for n, d in mesh.get("submeshes", {}).items()))
    return Program(plan=data["plan"], model=data["model"], source=data.get("source", ""),
                   world_size=data["world_size"], mesh=layout,
                   steps=tuple(_decode_step(s) for s in data["steps"]))
