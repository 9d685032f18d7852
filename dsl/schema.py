"""What a plan may say: sections, their settings and items, styles, and value types.

The grammar only knows shapes (`KIND on X { key = value … }`); this table gives them
meaning. A ParallelStyle is one record of the style registry (`dsl/styles.py`, which
reads the value types here); to add a section, a `SectionSchema` in `SECTIONS` and
its interpretation in `dsl/checks.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from . import ast
from .spec import Placement

# ------------------------------------------------------------------ value types


class TypeProblem(Exception):
    """A value that does not fit its type; `code` is the diagnostic to report."""

    def __init__(self, code: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint


def float_text(value: float) -> str:
    """A float as plan text that reads back as the same float: Python's shortest repr,
    with `.0` before an exponent that has no dot (`1e-20` → `1.0e-20`), since a float
    of the language always has a fractional part."""
    text = repr(float(value))
    if "e" in text and "." not in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}.0e{exponent}"
    return text


def _shown(value: ast.Value) -> str:
    if isinstance(value, ast.Int):
        return str(value.value)
    if isinstance(value, ast.Float):
        return float_text(value.value)
    if isinstance(value, ast.Bool):
        return "true" if value.value else "false"
    if isinstance(value, ast.Str):
        return f'"{value.value}"'
    if isinstance(value, ast.Name):
        return value.name
    return f"{value.name}({', '.join(_shown(a) for a in value.args)})"


shown = _shown


class ValueType:
    """Converts a syntax value to a Python value, or raises TypeProblem."""

    description = "a value"

    def convert(self, value: ast.Value) -> object:
        raise NotImplementedError

    def wrong(self, value: ast.Value, hint: str | None = None) -> TypeProblem:
        return TypeProblem("E301", f"expected {self.description}, found `{_shown(value)}`", hint)


@dataclass(frozen=True)
class IntType(ValueType):
    minimum: int | None = 1

    @property
    def description(self) -> str:  # type: ignore[override]
        if self.minimum is None:
            return "an integer"
        return "a positive integer" if self.minimum == 1 else f"an integer ≥ {self.minimum}"

    def convert(self, value: ast.Value) -> int:
        if not isinstance(value, ast.Int):
            raise self.wrong(value)
        if self.minimum is not None and value.value < self.minimum:
            raise TypeProblem("E303", f"expected {self.description}, found {value.value}")
        return value.value


@dataclass(frozen=True)
class NumberType(ValueType):
    """A real number: written `0.05` or, where it is whole, `16`; bounds are optional,
    each inclusive or not (`low_open`: strictly above `low`)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    @property
    def description(self) -> str:  # type: ignore[override]
        low = None if self.low is None else float_text(self.low).removesuffix(".0")
        high = None if self.high is None else float_text(self.high).removesuffix(".0")
        if low is not None and high is not None:
            return f"a number in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if low is not None:
            return f"a number {'>' if self.low_open else '≥'} {low}"
        if high is not None:
            return f"a number {'<' if self.high_open else '≤'} {high}"
        return "a number"

    def convert(self, value: ast.Value) -> float:
        if not isinstance(value, ast.Int | ast.Float):
            raise self.wrong(value)
        number = float(value.value)
        below = self.low is not None and (number <= self.low if self.low_open else number < self.low)
        above = self.high is not None and (number >= self.high if self.high_open else number > self.high)
        if below or above:
            raise TypeProblem("E303", f"expected {self.description}, found {_shown(value)}")
        return number


@dataclass(frozen=True)
class BoolType(ValueType):
    description = "`true` or `false`"

    def convert(self, value: ast.Value) -> bool:
        if not isinstance(value, ast.Bool):
            raise self.wrong(value)
        return value.value


DTYPES: Mapping[str, str] = {
    "bf16": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "fp32": "fp32", "float32": "fp32", "float": "fp32",
    "fp64": "fp64", "float64": "fp64", "double": "fp64",
}


@dataclass(frozen=True)
class DtypeType(ValueType):
    description = "a dtype (`bf16`, `fp16`, `fp32`, `fp64`)"

    def convert(self, value: ast.Value) -> str:
        if isinstance(value, ast.Name):
            if value.name in DTYPES:
                return DTYPES[value.name]
            from .errors import did_you_mean

            raise TypeProblem("E204", f"unknown dtype `{value.name}`",
                              did_you_mean(value.name, DTYPES) or "dtypes are bf16, fp16, fp32, fp64")
        raise self.wrong(value)


@dataclass(frozen=True)
class StorageType(ValueType):
    """What packed 4-bit data is stored in: `uint8`, or a float dtype (bitsandbytes'
    quant_storage), dtype aliases accepted."""

    description = "`uint8` or a dtype (`bf16`, `fp16`, `fp32`)"

    def convert(self, value: ast.Value) -> str:
        if isinstance(value, ast.Name) and value.name == "uint8":
            return "uint8"
        if isinstance(value, ast.Name) and value.name not in DTYPES:
            from .errors import did_you_mean

            raise TypeProblem("E204", f"unknown storage dtype `{value.name}`",
                              did_you_mean(value.name, ["uint8", *DTYPES]) or f"expected {self.description}")
        return DtypeType().convert(value)


@dataclass(frozen=True)
class EnumType(ValueType):
    members: tuple[str, ...]

    @property
    def description(self) -> str:  # type: ignore[override]
        from .errors import one_of

        return "one of " + one_of(self.members)

    def convert(self, value: ast.Value) -> str:
        if isinstance(value, ast.Name | ast.Str):
            text = value.name if isinstance(value, ast.Name) else value.value
            if text in self.members:
                return text
            from .errors import did_you_mean, one_of

            raise TypeProblem("E208", f"`{text}` is not {self.description}",
                              did_you_mean(text, self.members) or f"use {one_of(self.members)}")
        raise self.wrong(value)


PLACEMENT_NAMES = ("replicate", "shard", "partial")


@dataclass(frozen=True)
class PlacementType(ValueType):
    """`replicate`, `shard(d)`, `partial`; with allow_none also `none` (leave as is)."""

    allow_none: bool = False

    @property
    def description(self) -> str:  # type: ignore[override]
        extra = ", `none`" if self.allow_none else ""
        return f"a placement (`replicate`, `shard(d)`, `partial`{extra})"

    def convert(self, value: ast.Value) -> Placement | None:
        from .errors import did_you_mean

        names = (*PLACEMENT_NAMES, "none") if self.allow_none else PLACEMENT_NAMES
        if isinstance(value, ast.Name):
            if value.name == "none" and self.allow_none:
                return None
            if value.name in ("replicate", "partial"):
                return Placement(value.name)  # type: ignore[arg-type]
            if value.name == "shard":
                raise TypeProblem("E301", "`shard` needs the tensor dimension it splits",
                                  "write `shard(0)`, `shard(1)` or `shard(-1)`")
            raise TypeProblem("E205", f"unknown placement `{value.name}`",
                              did_you_mean(value.name, names) or f"expected {self.description}")
        if isinstance(value, ast.Call):
            if value.name == "shard":
                if len(value.args) != 1 or not isinstance(value.args[0], ast.Int):
                    raise TypeProblem("E301", f"`{_shown(value)}`: shard takes one integer dimension",
                                      "write `shard(1)` or `shard(-1)`")
                return Placement("shard", value.args[0].value)
            if value.name in ("replicate", "partial"):
                raise TypeProblem("E301", f"`{value.name}` takes no arguments", f"write `{value.name}`")
            raise TypeProblem("E205", f"unknown placement `{value.name}`",
                              did_you_mean(value.name, names) or f"expected {self.description}")
        raise self.wrong(value)


@dataclass(frozen=True)
class ReshardType(ValueType):
    """FSDP's reshard_after_forward: true, false, auto, or a smaller world to reshard to."""

    description = "`true`, `false`, `auto` or an integer ≥ 2"

    def convert(self, value: ast.Value) -> bool | int | str:
        if isinstance(value, ast.Bool):
            return value.value
        if isinstance(value, ast.Name) and value.name == "auto":
            return "auto"
        if isinstance(value, ast.Int):
            return IntType(2).convert(value)
        raise self.wrong(value)


@dataclass(frozen=True)
class SizeType(ValueType):
    """A mesh dimension's size: a positive integer or `auto`."""

    description = "a positive integer or `auto`"

    def convert(self, value: ast.Value) -> int | None:
        if isinstance(value, ast.Name) and value.name == "auto":
            return None
        if isinstance(value, ast.Int):
            return IntType(1).convert(value)
        from .errors import did_you_mean

        raise self.wrong(value, did_you_mean(value.name, ["auto"]) if isinstance(value, ast.Name) else None)


# --------------------------------------------------------------------- schemas


@dataclass(frozen=True)
class SettingSchema:
    type: ValueType
    default: object = None
    required: bool = False
    doc: str = ""


Presence = Literal["required", "optional", "forbidden"]


@dataclass(frozen=True)
class ItemSchema:
    doc: str
    patterns: Presence = "forbidden"
    settings: Mapping[str, SettingSchema] = field(default_factory=dict)
    repeat: bool = False


@dataclass(frozen=True)
class SectionSchema:
    doc: str
    on: Literal["one", "many", "none"] = "none"
    patterns: Presence = "forbidden"
    settings: Mapping[str, SettingSchema] = field(default_factory=dict)
    items: Mapping[str, ItemSchema] = field(default_factory=dict)
    rules: bool = False
    # May the section appear more than once (with different patterns)?
    repeat: bool = False
    # The one mesh dimension the section's `on` must name (directly or as a submesh of it).
    dimension: str | None = None


ADAPTER_METHODS = ("lora",)
QUANT_FORMATS = ("nf4",)
QUANT_BACKENDS = ("torchao", "bitsandbytes")

RESHARD = SettingSchema(ReshardType(), "auto",
                        doc="free parameters after forward: true, false, auto (true except the "
                            "last unit), or N to keep them sharded over N ranks")
DTYPE = DtypeType()

SECTIONS: Mapping[str, SectionSchema] = {
    "tensor_parallel": SectionSchema(
        "Tensor (and sequence) parallelism: `PATTERN : STYLE` rules on one mesh dimension.",
        on="one", rules=True, dimension="tp",
    ),
    "activation_checkpoint": SectionSchema(
        "Recompute the matched modules' activations in backward.",
        patterns="required", repeat=True,
        settings={
            "mode": SettingSchema(EnumType(("full", "selective")), "full",
                                  doc="full: recompute whole blocks; selective: save matmul outputs"),
            "every": SettingSchema(IntType(1), 1, doc="checkpoint every N-th matched module"),
        },
    ),
    "fully_shard": SectionSchema(
        "FSDP2: shard parameters over the named dimensions (two names: HSDP).",
        on="many",
        items={
            "mixed_precision": ItemSchema(
                "FSDP2 MixedPrecisionPolicy.",
                settings={
                    "param": SettingSchema(DTYPE, doc="dtype of unsharded parameters in compute"),
                    "reduce": SettingSchema(DTYPE, doc="dtype of gradient reduction"),
                    "output": SettingSchema(DTYPE, doc="dtype of module outputs"),
                    "cast_forward_inputs": SettingSchema(BoolType(), True),
                },
            ),
            "offload": ItemSchema(
                "Keep sharded parameters, gradients and optimizer state on the CPU.",
                settings={"pin_memory": SettingSchema(BoolType(), True)},
            ),
            "unit": ItemSchema("One FSDP unit (one `fully_shard` call) over the matched modules.",
                               patterns="required", settings={"reshard_after_forward": RESHARD},
                               repeat=True),
            "root": ItemSchema("Wrap the whole model (required).",
                               settings={"reshard_after_forward": RESHARD}),
        },
    ),
    "context_parallel": SectionSchema(
        "Split the sequence over one mesh dimension inside attention.",
        on="one", dimension="cp",
        items={"attention": ItemSchema("Attention modules computed context-parallel.",
                                       patterns="required", repeat=True)},
        settings={
            "load_balance": SettingSchema(EnumType(("headtail", "none")), "headtail",
                                          doc="headtail: rank r holds chunks r and 2·cp−1−r"),
            "rotate": SettingSchema(EnumType(("allgather", "ring")), "allgather",
                                    doc="how keys and values travel between ranks"),
        },
    ),
    "expert_parallel": SectionSchema(
        "Shard MoE experts over the expert mesh dimension.",
        on="one", dimension="ep",
        items={"experts": ItemSchema("MoE expert modules.", patterns="required", repeat=True)},
        settings={"dispatch": SettingSchema(EnumType(("alltoall", "allgather")), "alltoall")},
    ),
    "pipeline": SectionSchema(
        "Pipeline parallelism over one mesh dimension.",
        on="one", dimension="pp",
        items={"split": ItemSchema("A stage begins at each matched module.", patterns="required",
                                   repeat=True)},
        settings={
            "schedule": SettingSchema(
                EnumType(("gpipe", "1f1b", "interleaved_1f1b", "interleaved_zero_bubble", "zbv")), "1f1b"),
            "microbatches": SettingSchema(IntType(1), required=True),
            "virtual_stages": SettingSchema(IntType(1), 1, doc="stages per rank"),
        },
    ),
    "adapters": SectionSchema(
        "PEFT adapters (LoRA) on the base modules `targets` names; the rest is frozen. "
        "`quantize { … }` holds those modules' base weights in 4 bits (QLoRA).",
        settings={
            "method": SettingSchema(EnumType(ADAPTER_METHODS), "lora", doc="the adapter method"),
            "rank": SettingSchema(IntType(1), required=True, doc="write e.g. `rank = 16`: the adapters' rank r"),
            # PEFT's LoraConfig default (lora_alpha = 8), so that a plan without `alpha`
            # scales the update as PEFT would.
            "alpha": SettingSchema(NumberType(0, low_open=True), 8.0,
                                   doc="LoRA scales the adapter's output by alpha / rank (default 8, as PEFT)"),
            "dropout": SettingSchema(NumberType(0, 1, high_open=True), 0.0,
                                     doc="dropout on the adapter's input, in [0, 1)"),
            "dtype": SettingSchema(DTYPE, None, doc="the adapters' parameter dtype (default: the base's)"),
        },
        items={
            "targets": ItemSchema("Base modules that get an adapter (as named in the unadapted model).",
                                  patterns="required", repeat=True),
            "quantize": ItemSchema(
                "Hold the adapted modules' frozen base weights as NF4 (QLoRA).",
                settings={
                    "format": SettingSchema(EnumType(QUANT_FORMATS), "nf4", doc="the 4-bit format"),
                    "backend": SettingSchema(EnumType(QUANT_BACKENDS), "torchao",
                                             doc="torchao's NF4Tensor (FSDP2-aware) or bitsandbytes' Linear4bit"),
                    "compute": SettingSchema(DTYPE, "bf16", doc="the dtype the base is dequantised to"),
                    "storage": SettingSchema(StorageType(), "uint8",
                                             doc="what the packed data is stored in (bitsandbytes' quant_storage)"),
                    "block_size": SettingSchema(IntType(1), 64, doc="values per absmax scaler"),
                    "scaler_block_size": SettingSchema(IntType(1), 256,
                                                       doc="scalers per double-quantisation scale"),
                },
            ),
        },
    ),
    "packing": SectionSchema(
        "Pack sequences into bins of seq_len tokens.",
        settings={
            "algorithm": SettingSchema(EnumType(("ffd", "bfd", "greedy")), "ffd"),
            "seq_len": SettingSchema(IntType(1), required=True),
            "format": SettingSchema(EnumType(("varlen", "thd", "segment_ids", "padded")), "varlen"),
            "max_per_bin": SettingSchema(IntType(1), None),
            "overlong": SettingSchema(EnumType(("error", "drop", "truncate", "split")), "error"),
            "seed": SettingSchema(IntType(0), 0),
        },
    ),
}

# Styles are the records of the style registry, `dsl/styles.py`, which builds them from
# the value types above.
