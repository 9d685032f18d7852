"""Abstract layouts of activations along the tensor-parallel dimension, and op rules.

Every traced value gets a `Layout`: replicated, sharded on one tensor dimension,
partial (a sum still to be reduced), or unknown; and whether it is a DTensor (which
knows its own layout, so torch redistributes it correctly) or a plain local tensor
(which does not — the case where plans go silently wrong, because ParallelStyles hand
plain tensors to the code between planned modules).

The rules below say what an ATen op does to the layouts of its inputs, for plain
tensors. A rule returns the output layout or raises `LayoutProblem`; an op without a
rule that touches a sharded plain tensor is a problem too, never a guess. The rules are
modelled on DTensor's own sharding propagation (`torch.distributed.tensor._ops`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from math import prod
from typing import Literal

from meshplan.dsl.errors import Span

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Layout:
    kind: Literal["replicate", "shard", "partial", "unknown"]
    dim: int | None = None  # for shard: a non-negative tensor dimension
    parts: int = 1  # a fused value: the local tensor is the parts' shards, concatenated
    dtensor: bool = False
    # The plan line that made this value non-replicated (for messages); not compared.
    origin: Span | None = field(default=None, compare=False)

    def describe(self) -> str:
        what = {
            "replicate": "replicated",
            "partial": "a partial sum",
            "unknown": "of unknown layout",
        }.get(self.kind, f"sharded on dim {self.dim}")
        if self.parts > 1:
            what += f" ({self.parts} fused parts)"
        return what + (" (DTensor)" if self.dtensor else " (plain tensor)")

    def same_placement(self, other: Layout) -> bool:
        return (self.kind, self.dim, self.parts) == (other.kind, other.dim, other.parts)


REPLICATE = Layout("replicate")
UNKNOWN = Layout("unknown")


def shard(
    dim: int, rank: int, *, dtensor: bool = False, origin: Span | None = None, parts: int = 1
) -> Layout:
    return Layout("shard", dim % rank if rank else dim, parts, dtensor, origin)


class LayoutProblem(Exception):
    def __init__(self, message: str, code: str = "E506", hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.hint = hint


def op_name(op: str) -> str:
    """`aten.add.Tensor` → `add`."""
    parts = op.split(".")
    return parts[1] if len(parts) >= 2 and parts[0] == "aten" else op


IDENTITY = {
    "alias",
    "clone",
    "contiguous",
    "detach",
    "to",
    "_to_copy",
    "lift_fresh_copy",
    "dropout",
    "type_as",
    "_assert_tensor_metadata",
    "view_as",
    "copy",
}
ELEMENTWISE = {
    "add",
    "sub",
    "mul",
    "div",
    "neg",
    "pow",
    "rsqrt",
    "sqrt",
    "exp",
    "log",
    "tanh",
    "sigmoid",
    "silu",
    "gelu",
    "relu",
    "softplus",
    "sin",
    "cos",
    "abs",
    "where",
    "masked_fill",
    "clamp",
    "clamp_min",
    "clamp_max",
    "maximum",
    "minimum",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "logical_and",
    "logical_or",
    "logical_not",
    "__and__",
    "__or__",
    "bitwise_and",
    "bitwise_or",
    "bitwise_not",
    "reciprocal",
    "erf",
    "square",
    "rsub",
    "fill",
    "zeros_like",
    "ones_like",
    "full_like",
    "empty_like",
    "gelu_",
    "tanh_",
    "add_",
    "mul_",
    "div_",
    "sub_",
    "log1p",
    "expm1",
    "sign",
    "floor",
    "ceil",
    "round",
    "trunc",
    "isnan",
    "isinf",
    "mish",
    "hardtanh",
    "leaky_relu",
    "elu",
    "celu",
    "selu",
    "hardsigmoid",
    "hardswish",
}
# Elementwise ops through which a partial sum stays a partial sum (linear in it).
LINEAR_IN_PARTIAL = {
    "add",
    "sub",
    "neg",
    "mul",
    "div",
    "to",
    "_to_copy",
    "alias",
    "clone",
    "contiguous",
    "detach",
    "dropout",
    "type_as",
    "copy",
}
REDUCTIONS = {
    "mean",
    "sum",
    "amax",
    "amin",
    "max",
    "min",
    "var",
    "std",
    "var_mean",
    "softmax",
    "_softmax",
    "log_softmax",
    "_log_softmax",
    "cumsum",
    "cumprod",
    "norm",
    "linalg_vector_norm",
    "logsumexp",
    "argmax",
    "argmin",
    "prod",
    "any",
    "all",
    "native_layer_norm",
    "layer_norm",
    "rms_norm",
    "_fused_rms_norm",
    "group_norm",
    "native_group_norm",
}
FACTORIES = {
    "arange",
    "ones",
    "zeros",
    "full",
    "empty",
    "new_ones",
    "new_zeros",
    "new_empty",
    "new_full",
    "scalar_tensor",
    "rand",
    "randn",
    "tensor",
    "empty_strided",
    "eye",
    "linspace",
    "triu",
    "tril",
}
ATTENTION = {
    "scaled_dot_product_attention",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_cudnn_attention",
}


def broadcast(op: str, inputs: Sequence[tuple[Layout, Shape]], out: Shape) -> Layout:
    """Elementwise ops on plain tensors: sharded inputs must agree, replicated ones broadcast."""
    rank = len(out)
    sharded: list[tuple[Layout, int]] = []
    partial: list[Layout] = []
    for layout, shape in inputs:
        if layout.kind == "unknown":
            return replace(UNKNOWN, origin=layout.origin)
        if layout.kind == "shard" and layout.dim is not None:
            sharded.append((layout, layout.dim + rank - len(shape)))
        elif layout.kind == "partial":
            partial.append(layout)
    if partial:
        if op not in LINEAR_IN_PARTIAL:
            raise LayoutProblem(
                f"`{op}` is applied to a partial sum that was never reduced",
                "E507",
                "reduce it first: give the producing rowwise a `replicate` or `shard(…)` output",
            )
        if sharded:
            raise LayoutProblem(f"`{op}` combines a partial sum with a sharded value", "E507")
        if op in ("add", "sub") and len(partial) < sum(1 for _, s in inputs if s):
            raise LayoutProblem(
                f"`{op}` adds a replicated value to a partial sum: every rank would add it "
                "once, so the reduced result counts it tp times",
                "E507",
                "reduce the partial sum first (rowwise output = replicate or shard(1))",
            )
        if op in ("mul", "div") and len(partial) > 1:
            raise LayoutProblem(f"`{op}` multiplies two partial sums", "E507")
        return replace(partial[0], dtensor=False)
    if not sharded:
        return REPLICATE
    first, dim = sharded[0]
    for layout, d in sharded[1:]:
        if d != dim or layout.parts != first.parts:
            raise LayoutProblem(
                f"`{op}` combines values sharded on different dimensions ({dim} and {d})"
            )
    for layout, shape in inputs:
        if layout.kind != "replicate" or not shape:
            continue
        aligned = dim - (rank - len(shape))
        if 0 <= aligned < len(shape) and shape[aligned] != 1:
            raise LayoutProblem(
                f"`{op}` combines a value sharded on dim {dim} with a replicated one of the "
                f"full size {shape[aligned]} on that dim: the local shapes differ"
            )
    return Layout("shard", dim, first.parts, False, first.origin)


def map_reshape(layout: Layout, before: Shape, after: Shape) -> Layout:
    """Where a sharded dimension goes through view/reshape (shapes are global)."""
    assert layout.dim is not None
    d = layout.dim
    i = o = 0
    while i < len(before) or o < len(after):
        # Grow a group of input dims and output dims with equal products.
        i0, o0 = i, o
        pi = before[i] if i < len(before) else 1
        po = after[o] if o < len(after) else 1
        i += 1
        o += 1
        while pi != po:
            if pi < po and i < len(before):
                pi *= before[i]
                i += 1
            elif o < len(after):
                po *= after[o]
                o += 1
            else:
                break
        if i0 <= d < i:
            group_in = list(range(i0, i))
            group_out = [k for k in range(o0, o) if k < len(after)]
            # The shard lands on the first output dim of the group that is not 1, and
            # is valid only if every input dim before `d` in the group has size 1.
            if any(before[k] != 1 for k in group_in if k < d):
                raise LayoutProblem(
                    f"a reshape {list(before)} → {list(after)} folds sharded dim {d} "
                    "into a larger dimension behind another one"
                )
            targets = [k for k in group_out if after[k] != 1] or group_out
            if layout.parts > 1 and len(group_in) + len(group_out) > 2:
                raise LayoutProblem(
                    f"a reshape {list(before)} → {list(after)} splits a fused "
                    f"({layout.parts}-part) sharded dimension"
                )
            if not targets:
                raise LayoutProblem(
                    f"a reshape {list(before)} → {list(after)} drops sharded dim {d}"
                )
            return replace(layout, dim=targets[0])
    raise LayoutProblem(f"a reshape {list(before)} → {list(after)} loses track of sharded dim {d}")


def normalize(dim: int, rank: int) -> int:
    return dim % rank if rank else dim


def reduced_dims(
    op: str, args: Sequence[object], kwargs: dict[str, object], rank: int
) -> list[int] | None:
    """The dimensions a reduction reduces over (None: all of them)."""
    if op in (
        "native_layer_norm",
        "layer_norm",
        "rms_norm",
        "_fused_rms_norm",
        "group_norm",
        "native_group_norm",
    ):
        shape = args[1] if len(args) > 1 else kwargs.get("normalized_shape")
        n = len(shape) if isinstance(shape, list | tuple) else 1
        return list(range(rank - n, rank))
    if op in (
        "softmax",
        "_softmax",
        "log_softmax",
        "_log_softmax",
        "cumsum",
        "cumprod",
        "argmax",
        "argmin",
    ):
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        return [normalize(int(dim), rank)] if isinstance(dim, int) else None
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    if isinstance(dim, int):
        return [normalize(dim, rank)]
    if isinstance(dim, list | tuple) and dim:
        return [normalize(int(d), rank) for d in dim]
    return None


def keepdim(op: str, args: Sequence[object], kwargs: dict[str, object]) -> bool:
    if op in (
        "softmax",
        "_softmax",
        "log_softmax",
        "_log_softmax",
        "cumsum",
        "cumprod",
        "native_layer_norm",
        "layer_norm",
        "rms_norm",
        "_fused_rms_norm",
        "group_norm",
        "native_group_norm",
    ):
        return True
    value = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
    return bool(value)


def product(shape: Shape) -> int:
    return prod(shape)
