"""Op rules: what each ATen op does to the layouts of plain (local) tensors.

`RULES` maps a rule name to an `OpRule`: the ops (ATen names without the overload,
`aten.add.Tensor` → `add`) it covers and a small function from the op's input layouts
and global shapes (`OpCall`) to its output layout. A rule either returns the output
layout, returns None (the rule does not cover this case), or raises `LayoutProblem`.
The rules are modelled on DTensor's sharding propagation (`torch.distributed.tensor._ops`),
but for plain tensors: a DTensor knows its layout and torch redistributes it, a plain
local tensor does not, so a rule that cannot say what the local result means refuses.

`propagate` applies the table with the two guarantees that hold for every op:
- an unreduced partial sum reaches only ops that are linear in it (rules with
  `takes_partial`, which handle partial inputs themselves); any other op refuses it
  (E507) before its rule runs;
- an op with no rule (or whose rule does not cover the case) that touches a sharded or
  partial value is reported, never guessed.

Every op belongs to at most one rule. Each rule is tested on a traced tiny module, and
replacing any rule by a permissive one makes its tests fail (tests/test_op_rules.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .layout import REPLICATE, UNKNOWN, Layout, LayoutProblem, Shape, normalize

Result = Layout | tuple[Layout, ...]


def op_name(op: str) -> str:
    """`aten.add.Tensor` → `add`."""
    parts = op.split(".")
    return parts[1] if len(parts) >= 2 and parts[0] == "aten" else op


@dataclass(frozen=True)
class OpCall:
    """One traced op as a rule sees it.

    `inputs`: the layout (as the consuming code sees it) and global shape of each value
    the op reads, in argument order (a list argument's elements in order; a non-tensor
    value has shape ()); `args`/`kwargs`: the traced arguments; `out`: the global output
    shape (() when the op returns several tensors); `shapes`: a multi-output op's shapes.
    """

    name: str
    inputs: tuple[tuple[Layout, Shape], ...]
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    out: Shape = ()
    shapes: tuple[Shape | None, ...] = ()

    @property
    def first(self) -> Layout:
        return self.inputs[0][0]

    @property
    def in_shape(self) -> Shape:
        return self.inputs[0][1]

    @property
    def touched(self) -> Layout:
        """The first input that is not replicated (what a refusal talks about)."""
        return next((lay for lay, _ in self.inputs if lay.kind != "replicate"), self.first)


@dataclass(frozen=True)
class OpRule:
    """A rule for a family of ops that act alike on layouts.

    `takes_partial`: the rule handles partial-sum inputs itself (the op is linear in
    them); otherwise a partial first input is refused before the rule runs. `fresh`: the
    output is made from the shapes given as arguments, so it is replicated whatever the
    inputs; the rule runs before the inputs are looked at.
    """

    ops: frozenset[str]
    apply: Callable[[OpCall], Result | None]
    takes_partial: bool = False
    fresh: bool = False


# --------------------------------------------------------------------------- op families

IDENTITY = frozenset({
    "alias", "clone", "contiguous", "detach", "to", "_to_copy", "lift_fresh_copy", "dropout",
    "type_as", "_assert_tensor_metadata", "view_as", "copy",
})  # fmt: skip
ELEMENTWISE = frozenset({
    "add", "sub", "mul", "div", "neg", "pow", "rsqrt", "sqrt", "exp", "log", "tanh", "sigmoid",
    "silu", "gelu", "relu", "softplus", "sin", "cos", "abs", "where", "masked_fill", "clamp",
    "clamp_min", "clamp_max", "maximum", "minimum", "eq", "ne", "lt", "le", "gt", "ge",
    "logical_and", "logical_or", "logical_not", "__and__", "__or__", "bitwise_and", "bitwise_or",
    "bitwise_not", "reciprocal", "erf", "square", "rsub", "fill", "zeros_like", "ones_like",
    "full_like", "empty_like", "gelu_", "tanh_", "add_", "mul_", "div_", "sub_", "log1p", "expm1",
    "sign", "floor", "ceil", "round", "trunc", "isnan", "isinf", "mish", "hardtanh", "leaky_relu",
    "elu", "celu", "selu", "hardsigmoid", "hardswish",
})  # fmt: skip
# Elementwise ops through which a partial sum stays a partial sum (linear in it).
LINEAR_IN_PARTIAL = frozenset({
    "add", "sub", "neg", "mul", "div", "to", "_to_copy", "alias", "clone", "contiguous", "detach",
    "dropout", "type_as", "copy",
})  # fmt: skip
FACTORIES = frozenset({
    "arange", "ones", "zeros", "full", "empty", "new_ones", "new_zeros", "new_full",
    "scalar_tensor", "rand", "randn", "tensor", "empty_strided", "eye", "linspace", "triu", "tril",
})  # fmt: skip
RESHAPES = frozenset({
    "view", "reshape", "_unsafe_view", "view_copy", "unsqueeze", "squeeze", "flatten", "unflatten",
    "squeeze_copy", "unsqueeze_copy",
})  # fmt: skip
REDUCTIONS = frozenset({
    "mean", "sum", "amax", "amin", "max", "min", "var", "std", "var_mean", "norm",
    "linalg_vector_norm", "logsumexp", "argmax", "argmin", "prod", "any", "all",
})  # fmt: skip
# Along one dimension, keeping the shape.
SCANS = frozenset({"softmax", "_softmax", "log_softmax", "_log_softmax", "cumsum", "cumprod"})
NORMALIZATIONS = frozenset({
    "native_layer_norm", "layer_norm", "rms_norm", "_fused_rms_norm", "group_norm",
    "native_group_norm",
})  # fmt: skip
ATTENTION = frozenset({
    "scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_cudnn_attention",
})  # fmt: skip
SPLITS = frozenset({"split", "split_with_sizes", "chunk", "unbind", "tensor_split"})
JOINS = frozenset({"cat", "concat", "stack"})


# --------------------------------------------------------------------------- rules


def identity(call: OpCall) -> Result:
    """Copies, casts, dropout: the output has the first input's layout, partial sums
    included (each is linear in its input)."""
    return call.first


def elementwise(call: OpCall) -> Result:
    """Pointwise ops need agreeing layouts: sharded inputs on the same (broadcast-aligned)
    dimension and number of fused parts; replicated inputs may only broadcast along the
    sharded dimension (size 1 there), else the local shapes differ. A partial sum passes
    only through ops linear in it, never added to a replicated value (counted tp times)
    nor multiplied by another partial sum."""
    return broadcast(call.name, call.inputs, call.out)


def factory(call: OpCall) -> Result:
    """Tensors made from shapes (arange, zeros, new_ones, triu, …) are replicated."""
    return REPLICATE


def new_empty(call: OpCall) -> Result:
    """An uninitialised buffer the code then fills (`x.new_empty(*x.shape[:-1], d)`,
    DeepSeek's key buffer) is sized from its source: made from a value sharded on a
    dimension it keeps (same rank and traced size there), it is sharded alike; else it
    is replicated, like any tensor made from a shape."""
    first, shape = call.first, call.in_shape
    if first.kind == "shard" and first.dim is not None and len(call.out) == len(shape) \
            and call.out[first.dim] == shape[first.dim]:
        return replace(first, dtensor=False)
    return REPLICATE


def inplace_copy(call: OpCall) -> Result:
    """`dst.copy_(src)` writes into `dst`, which keeps its layout: `src` must agree with
    it, a replicated source only broadcast along the sharded dimension (size 1 there, or
    expanded from size 1); a sharded value written into a replicated buffer would fill
    it with one rank's piece."""
    (dst, _), (src, _) = call.inputs[0], call.inputs[1]
    if dst.kind == "replicate" and src.kind != "replicate":
        raise LayoutProblem(f"`copy_` writes a value {src.describe()} into a replicated buffer")
    broadcast(call.name, call.inputs[:2], call.out)
    return dst


def reshape(call: OpCall) -> Result | None:
    """view/reshape/(un)squeeze/flatten map the sharded dimension to where it lands
    (hidden → heads is fine when the shard is the group's leading dimension, not folded
    behind another, and a fused dimension is not split); a partial sum stays partial."""
    first = call.first
    if first.kind == "shard":
        return map_reshape(first, call.in_shape, call.out)
    if first.kind == "partial":
        return first
    return None


def expand(call: OpCall) -> Result | None:
    """expand keeps the sharded dimension, shifted by the leading dimensions it adds."""
    first = call.first
    if first.kind == "shard" and first.dim is not None:
        return replace(first, dim=first.dim + len(call.out) - len(call.in_shape))
    return None


def complex_view(call: OpCall) -> Result | None:
    """view_as_complex folds the last dimension (the real and imaginary pair) into the
    element, view_as_real unfolds it (DeepSeek-V2's rotary): another sharded dimension
    keeps its place; the pair itself sharded is an error (each rank holds half of it)."""
    first = call.first
    if first.kind != "shard" or first.dim is None:
        return None
    if call.name == "view_as_complex" and first.dim == len(call.in_shape) - 1:
        raise LayoutProblem("`view_as_complex` folds sharded dim "
                            f"{first.dim} (the real and imaginary pair)")
    return first


def transpose(call: OpCall) -> Result | None:
    """transpose/swapaxes move the sharded dimension with the swap."""
    first = call.first
    if first.dim is None:
        return None
    a, b = (normalize(int(x), len(call.in_shape)) for x in call.args[1:3])
    d = first.dim
    return replace(first, dim=b if d == a else a if d == b else d)


def matrix_transpose(call: OpCall) -> Result | None:
    """t swaps the two dimensions of a matrix."""
    first = call.first
    if first.dim is None:
        return None
    return replace(first, dim=1 - first.dim)


def permute(call: OpCall) -> Result | None:
    """permute moves the sharded dimension to its place in the new order."""
    first = call.first
    if first.dim is None:
        return None
    order = [normalize(int(x), len(call.in_shape)) for x in call.args[1]]
    return replace(first, dim=order.index(first.dim))


def select(call: OpCall) -> Result | None:
    """select on another dimension drops it (the shard shifts down); on the sharded
    dimension it is an error: the index is global, each rank holds other indices."""
    first = call.first
    if first.dim is None:
        return None
    dim = normalize(int(call.args[1]), len(call.in_shape))
    if dim == first.dim:
        raise LayoutProblem(f"`select` picks one index of sharded dim {dim}")
    return replace(first, dim=first.dim - (dim < first.dim))


def slice_(call: OpCall) -> Result | None:
    """slice/narrow of another dimension keeps the layout; cutting the sharded dimension
    at fixed offsets (a fused qkv split by `[:, :, :q]`) is an error: each rank would cut
    its own piece at offsets meant for the whole value. A full-range slice is a no-op.
    A per-head fused projection (viewed into heads first, `reshape` moving the shard to
    the heads dim) is cut on the last dim, another dimension: whole heads, fine."""
    first = call.first
    if first.dim is None:
        return None
    dim = normalize(int(call.args[1]) if len(call.args) > 1 else 0, len(call.in_shape))
    if dim == first.dim and tuple(call.out) != tuple(call.in_shape):
        raise LayoutProblem(
            f"`{call.name}` cuts sharded dim {dim} at fixed offsets: each rank would cut "
            "its own piece at offsets meant for the whole",
            hint="a fused projection must be split by parts: shard it with "
            "`parts = N` and keep the code splitting into N equal chunks",
        )
    return first


def split(call: OpCall) -> Result | None:
    """split/chunk/unbind along another dimension: every piece keeps the layout (unbind
    shifts it down). Along the sharded dimension only a fused value (`parts = N`) split
    into its N equal parts is fine — each piece is then sharded like one part; pieces of
    fixed size, or unbinding the sharded dimension, are errors."""
    first = call.first
    if first.dim is None:
        return None
    name, args = call.name, call.args
    shapes = call.shapes
    count = len(shapes) if shapes else (int(args[1]) if name == "chunk" and len(args) > 1 else 1)
    dim_arg = args[2] if len(args) > 2 else (args[1] if name == "unbind" and len(args) > 1 else 0)
    dim = normalize(int(dim_arg) if isinstance(dim_arg, int) else 0, len(call.in_shape))
    if name == "unbind":
        if dim == first.dim:
            raise LayoutProblem(f"`unbind` splits sharded dim {dim} into single indices")
        return tuple(replace(first, dim=first.dim - (dim < first.dim)) for _ in range(max(count, 1)))
    if dim != first.dim:
        return tuple(first for _ in range(max(count, 1)))
    sizes = {tuple(s)[dim] for s in shapes if s} if shapes else set()
    if first.parts > 1 and count == first.parts and len(sizes) <= 1:
        return tuple(replace(first, parts=1) for _ in range(count))
    raise LayoutProblem(
        f"`{name}` cuts sharded dim {dim} into pieces of fixed size",
        hint="a fused projection is split by parts: use `parts = N` on its style"
        if first.parts == 1
        else None,
    )


def join(call: OpCall) -> Result | None:
    """cat/stack need every input in the same layout and must not join along the
    sharded dimension (the result would interleave the ranks' pieces); stack shifts the
    shard when it inserts a dimension before it."""
    first = call.first
    if first.dim is None:
        return None
    stack = call.name == "stack"
    dim = normalize(int(call.args[1]) if len(call.args) > 1 else 0, len(call.in_shape) + stack)
    if any(not lay.same_placement(first) for lay, _ in call.inputs):
        raise LayoutProblem(f"`{call.name}` joins values of different layouts")
    if not stack and dim == first.dim:
        raise LayoutProblem(f"`{call.name}` joins along sharded dim {dim}")
    return replace(first, dim=first.dim + (stack and dim <= first.dim))


def _reduce(call: OpCall, dims: list[int] | None, keep: bool) -> Result | None:
    first = call.first
    if first.kind != "shard" or first.dim is None:
        return None
    if dims is None or first.dim in dims:
        raise LayoutProblem(
            f"`{call.name}` reduces over sharded dim {first.dim}: every rank would "
            "normalise or sum over its own piece only",
            hint="gather the value first (rowwise output = replicate or shard(1) "
            "of the sequence), or shard another dimension",
        )
    if keep:
        return first
    return replace(first, dim=first.dim - sum(1 for d in dims if d < first.dim))


def _dim_arg(call: OpCall) -> object:
    return call.args[1] if len(call.args) > 1 else call.kwargs.get("dim")


def reduction(call: OpCall) -> Result | None:
    """sum/mean/max/var/norm/… over the sharded dimension (or over all) is an error: each
    rank would reduce its own piece only. Over other dimensions the shard shifts down
    past the reduced ones, or stays with keepdim."""
    dim = _dim_arg(call)
    rank = len(call.in_shape)
    dims: list[int] | None = None
    if isinstance(dim, int):
        dims = [normalize(dim, rank)]
    elif isinstance(dim, list | tuple) and dim:
        dims = [normalize(int(d), rank) for d in dim]
    keep = call.kwargs.get("keepdim", call.args[2] if len(call.args) > 2 else False)
    return _reduce(call, dims, bool(keep))


def scan(call: OpCall) -> Result | None:
    """softmax/log_softmax/cumsum along the sharded dimension is an error (each rank would
    normalise its own piece); along another dimension the layout is kept."""
    dim = _dim_arg(call)
    dims = [normalize(int(dim), len(call.in_shape))] if isinstance(dim, int) else None
    return _reduce(call, dims, True)


def normalization(call: OpCall) -> Result | None:
    """layer/RMS/group norm over a sharded dimension (one of the trailing normalized
    dimensions) is an error: the statistics would be each rank's piece's; a value
    sharded elsewhere (the sequence) keeps its layout."""
    shape = call.args[1] if len(call.args) > 1 else call.kwargs.get("normalized_shape")
    n = len(shape) if isinstance(shape, list | tuple) else 1
    rank = len(call.in_shape)
    return _reduce(call, list(range(rank - n, rank)), True)


def linear(call: OpCall) -> Result:
    """A projection no rule planned has a replicated weight: its input may be sharded on
    any dimension but the features it contracts (that needs `rowwise`); a partial sum
    passes through a projection without bias (linear), not with one (the bias would be
    added once per rank)."""
    (a, sa), (b, _) = call.inputs[0], call.inputs[1]
    if b.kind != "replicate":
        raise LayoutProblem("a projection's weight is sharded but the projection has no rule")
    if a.kind == "partial":
        if len(call.inputs) > 2:
            raise LayoutProblem(
                "a projection with a bias gets a partial sum: the bias would be "
                "added once per rank",
                "E507",
            )
        return a
    if a.dim == len(sa) - 1:
        raise LayoutProblem(
            "a projection with no rule gets its input sharded over the features it "
            "contracts: each rank holds part of the features, the weight all of them",
            hint="give the projection `rowwise`",
        )
    return a


def matmul(call: OpCall) -> Result:
    """mm/matmul/bmm: contracting a dimension both operands shard alike gives a partial
    sum; one operand sharded on a kept dimension (or both on the same batch dimension)
    keeps the shard; contracting a dimension only one operand shards, or multiplying a
    partial sum by a sharded value, is an error."""
    (a, sa), (b, sb) = call.inputs[0], call.inputs[1]
    return _product(call.name, a, sa, b, sb, call.out)


def addmm(call: OpCall) -> Result:
    """addmm/baddbmm: the product of the second and third inputs as for `matmul` (the
    added first input is checked to be no partial sum before, like any non-linear op)."""
    (a, sa), (b, sb) = call.inputs[1], call.inputs[2]
    return _product(call.name, a, sa, b, sb, call.out)


def _product(name: str, a: Layout, sa: Shape, b: Layout, sb: Shape, out: Shape) -> Layout:
    ra, rb = len(sa), len(sb)
    a_con, b_con = ra - 1, rb - 2
    if a.kind == "partial" or b.kind == "partial":
        other = b if a.kind == "partial" else a
        if other.kind != "replicate":
            raise LayoutProblem(f"`{name}` multiplies a partial sum by a sharded value", "E507")
        return a if a.kind == "partial" else b
    if a.kind == "shard" and b.kind == "shard":
        if a.dim == a_con and b.dim == b_con:
            return Layout("partial", origin=a.origin)
        if a.dim is not None and a.dim < ra - 2 and a.dim - ra == (b.dim or 0) - rb:
            return replace(a, dim=a.dim + len(out) - ra)  # same batch dim
        raise LayoutProblem(f"`{name}` multiplies values sharded on unrelated dimensions")
    if a.kind == "shard" and a.dim is not None:
        if a.dim == a_con:
            raise LayoutProblem(f"`{name}` contracts a dimension that only one operand has sharded")
        return replace(a, dim=a.dim + len(out) - ra)
    if b.kind == "shard" and b.dim is not None:
        if b.dim == b_con:
            raise LayoutProblem(f"`{name}` contracts a dimension that only one operand has sharded")
        return replace(b, dim=b.dim + len(out) - rb)
    return REPLICATE


def attention(call: OpCall) -> Result:
    """Attention needs query, key and value in one layout, sharded on heads (each rank
    attends with its own heads); sharded on the sequence each rank would attend only to
    its own tokens, on the head size the scores need whole heads."""
    q, k, v = (lay for lay, _ in call.inputs[:3])
    for other in (k, v):
        if not other.same_placement(q):
            raise LayoutProblem("attention gets query, key and value in different layouts")
    rank = len(call.in_shape)
    if q.kind == "shard" and q.dim == rank - 3:
        return q
    raise LayoutProblem(
        f"attention over a query {q.describe()}: "
        + (
            "each rank would attend only to its own tokens"
            if q.dim == rank - 2
            else "the scores need whole heads"
        ),
        hint="hand attention whole sequences (prepare_input shard(1) -> replicate) "
        "and shard heads with colwise q/k/v",
    )


def embedding(call: OpCall) -> Result:
    """An embedding lookup no rule planned has a whole table: the output follows the
    ids' layout; a sharded table without a rule is an error."""
    ids = call.inputs[1][0] if len(call.inputs) > 1 else REPLICATE
    if call.first.kind != "replicate":
        raise LayoutProblem("an embedding table without a rule is sharded")
    return ids


RULES: dict[str, OpRule] = {
    "identity": OpRule(IDENTITY, identity, takes_partial=True),
    "elementwise": OpRule(ELEMENTWISE, elementwise, takes_partial=True),
    "factory": OpRule(FACTORIES, factory, fresh=True),
    "new_empty": OpRule(frozenset({"new_empty"}), new_empty, takes_partial=True),
    "copy_": OpRule(frozenset({"copy_"}), inplace_copy),
    "reshape": OpRule(RESHAPES, reshape, takes_partial=True),
    "expand": OpRule(frozenset({"expand"}), expand),
    "complex_view": OpRule(frozenset({"view_as_complex", "view_as_real"}), complex_view),
    "transpose": OpRule(frozenset({"transpose", "swapaxes"}), transpose),
    "t": OpRule(frozenset({"t"}), matrix_transpose),
    "permute": OpRule(frozenset({"permute"}), permute),
    "select": OpRule(frozenset({"select"}), select),
    "slice": OpRule(frozenset({"slice", "narrow"}), slice_),
    "split": OpRule(SPLITS, split),
    "join": OpRule(JOINS, join),
    "reduction": OpRule(REDUCTIONS, reduction),
    "scan": OpRule(SCANS, scan),
    "normalization": OpRule(NORMALIZATIONS, normalization),
    "linear": OpRule(frozenset({"linear"}), linear, takes_partial=True),
    "matmul": OpRule(frozenset({"mm", "matmul", "bmm"}), matmul, takes_partial=True),
    "addmm": OpRule(frozenset({"addmm", "baddbmm"}), addmm),
    "attention": OpRule(ATTENTION, attention),
    "embedding": OpRule(frozenset({"embedding"}), embedding),
}


def rule_for(op: str) -> OpRule | None:
    """The rule covering op `op` (an ATen name without overload), if any."""
    # A scan of ~20 frozensets: cheap, and reads the table as it is at call time.
    return next((rule for rule in RULES.values() if op in rule.ops), None)


def propagate(call: OpCall) -> Result:
    """The output layout of an op on plain tensors, at least one of them not replicated
    and none of unknown layout; raises `LayoutProblem` (see the module docstring)."""
    rule = rule_for(call.name)
    if (rule is None or not rule.takes_partial) and call.first.kind == "partial":
        raise LayoutProblem(
            f"`{call.name}` is applied to a partial sum that was never reduced",
            "E507",
            "reduce it first: give the producing rowwise a `replicate` or `shard(…)` output",
        )
    result = rule.apply(call) if rule is not None else None
    if result is None:
        raise LayoutProblem(
            f"no layout rule for `{call.name}` on {call.touched.describe()}",
            hint="keep the value replicated around this op, or report the op to meshplan",
        )
    return result


# --------------------------------------------------------------------------- helpers


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
        if 0 <= aligned < len(shape) and shape[aligned] != 1 and aligned not in layout.expanded:
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
                # Reshaped into heads before it is cut: the projection is laid out per head
                # (GPT-NeoX's [h0: q k v][h1: q k v]…), not as [q | k | v]; sharding by
                # parts would hand each rank rows of other heads.
                raise LayoutProblem(
                    f"a reshape {list(before)} → {list(after)} splits a fused "
                    f"({layout.parts}-part) sharded dimension: the projection is laid out per "
                    "head, so its parts are not blocks of the output",
                    hint="drop `parts`: plain colwise gives each rank whole heads",
                )
            if not targets:
                raise LayoutProblem(
                    f"a reshape {list(before)} → {list(after)} drops sharded dim {d}"
                )
            return replace(layout, dim=targets[0])
    raise LayoutProblem(f"a reshape {list(before)} → {list(after)} loses track of sharded dim {d}")
