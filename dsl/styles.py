"""The style registry: one record per ParallelStyle, everything meshplan knows about it.

A record says
- how a plan spells it: its arguments and their types (`args`), whether it takes
  layout conversions (`conversions`) — read by the language's checks;
- which module kinds it is made for (`applies_to`) — read by the planner's style pass;
- its layout contract (`contract`): what it does to its module's input, output and
  weights — read by layout propagation, the tied-weight check and FSDP;
- what must divide (`divides`): the module sizes it shards, per module kind — read by
  the divisibility pass;
- whether it always splits the sequence (`sequence`) — read by the sequence checks and
  the derived sequence multiple;
- how torch builds it (`build`): the dotted name of its constructor and the
  constructor's arguments, as torch-free data (placements are `Placement`s). The
  runtime imports the constructor by that name and converts the placements
  (`runtime.parallel.registry.make_style`); `--emit python` writes the same call as
  source (`source`), so the script and the runtime cannot build different styles.

Adding a style is one record here (plus, when torch lacks the style, its class in
`runtime/parallel/styles.py`, which the script inlines) and its tests. This module
imports neither torch nor the planner: the language reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from .schema import BoolType, IntType, PlacementType, SettingSchema
from .spec import Placement

# Module kinds a style may be applied to (the planner knows each module's kind).
ModuleKind = Literal["linear", "embedding", "conv1d", "norm", "experts", "attention", "any"]

TORCH_TP = "torch.distributed.tensor.parallel"
MESHPLAN_STYLES = "meshplan.runtime.parallel.styles"


def placement_of(text: str | None) -> Placement | None:
    """A Program's placement text (`shard(1)`, `replicate`, `partial`) → a Placement;
    None stays None. ValueError for anything else."""
    if text is None:
        return None
    if text in ("replicate", "partial"):
        return Placement(text)  # type: ignore[arg-type]
    if text.startswith("shard(") and text.endswith(")"):
        inner = text[6:-1]
        digits = inner[1:] if inner.startswith("-") else inner
        if digits.isascii() and digits.isdigit():
            return Placement("shard", int(inner))
    raise ValueError(f"not a placement: {text!r}")


# ------------------------------------------------------------------ the torch call


class CallArgs(Protocol):
    """A style call's resolved arguments, as a Program holds them (`planner.program.StyleCall`)."""

    @property
    def style(self) -> str: ...
    @property
    def input(self) -> str | None: ...
    @property
    def output(self) -> str | None: ...
    @property
    def local_output(self) -> bool: ...
    @property
    def parts(self) -> int: ...
    @property
    def dim(self) -> int: ...
    @property
    def rope(self) -> int: ...
    @property
    def conversions(self) -> tuple[tuple[str | None, str | None, str | None], ...]: ...


@dataclass(frozen=True)
class Named:
    """A mapping argument (`{'hidden_states': Shard(1)}`), kept as ordered pairs."""

    pairs: tuple[tuple[str, Placement | None], ...]


# A constructor argument: plain values, placements, tuples of placements, or a mapping
# from argument names to placements (PrepareModuleInput's kwarg layouts).
Arg = None | bool | int | Placement | tuple[Placement | None, ...] | Named


@dataclass(frozen=True)
class Construct:
    """One constructor call: `constructor(*args, **dict(kwargs))`."""

    constructor: str  # dotted name: module path, then the class
    args: tuple[Arg, ...] = ()
    kwargs: tuple[tuple[str, Arg], ...] = ()

    @property
    def name(self) -> str:
        return self.constructor.rsplit(".", 1)[-1]

    @property
    def module(self) -> str:
        return self.constructor.rsplit(".", 1)[0]

    def source(self) -> str:
        """The call as Python source, in the names the emitted script defines."""
        parts = [render(a) for a in self.args] + [f"{k}={render(v)}" for k, v in self.kwargs]
        return f"{self.name}({', '.join(parts)})"


def render(value: Arg) -> str:
    """An argument as Python source (placements as torch's `Shard(d)`, `Replicate()`, …)."""
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, int):
        return repr(int(value))
    if isinstance(value, Placement):
        if value.kind == "shard":
            return f"Shard({int(value.dim or 0)})"
        return "Replicate()" if value.kind == "replicate" else "Partial()"
    if isinstance(value, Named):
        return "{" + ", ".join(f"{str(k)!r}: {render(v)}" for k, v in value.pairs) + "}"
    if isinstance(value, tuple):
        return "(" + ", ".join(render(v) for v in value) + ",)" if value else "()"
    raise TypeError(f"a style argument must be a number, a flag, a placement or a tuple of them, "
                    f"not {value!r}")


def _io(call: CallArgs) -> tuple[tuple[str, Arg], ...]:
    return (("input_layouts", placement_of(call.input)), ("output_layouts", placement_of(call.output)),
            ("use_local_output", call.local_output))


def _local(call: CallArgs) -> tuple[tuple[str, Arg], ...]:
    return (("use_local_output", call.local_output),)


def _positional(call: CallArgs) -> list[tuple[Placement | None, Placement | None]]:
    """Unnamed conversions as (from, to), a side left `none` taking the other's layout."""
    out = []
    for name, src, dst in call.conversions:
        if name is None:
            s, d = placement_of(src), placement_of(dst)
            out.append((s if s is not None else d, d if d is not None else s))
    return out


def _named(call: CallArgs) -> list[tuple[str, Placement | None, Placement | None]]:
    out = []
    for name, src, dst in call.conversions:
        if name is not None:
            s, d = placement_of(src), placement_of(dst)
            out.append((name, s if s is not None else d, d if d is not None else s))
    return out


def _colwise(call: CallArgs) -> Construct:
    if call.parts > 1:
        return Construct(f"{MESHPLAN_STYLES}.FusedColwiseParallel", (call.parts,), _io(call))
    return Construct(f"{TORCH_TP}.ColwiseParallel", (), _io(call))


def _prepare_input(call: CallArgs) -> Construct:
    kwargs: list[tuple[str, Arg]] = []
    positional, named = _positional(call), _named(call)
    if positional:
        kwargs += [("input_layouts", tuple(s for s, _ in positional)),
                   ("desired_input_layouts", tuple(d for _, d in positional))]
    if named:
        kwargs += [("input_kwarg_layouts", Named(tuple((n, s) for n, s, _ in named))),
                   ("desired_input_kwarg_layouts", Named(tuple((n, d) for n, _, d in named)))]
    return Construct(f"{TORCH_TP}.PrepareModuleInput", (), (*kwargs, *_local(call)))


def _prepare_output(call: CallArgs) -> Construct:
    positional = _positional(call)
    return Construct(f"{TORCH_TP}.PrepareModuleOutput", (), (
        ("output_layouts", tuple(s for s, _ in positional)),
        ("desired_output_layouts", tuple(d for _, d in positional)), *_local(call)))


# ------------------------------------------------------------------ adapter layouts


@dataclass(frozen=True)
class AdapterCall:
    """A style call on one adapter matrix (`lora_A` / `lora_B`) of an adapted module; it
    has the shape of a Program's StyleCall, so the runtime and the script build it alike."""

    style: str
    input: str | None = None
    output: str | None = None
    local_output: bool = True
    parts: int = 1
    dim: int = 1
    conversions: tuple[tuple[str | None, str | None, str | None], ...] = ()
    rope: int = 0


@dataclass(frozen=True)
class AdapterLayout:
    """How a style lays out a LoRA adapter beside its base module (PEFT's convention):
    the style itself goes on `base_layer`, `a` on `lora_A`, `b` on `lora_B`."""

    a: AdapterCall
    b: AdapterCall


def _text(p: str | None, default: str) -> str:
    return p if p is not None else default


def _colwise_adapter(call: CallArgs) -> AdapterLayout:
    # x → A (r features, replicated weight, same layout as the base's input) → B sharded
    # like the base: B's output lies exactly as the base's, so the sum needs no traffic.
    i = _text(call.input, "replicate")
    return AdapterLayout(a=AdapterCall("replicate", input=i, output=i),
                         b=AdapterCall("colwise", input=i, output=_text(call.output, "shard(-1)"),
                                       local_output=call.local_output, parts=call.parts))


def _rowwise_adapter(call: CallArgs) -> AdapterLayout:
    # A is sharded on its input features like the base and reduces its r-wide output the
    # way the base reduces its own; B (replicated) then works on that reduced layout.
    o = _text(call.output, "replicate")
    return AdapterLayout(a=AdapterCall("rowwise", input=_text(call.input, "shard(-1)"), output=o),
                         b=AdapterCall("replicate", input=o, output=o, local_output=call.local_output))


def _replicate_adapter(call: CallArgs) -> AdapterLayout:
    i, o = _text(call.input, "replicate"), _text(call.output, "replicate")
    return AdapterLayout(a=AdapterCall("replicate", input=i, output=i),
                         b=AdapterCall("replicate", input=i, output=o, local_output=call.local_output))


# ------------------------------------------------------------------ the record


@dataclass(frozen=True)
class Divides:
    """A module size a style shards, which the mesh dimension must divide."""

    attr: str  # the module's attribute in the model graph (`out_features`, …)
    fact: str  # what it is, `{n}` for the size: "{n} output features"
    per_part: bool = False  # a fused projection (`parts = N`): each part's size
    heads: bool = False  # behind q/k/v/o projections: whole heads, so head counts divide too
    hint: str | None = None


Side = Literal["declared", "sequence", "conversions", "untouched"]


@dataclass(frozen=True)
class Contract:
    """What a style does at its module's boundary.

    `input` / `output`: `declared` — converted to the style's `input` / `output`
    argument; `sequence` — sharded along the `dim` argument (sequence parallelism);
    `conversions` — converted as the style's conversions say; `untouched` — left alone.
    `weights`: module kind → the weight's placement (absent: replicated).
    `replicated_params`: the module's parameters become replicated DTensors (their
    gradients are then summed over the dimension).
    `params`: a module whose tensors are not a `weight` (fused experts' 3-D
    `gate_up_proj`, `down_proj`): parameter name → its placement.
    `whole`: the style runs the whole module on local shards and hands back its declared
    output, as a Linear's style does: layout propagation takes the module as one op.
    `shared_tail`: the output stays replicated and the gradient of its last `rope`
    features is summed over the dimension: that part must be shared by head-sharded code
    (broadcast over the heads), which alone leaves its gradient a partial sum per rank.
    `head_params`: the module's own (1-D, per-head) parameters are sharded on dim 0 with
    the heads, and its code sees them as plain local tensors.
    """

    input: Side = "declared"
    output: Side = "declared"
    weights: Mapping[str, str] = field(default_factory=dict)
    replicated_params: bool = False
    params: Mapping[str, str] = field(default_factory=dict)
    whole: bool = False
    shared_tail: bool = False
    head_params: bool = False


@dataclass(frozen=True)
class StyleSchema:
    """One ParallelStyle (see the module docstring)."""

    doc: str
    build: Callable[[CallArgs], Construct]
    args: Mapping[str, SettingSchema] = field(default_factory=dict)
    conversions: bool = False
    applies_to: tuple[ModuleKind, ...] = ("any",)
    contract: Contract = Contract()
    divides: Mapping[str, Divides] = field(default_factory=dict)
    sequence: bool = False  # always splits activations along the sequence
    # Called as `after(parent, module, parts, tp)` once a fused (`parts > 1`) module with a
    # parent is sharded: the dotted name of a function in the styles torch lacks, which
    # fixes what the parent knows of the module's (now local) width.
    after: str | None = None
    # The layout of a LoRA adapter on a module in this style (`AdapterLayout`), per
    # module kind it can be adapted on; a kind absent here cannot carry an adapter.
    adapter: Mapping[str, Callable[[CallArgs], AdapterLayout]] = field(default_factory=dict)
    # Parameters (by name) that a fused call (`parts > 1`) stores rank-major along the
    # given dimension, for modules that are not Linear-like (see `fused_weight_dim`).
    fused_params: Mapping[str, int] = field(default_factory=dict)

    def construct(self, call: CallArgs) -> Construct:
        return self.build(call)

    def source(self, call: CallArgs) -> str:
        """The constructor call `--emit python` writes for `call`."""
        return self.build(call).source()

    def weight(self, kind: str) -> str:
        """How the style lays out the weight of a module of `kind`."""
        return self.contract.weights.get(kind, "replicate")

    def fits(self, kind: str) -> bool:
        return "any" in self.applies_to or kind in self.applies_to

    def fused_weight_dim(self) -> int | None:
        """The weight dimension a fused call (`parts > 1`) shards part by part: the one
        the style shards on the Linear-like module it fits; None if it takes no parts."""
        if "parts" not in self.args:
            return None
        for kind in ("linear", "conv1d"):
            if kind in self.applies_to:
                found = placement_of(self.weight(kind))
                if found is not None and found.kind == "shard":
                    return found.dim
        return None


StyleRecord = StyleSchema


def shards_sequence(style: str, placements: tuple[str | None, ...]) -> bool:
    """Does a call of `style` naming `placements` (input, output, conversions) split
    activations along the sequence (dim 1)?"""
    return STYLES[style].sequence or "shard(1)" in placements


PLACEMENT = PlacementType()
LOCAL_TRUE = SettingSchema(BoolType(), True, doc="hand plain local tensors to the code after the module")
LOCAL_FALSE = SettingSchema(BoolType(), False, doc="hand plain local tensors to the code after the module")
PARTS = SettingSchema(IntType(1), 1, doc="a fused projection of N equal parts; each part is sharded")
REPLICATED = SettingSchema(PLACEMENT, Placement("replicate"))
SHARD_LAST = SettingSchema(PLACEMENT, Placement("shard", -1))

# What colwise / rowwise shard on Linear-like modules (GPT-2's Conv1D has the same
# attributes, stored transposed).
_OUT = Divides("out_features", "{n} output features", per_part=True, heads=True)
_IN = Divides("in_features", "{n} input features", heads=True)

STYLES: Mapping[str, StyleSchema] = {
    "colwise": StyleSchema(
        "Shard the weight's output features (ColwiseParallel); Embedding: shard the embedding dim.",
        build=_colwise,
        args={"input": REPLICATED, "output": SHARD_LAST, "local_output": LOCAL_TRUE, "parts": PARTS},
        applies_to=("linear", "embedding"),
        contract=Contract(weights={"linear": "shard(0)", "embedding": "shard(1)"}),
        divides={"linear": _OUT, "conv1d": _OUT,
                 "embedding": Divides("embedding_dim", "{n} embedding features")},
        adapter={"linear": _colwise_adapter},
    ),
    "rowwise": StyleSchema(
        "Shard the weight's input features (RowwiseParallel); Embedding: shard the vocabulary.",
        build=lambda call: Construct(f"{TORCH_TP}.RowwiseParallel", (), _io(call)),
        args={"input": SHARD_LAST, "output": REPLICATED, "local_output": LOCAL_TRUE},
        applies_to=("linear", "embedding"),
        contract=Contract(weights={"linear": "shard(1)", "embedding": "shard(0)"}),
        divides={"linear": _IN, "conv1d": _IN,
                 "embedding": Divides("num_embeddings", "a vocabulary of {n} tokens",
                                      hint="pad the vocabulary to a multiple of the tp size, or leave the "
                                           "embedding replicated")},
        adapter={"linear": _rowwise_adapter},
    ),
    "conv1d_colwise": StyleSchema(
        "ColwiseParallel for GPT-2's transposed Conv1D (weight is [in, out]).",
        build=lambda call: Construct(f"{MESHPLAN_STYLES}.Conv1DColwiseParallel", (call.parts,), _io(call)),
        args={"input": REPLICATED, "output": SHARD_LAST, "local_output": LOCAL_TRUE, "parts": PARTS},
        applies_to=("conv1d",),
        contract=Contract(weights={"conv1d": "shard(1)"}),
        divides={"linear": _OUT, "conv1d": _OUT},
        after=f"{MESHPLAN_STYLES}.rescale_split_sizes",  # GPT-2 attention splits by `split_size`
    ),
    "conv1d_rowwise": StyleSchema(
        "RowwiseParallel for GPT-2's transposed Conv1D (weight is [in, out]).",
        build=lambda call: Construct(f"{MESHPLAN_STYLES}.Conv1DRowwiseParallel", (), _io(call)),
        args={"input": SHARD_LAST, "output": REPLICATED, "local_output": LOCAL_TRUE},
        applies_to=("conv1d",),
        contract=Contract(weights={"conv1d": "shard(0)"}),
        divides={"linear": _IN, "conv1d": _IN},
    ),
    "sequence_parallel": StyleSchema(
        "Run a norm (or dropout) on sequence shards; its weight stays replicated.",
        build=lambda call: Construct(f"{TORCH_TP}.SequenceParallel", (),
                                     (("sequence_dim", call.dim), *_local(call))),
        args={"dim": SettingSchema(IntType(None), 1, doc="the sequence dimension"),
              "local_output": LOCAL_FALSE},
        applies_to=("norm",),
        contract=Contract(input="sequence", output="sequence", replicated_params=True),
        sequence=True,
    ),
    "prepare_input": StyleSchema(
        "Convert a module's inputs: `shard(1) -> replicate`, or `name: shard(1) -> replicate`.",
        build=_prepare_input,
        args={"local_output": LOCAL_FALSE}, conversions=True,
        contract=Contract(input="conversions", output="untouched"),
    ),
    "prepare_output": StyleSchema(
        "Convert a module's outputs: `replicate -> shard(1)`.",
        build=_prepare_output,
        args={"local_output": LOCAL_TRUE}, conversions=True,
        contract=Contract(input="untouched", output="conversions"),
    ),
    "tp_experts": StyleSchema(
        "Shard every expert of a fused experts module on its intermediate features: "
        "gate_up_proj [E, 2I, H] part by part (`parts`), down_proj [E, H, I] (or both stored transposed, "
        "or gate_proj and up_proj apart); the output is summed.",
        build=lambda call: Construct(f"{MESHPLAN_STYLES}.TensorParallelExperts", (call.parts,)),
        args={"parts": SettingSchema(IntType(1), 2, doc="gate_up_proj packs N equal projections (gate, up); "
                                     "each is sharded")},
        applies_to=("experts",),
        # Placements in transformers' layout; transposed experts hold I on the other dim.
        contract=Contract(params={"gate_up_proj": "shard(1)", "gate_proj": "shard(1)", "up_proj": "shard(1)",
                                  "down_proj": "shard(2)"}, whole=True),
        divides={"experts": Divides("intermediate_dim", "{n} intermediate features per expert")},
        fused_params={"gate_up_proj": 1},
    ),
    "head_params": StyleSchema(
        "Shard an attention module's own per-head parameters (attention sinks, a per-head gate bias: "
        "1-D, one entry per query head) with the heads; its code sees this rank's entries.",
        build=lambda call: Construct(f"{MESHPLAN_STYLES}.HeadParamsParallel"),
        applies_to=("attention",),
        contract=Contract(input="untouched", output="untouched", head_params=True),
        divides={"attention": Divides("num_heads", "{n} attention heads")},
    ),
    "mla_kv_a": StyleSchema(
        "Latent attention's kv_a projection (DeepSeek-V2/V3, MiniCPM3): its weight stays replicated and "
        "its last `rope` output features, the rotary key every head shares, have their gradient summed "
        "over the dimension (each rank's heads give only part of it).",
        build=lambda call: Construct(f"{MESHPLAN_STYLES}.SharedTailParallel", (call.rope,)),
        args={"rope": SettingSchema(IntType(1), None, required=True,
                                    doc="the width of the rotary key part (the config's qk_rope_head_dim)")},
        applies_to=("linear",),
        contract=Contract(shared_tail=True),
    ),
    "replicate": StyleSchema(
        "Keep the module's parameters replicated over the dimension (as DTensors).",
        build=lambda call: Construct(f"{MESHPLAN_STYLES}.ReplicateParallel", (), _io(call)),
        args={"input": REPLICATED, "output": REPLICATED, "local_output": LOCAL_TRUE},
        contract=Contract(replicated_params=True),
        adapter={"linear": _replicate_adapter},
    ),
}
