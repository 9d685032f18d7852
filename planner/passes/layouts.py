"""Layout propagation over the traced dataflow.

Guarantees, for the tensor-parallel dimension: walking the traced ATen graph in order,
with each ParallelStyle's contract applied at its module's boundary (input conversion,
sharded weights, output layout) and op rules in between (`planner.ops`):
- every styled module receives its activation in the layout its plan line declares —
  a plain tensor in another layout would be misread by `from_local` (silently wrong); a
  DTensor in another layout is redistributed implicitly, exact but a collective on every
  call (warning W106);
- ops between planned modules (residual adds, reshapes into heads, norms, rotary
  embeddings, attention) see agreeing layouts, never reduce or slice over a sharded
  dimension, and never consume an unreduced partial sum (E507);
- plain tensors and DTensors are not mixed in one op;
- a block of a stack hands the next block the layout it received itself;
- the logits leave the model replicated, or as a DTensor sharded on the vocabulary
  (loss parallel).
Each error points at the plan line that made the offending value sharded, and names
the consuming line where there is one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from meshplan.dsl.errors import Span
from meshplan.dsl.spec import Placement, TPRuleSpec
from meshplan.dsl.styles import STYLES

from ..graph import ModelGraph, Ref
from ..layout import REPLICATE, UNKNOWN, Layout, LayoutProblem, normalize
from ..ops import ELEMENTWISE, FACTORIES, IDENTITY, RESHAPES, OpCall, op_name, propagate, rule_for
from .context import Context
from .patterns import generic

LEAF_KINDS = ("linear", "embedding", "conv1d")
# Ops whose result carries no gradient, whatever their inputs: made from shapes, detached,
# compared or indexed.
NO_GRAD = FACTORIES | {"new_empty", "detach", "zeros_like", "ones_like", "empty_like", "full_like", "eq", "ne",
                       "lt", "le", "gt", "ge", "argmax", "argmin", "logical_and", "logical_or",
                       "logical_not", "isnan", "isinf", "sign"}


class Layouts:
    name = "layouts"

    def apply(self, ctx: Context) -> None:
        tp = ctx.spec.tensor_parallel
        if tp is None or ctx.mesh is None or ctx.size(tp.on) <= 1 or not ctx.graph.traced:
            return
        if ctx.failed:
            return  # layouts of a plan with unresolved rules would only echo those errors
        reported: set[tuple[Span | None, str]] = set()
        for styled in _variants(ctx):
            _Walk(ctx, styled, reported).run()


def _variants(ctx: Context) -> Iterator[dict[str, TPRuleSpec]]:
    """Rule assignments for the traced modules: one per distinct per-block rule set.

    Only one block per kind is traced; when the plan gives blocks of one kind different
    rules, the trace is walked once for each distinct set (the others at their first).
    """
    graph = ctx.graph
    base: dict[str, TPRuleSpec] = {f: r for f, r in ctx.tp_rules.items() if graph.stack_of(f) is None}
    choices: list[tuple[str, list[dict[str, TPRuleSpec]]]] = []
    for stack in graph.stacks:
        prefix = stack.fqn + "."
        by_layer: dict[str, list[tuple[str, TPRuleSpec]]] = {}  # one pass: 126 layers × their rules
        for f, r in ctx.tp_rules.items():
            if f.startswith(prefix):
                by_layer.setdefault(f[len(prefix):].partition(".")[0], []).append((f, r))
        for kind in stack.kinds:
            maps: list[dict[str, TPRuleSpec]] = []
            seen: list[dict[str, int]] = []
            for index in kind.layers:
                block = stack.block(index)
                rel = {f[len(block):]: r for f, r in by_layer.get(str(index), ())}
                key = {k: id(v) for k, v in rel.items()}
                if key not in seen:
                    seen.append(key)
                    maps.append(rel)
            choices.append((stack.block(kind.representative), maps or [{}]))
    default = dict(base)
    for block, maps in choices:
        default.update({block + rel: rule for rel, rule in maps[0].items()})
    yield default
    for block, maps in choices:
        for alternative in maps[1:]:
            variant = {f: r for f, r in default.items() if not (f == block or f.startswith(block + "."))}
            variant.update({block + rel: rule for rel, rule in alternative.items()})
            yield variant


def _refs(value: Any) -> Iterator[str]:
    if isinstance(value, Ref):
        yield value.node
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _refs(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _refs(v)


def _declared(p: object, rank: int) -> Layout:
    if not isinstance(p, Placement) or p.kind == "replicate":
        return REPLICATE
    if p.kind == "partial":
        return Layout("partial")
    return Layout("shard", normalize(p.dim or 0, rank) if rank else p.dim)


class _Walk:
    def __init__(self, ctx: Context, styled: dict[str, TPRuleSpec], reported: set[tuple[Span | None, str]]) -> None:
        self.ctx = ctx
        self.graph: ModelGraph = ctx.graph
        self.g = ctx.graph.dataflow
        self.styled = styled
        self.reported = reported
        self.layouts: dict[str, Layout | tuple[Layout, ...]] = {}
        # Leaves: modules whose style takes them as one op (a Linear's; fused experts run on
        # local shards, `Contract.whole`): their insides are the style's business.
        self.leaves = {f for f, r in styled.items() if f in self.graph.modules and (
            self.graph.modules[f].kind in LEAF_KINDS or STYLES[r.style.name].contract.whole)}
        # Values that carry a gradient (made from parameters); the outputs of `mla_kv_a`
        # leaves (node → the rule and the width of the shared part); the values whose
        # gradient such a style sums (its shared part and what replicated code makes of
        # it) → that leaf's output; the leaves whose shared part reached head-sharded code.
        self.grad: dict[str, bool] = {}
        self.tails: dict[str, tuple[TPRuleSpec, int]] = {}
        self.summed: dict[str, str] = {}
        self.shared: set[str] = set()

    # ------------------------------------------------------------------ reporting

    def report(self, span: Span | None, message: str, code: str = "E506", hint: str | None = None,
               related: tuple[tuple[Span, str], ...] = ()) -> None:
        key = (span, message)
        if key in self.reported:
            return
        self.reported.add(key)
        fallback = self.ctx.spec.tensor_parallel.span if self.ctx.spec.tensor_parallel else self.ctx.spec.span
        self.ctx.error(span or fallback, code, message, hint,
                       related=tuple((s, m) for s, m in related if s is not None and s != span))

    def warn(self, span: Span, message: str, code: str = "W106", hint: str | None = None) -> None:
        key = (span, message)
        if key in self.reported:
            return
        self.reported.add(key)
        self.ctx.warn(span, code, message, hint)

    def _attrs(self, node: str) -> dict[str, Any]:
        attrs: dict[str, Any] = self.g.nodes[node]
        return attrs

    def _shape(self, node: str) -> tuple[int, ...]:
        shape = self._attrs(node).get("shape")
        return tuple(shape) if shape is not None else ()

    # ------------------------------------------------------------------ the walk

    def run(self) -> None:
        for node, attrs in self.graph.ops():
            op = attrs.get("op")
            if op == "placeholder":
                self.layouts[node] = REPLICATE
                self.grad[node] = attrs.get("kind") == "parameter"
                continue
            refs = list(_refs(attrs.get("args", ()))) + list(_refs(attrs.get("kwargs", {})))
            self.grad[node] = op_name(str(op)) not in NO_GRAD and any(self.grad.get(r, False) for r in refs)
            stack = tuple(attrs.get("module_stack") or ())
            leaf = next((m for m in reversed(stack) if m in self.leaves), None)
            if leaf is not None:
                self._leaf(node, leaf, stack)
            elif op == "output":
                self._final(node, attrs)
            else:
                self.layouts[node] = self._op(node, attrs, stack)
                self._shared_tail(node, attrs, refs, stack)
        self._unshared()
        self._stacks()

    def view(self, value: str, consumer_stack: tuple[str, ...]) -> Layout:
        """The layout of `value` as seen by code in `consumer_stack` (module boundaries applied)."""
        attrs = self._attrs(value)
        layout = self.layouts.get(value, REPLICATE)
        if isinstance(layout, tuple):
            return UNKNOWN
        if attrs.get("op") == "placeholder":
            owner = str(attrs.get("fqn", "")).rsplit(".", 1)[0]
            rule = self.styled.get(owner)
            if rule is not None and STYLES[rule.style.name].contract.replicated_params and owner in consumer_stack:
                return replace(REPLICATE, dtensor=True)  # these styles make their weights DTensors
            if rule is not None and STYLES[rule.style.name].contract.head_params:
                return Layout("shard", 0, origin=rule.span)  # this rank's heads' entries, as plain tensors
            return layout
        producer_stack = tuple(attrs.get("module_stack") or ())
        common = 0
        while (common < len(producer_stack) and common < len(consumer_stack)
               and producer_stack[common] == consumer_stack[common]):
            common += 1
        for module in reversed(producer_stack[common:]):
            if module in self.styled and module not in self.leaves:
                call = self.graph.calls(module)
                # The traced signature names the real outputs; a module whose signature the
                # trace did not record (Gemma-3's per-head norms) has only the values that
                # leave it, which are then its outputs.
                named = {a.node for a in call.outputs if a.name is not None}
                signature = named or {a.node for a in call.outputs}
                if value not in signature:
                    source = self._outside_source(value, module)
                    if source is not None:
                        return self.view(source, consumer_stack)
                    continue
                layout = self._convert_out(module, value, layout)
        for module in consumer_stack[common:]:
            if module in self.styled and module not in self.leaves:
                layout = self._convert_in(module, value, layout)
        return layout

    def _outside_source(self, value: str, module: str) -> str | None:
        """A value that leaks out of a module only because the trace aliased it (a no-op
        `.to(dtype)` at the module's start): follow identity ops back to the outside."""
        node = value
        for _ in range(8):
            attrs = self._attrs(node)
            if op_name(str(attrs.get("op"))) not in IDENTITY:
                return None
            refs = list(_refs(attrs.get("args", ())))
            if not refs:
                return None
            node = refs[0]
            if module not in (self._attrs(node).get("module_stack") or ()):
                return node
        return None

    # ------------------------------------------------------------------ contracts

    def _check(self, module: str, rule: TPRuleSpec, what: str, actual: Layout, declared: Layout) -> None:
        if actual.kind == "unknown" or actual.same_placement(declared):
            return
        name = rule.pattern.text
        wanted = declared.describe().replace(" (plain tensor)", "")
        related = ((actual.origin, "the value is made here"),) if actual.origin else ()
        if actual.dtensor:
            # A DTensor knows its layout: the style's `redistribute` converts it (measured exact).
            # What it costs is a collective per call — a performance warning, not an error.
            self.warn(rule.span,
                      f"`{name}` declares its {what} {wanted} but receives {actual.describe()}: DTensor "
                      "redistributes it implicitly, a collective on every call",
                      hint="declare the conversion once where it happens (prepare_input on the "
                           "enclosing module) or declare the layout the value really has")
        else:
            self.report(rule.span,
                        f"`{name}` declares its {what} {wanted} but receives {actual.describe()}: each rank "
                        "would take its own piece for the whole value — silently wrong",
                        hint="convert it first (prepare_input), or declare the layout it has",
                        related=related)

    def _convert_in(self, module: str, value: str, layout: Layout) -> Layout:
        rule = self.styled[module]
        style = rule.style
        call = self.graph.calls(module)
        index = next((i for i, a in enumerate(call.inputs) if a.node == value), None)
        if index is None:
            return layout
        rank = len(self._shape(value))
        local = bool(style.args.get("local_output", False))
        contract = STYLES[style.name].contract  # the style registry's layout contract
        if contract.replicated_params:
            if index != 0:
                return layout
            want = (Layout("shard", normalize(int(str(style.args.get("dim", 1))), rank))
                    if contract.input == "sequence" else _declared(style.args.get("input"), rank))
            self._check(module, rule, "input", layout, want)
            return replace(want, dtensor=True, origin=rule.span)
        if contract.input == "conversions":
            arg = call.inputs[index]
            for position, conv in enumerate(style.conversions):
                hit = conv.name == arg.name if conv.name is not None else position == index
                if not hit or conv.source is None:
                    continue
                self._check(module, rule, f"input `{arg.name or index}`", layout, _declared(conv.source, rank))
                target = conv.target or conv.source
                out = _declared(target, rank)
                return replace(out, dtensor=not local,
                               origin=rule.span if out.kind != "replicate" or not local else None)
        return layout

    def _convert_out(self, module: str, value: str, layout: Layout) -> Layout:
        rule = self.styled[module]
        style = rule.style
        rank = len(self._shape(value))
        local = bool(style.args.get("local_output", True))
        contract = STYLES[style.name].contract  # the style registry's layout contract
        if contract.output == "sequence":
            dim = normalize(int(str(style.args.get("dim", 1))), rank)
            return Layout("shard", dim, dtensor=not local, origin=rule.span)
        if contract.replicated_params and contract.output == "declared":
            out = _declared(style.args.get("output"), rank)
            return replace(out, dtensor=not local,
                           origin=rule.span if out.kind != "replicate" or not local else None)
        if contract.output == "conversions":
            call = self.graph.calls(module)
            index = next((i for i, a in enumerate(call.outputs) if a.node == value), None)
            for position, conv in enumerate(style.conversions):
                if index is None or position != index or conv.source is None:
                    continue
                self._check(module, rule, f"output {index}", layout, _declared(conv.source, rank))
                out = _declared(conv.target or conv.source, rank)
                return replace(out, dtensor=not local,
                               origin=rule.span if out.kind != "replicate" or not local else None)
        return layout

    def _leaf(self, node: str, leaf: str, stack: tuple[str, ...]) -> None:
        call = self.graph.calls(leaf)
        if node not in {a.node for a in call.outputs}:
            self.layouts[node] = UNKNOWN  # inside the module: its contract covers it
            return
        rule = self.styled[leaf]
        style = rule.style
        info = self.graph.module(leaf)
        # A whole-module style (fused experts) takes every input as declared: the hidden
        # states and the routing both replicated.
        whole = STYLES[style.name].contract.whole
        for arg in call.inputs if whole else call.inputs[:1]:
            value = arg.node
            inner = stack[: stack.index(leaf) + 1]
            actual = self.view(value, inner)
            rank = len(self._shape(value))
            declared = _declared(style.args.get("input"), rank)
            self._check(leaf, rule, f"input `{arg.name}`" if whole and arg.name else "input", actual, declared)
            self._summed_reaches(value, rule.span)
        if STYLES[style.name].contract.shared_tail:
            self.tails[node] = (rule, int(str(style.args.get("rope", 0))))
        rank = len(self._shape(node))
        local = bool(style.args.get("local_output", True))
        out = _declared(style.args.get("output"), rank)
        parts = int(str(style.args.get("parts", 1)))
        if out.kind == "shard" and parts > 1 and info.kind != "embedding":
            out = replace(out, parts=parts)
        self.layouts[node] = replace(out, dtensor=not local,
                                     origin=rule.span if out.kind != "replicate" or not local else None)

    def _final(self, node: str, attrs: dict[str, Any]) -> None:
        refs = list(_refs(attrs.get("args", ())))
        if not refs:
            return
        logits = refs[0]
        self._summed_reaches(logits, None)
        layout = self.view(logits, ())
        rank = len(self._shape(logits))
        if layout.kind == "partial":
            self.report(layout.origin, "the model's output (logits) is a partial sum that is never reduced",
                        "E507", "give the last projection a `replicate` or `shard(-1)` output")
        elif layout.kind == "shard" and not layout.dtensor:
            self.report(layout.origin,
                        f"the logits leave the model {layout.describe()}: the loss would see only each "
                        "rank's piece",
                        hint="keep them as a DTensor (`local_output = false`, loss parallel) or gather them "
                             "(`output = replicate`)")
        elif layout.kind == "shard" and layout.dim != rank - 1:
            self.report(layout.origin,
                        f"the logits leave the model {layout.describe()}: loss parallel needs them sharded "
                        "on the vocabulary (shard(-1)) or replicated")

    def _stacks(self) -> None:
        for stack in self.graph.stacks:
            traced = [stack.block(k.representative) for k in stack.kinds]
            if not all(self.graph.is_traced(b) for b in traced):
                continue
            kinds = {k.name: stack.block(k.representative) for k in stack.kinds}
            transitions = {(stack.kind_of(i).name, stack.kind_of(i + 1).name) for i in range(stack.length - 1)}
            for a, b in sorted(transitions):
                out_call, in_call = self.graph.calls(kinds[a]), self.graph.calls(kinds[b])
                if not out_call.outputs or not in_call.inputs:
                    continue
                parent = tuple(self._attrs(out_call.outputs[0].node).get("module_stack") or ())
                parent = parent[: parent.index(kinds[a])] if kinds[a] in parent else parent
                out = self.view(out_call.outputs[0].node, parent)
                entry_stack = (*parent, kinds[b])
                first = self.view(in_call.inputs[0].node, entry_stack)
                if out.kind == "unknown" or first.kind == "unknown" or (
                        out.same_placement(first) and out.dtensor == first.dtensor):
                    continue
                self.report(out.origin or first.origin,
                            f"`{generic(kinds[a])}` hands the next block {out.describe()}, but the block "
                            f"receives {first.describe()} from before the stack: block 1 would get a layout "
                            "block 0 was not planned for",
                            hint="make each block end in the layout it starts with (e.g. rowwise output "
                                 "shard(1) after a shard(1) input)",
                            related=((first.origin, "the layout entering the stack"),) if first.origin else ())

    # ------------------------------------------------------------------ op rules

    def _op(self, node: str, attrs: dict[str, Any], stack: tuple[str, ...]) -> Layout | tuple[Layout, ...]:
        name = op_name(str(attrs.get("op")))
        args = tuple(attrs.get("args", ()))
        kwargs = dict(attrs.get("kwargs", {}))
        out = tuple(attrs.get("shape") or ())
        shapes = tuple(attrs.get("shapes") or ())
        rule = rule_for(name)
        if rule is not None and rule.fresh:
            return rule.apply(OpCall(name, (), args, kwargs, out, shapes)) or UNKNOWN
        refs = list(_refs(args)) + list(_refs(kwargs))
        if name == "expand" and refs:
            seen = self.view(refs[0], stack)
            if seen.kind == "replicate" and not seen.dtensor:
                before = self._shape(refs[0])
                lead = len(out) - len(before)
                grown = frozenset(d + lead for d, n in enumerate(before) if n == 1 and out[d + lead] != 1)
                return replace(REPLICATE, expanded=grown)
        if name == "getitem":
            # One output of a multi-output op (split, var_mean, attention's tuple).
            source = self.layouts.get(refs[0], REPLICATE) if refs else REPLICATE
            if isinstance(source, tuple):
                index = args[1] if len(args) > 1 and isinstance(args[1], int) else 0
                return source[index] if index < len(source) else UNKNOWN
            return self.view(refs[0], stack) if refs else REPLICATE
        inputs = [(r, self.view(r, stack), self._shape(r)) for r in refs]
        if all(lay.kind == "replicate" and not lay.dtensor for _, lay, _ in inputs):
            return REPLICATE
        if any(lay.kind == "unknown" and not lay.dtensor for _, lay, _ in inputs):
            return UNKNOWN
        module = generic(str(attrs.get("module") or "the model"))
        tensors = [(lay, s) for _, lay, s in inputs if s]
        kinds = {lay.dtensor for lay, _ in tensors}
        if len(kinds) > 1:
            dt = next((lay.origin for lay, _ in tensors if lay.dtensor and lay.origin), None)
            plain = next((lay.origin for lay, _ in tensors if not lay.dtensor and lay.origin), None)
            self.report(dt or plain, f"`{name}` in `{module}` mixes a DTensor (made by this line) with a plain "
                                     "tensor: torch refuses mixed operands",
                        hint="hand plain tensors on (`local_output = true`) or make both sides DTensors",
                        related=((plain, "the plain tensor comes from here"),) if plain and dt else ())
            return UNKNOWN
        if True in kinds:
            # DTensors know their layout: torch redistributes as needed. Track simple cases.
            first = tensors[0][0]
            if name in IDENTITY or name in ELEMENTWISE:
                return first
            return replace(UNKNOWN, dtensor=True)
        self._weights(name, module, inputs)
        call = OpCall(name, tuple((lay, s) for _, lay, s in inputs), args, kwargs, out, shapes)
        try:
            return propagate(call)
        except LayoutProblem as p:
            origin = next((lay.origin for _, lay, _ in inputs if lay.kind != "replicate" and lay.origin), None)
            per_head = next((f for ref, lay, _ in inputs if lay.kind == "replicate"
                             for f in (self._per_head_param(ref),) if f), None)
            hint = p.hint
            if per_head is not None:
                owner = generic(per_head.rsplit(".", 1)[0])
                hint = (f"`{generic(per_head)}` holds one entry per attention head, whole on every rank while the "
                        f"heads are split: shard it with them (`{owner} : head_params`)")
            self.report(origin, f"{p.message} (in `{module}`)", p.code, hint)
            return UNKNOWN

    # ------------------------------------------------------------------ shared values

    def _shared_tail(self, node: str, attrs: dict[str, Any], refs: list[str], stack: tuple[str, ...]) -> None:
        """Follow the shared part of `mla_kv_a` outputs, and check every replicated value
        with a gradient that head-sharded code broadcasts over its sharded dimension."""
        name = op_name(str(attrs.get("op")))
        layout = self.layouts.get(node)
        if name == "getitem" and refs:
            self._cut_tail(node, refs[0], tuple(attrs.get("args", ())))
        elif refs and isinstance(layout, Layout) and layout.kind == "replicate" and not layout.dtensor:
            owner = next((self.summed[r] for r in refs if r in self.summed), None)
            if owner is not None:
                self.summed[node] = owner
        if not isinstance(layout, Layout) or layout.kind != "shard" or layout.dtensor or layout.dim is None:
            return
        if name not in ELEMENTWISE and name != "copy_":
            return
        out = tuple(attrs.get("shape") or ())
        for ref in refs:
            seen = self.view(ref, stack)
            shape = self._shape(ref)
            if seen.kind != "replicate" or seen.dtensor or not shape or not self.grad.get(ref, False):
                continue
            if self._attrs(ref).get("kind") == "parameter":
                continue  # a weight: `_weights` says what to do
            aligned = layout.dim - (len(out) - len(shape))
            if 0 <= aligned < len(shape) and shape[aligned] != 1 and aligned not in seen.expanded:
                continue
            if ref in self.summed:
                self.shared.add(self.summed[ref])
                continue
            producer = self._producer(ref)
            module = generic(str(attrs.get("module") or "the model"))
            fix = (f"if `{producer}` is latent attention's kv_a projection and this is its rotary part, give "
                   f"it `mla_kv_a(rope = {shape[-1]})`: the gradient of that part is then summed over the "
                   "ranks" if producer else "keep the heads whole here (no tensor parallelism)")
            made = f" (`{producer}`)" if producer else ""
            self.report(layout.origin,
                        f"`{name}` broadcasts a replicated value that carries a gradient over sharded dim "
                        f"{layout.dim}: each rank's backward gives it its own piece's gradient only, a partial "
                        f"sum that nothing reduces, so the replicated weights that made it{made} get wrong "
                        f"gradients (in `{module}`)", hint=fix)

    def _cut_tail(self, node: str, source: str, args: tuple[Any, ...]) -> None:
        """A piece of a split `mla_kv_a` output: its last `rope` features are the shared part."""
        split = self._attrs(source)
        split_args = tuple(split.get("args", ()))
        refs = list(_refs(split_args))
        if not refs or refs[0] not in self.tails:
            return
        rule, rope = self.tails[refs[0]]
        sizes = split_args[1] if len(split_args) > 1 else None
        index = args[1] if len(args) > 1 and isinstance(args[1], int) else None
        if not isinstance(sizes, list | tuple) or index is None or index != len(sizes) - 1:
            return
        if int(sizes[-1]) == rope:
            self.summed[node] = refs[0]
            return
        self.report(rule.span, f"`{rule.pattern.text}` declares a shared part of {rope} features, but the "
                               f"model cuts its output into {[int(x) for x in sizes]}: the sum would take "
                               "the gradient of features no head shares",
                    hint=f"`rope = {int(sizes[-1])}`: the width of the part every head shares")

    def _per_head_param(self, node: str) -> str | None:
        """The parameter `node` is a reshaped view of, when it is an attention module's own
        1-D parameter with one entry per head (sinks, a gate bias); None otherwise."""
        for _ in range(8):
            attrs = self._attrs(node)
            op = op_name(str(attrs.get("op")))
            if op == "placeholder":
                fqn = str(attrs.get("fqn", ""))
                owner = self.graph.modules.get(fqn.rsplit(".", 1)[0]) if attrs.get("kind") == "parameter" else None
                heads = owner.attrs.get("num_heads") if owner is not None and owner.kind == "attention" else None
                return fqn if isinstance(heads, int) and self._shape(node) == (heads,) else None
            refs = list(_refs(attrs.get("args", ())))
            if (op not in IDENTITY and op not in RESHAPES and op != "expand") or not refs:
                return None
            node = refs[0]
        return None

    def _producer(self, node: str) -> str | None:
        """The projection (a Linear) that `node` comes from, through replicated code."""
        for _ in range(64):
            attrs = self._attrs(node)
            module = str(attrs.get("module") or "")
            if op_name(str(attrs.get("op"))) == "linear" and module in self.graph.modules:
                return generic(module)
            refs = [r for r in _refs(attrs.get("args", ())) if self.grad.get(r, False)
                    and self._attrs(r).get("kind") != "parameter"]
            if not refs:
                return None
            node = refs[0]
        return None

    def _summed_reaches(self, value: str, span: Span | None) -> None:
        """The shared part of an `mla_kv_a` output must reach head-sharded code only: its
        gradient is summed, so any whole (replicated) use counts it tp times."""
        owner = self.summed.get(value) or (value if value in self.tails else None)
        if owner is None:
            return
        rule, rope = self.tails[owner]
        self.report(rule.span, f"`{rule.pattern.text}`'s last {rope} features reach replicated code whole: "
                               "their gradient is summed over the ranks, so that use would count it tp times",
                    related=((span, "used here"),) if span is not None else ())

    def _unshared(self) -> None:
        for node, (rule, rope) in self.tails.items():
            if node not in self.shared:
                self.report(rule.span,
                            f"`{rule.pattern.text}` sums the gradient of its last {rope} output features over "
                            "the ranks, but no head-sharded code shares them: each rank's gradient is whole "
                            "already, so the sum would count it tp times",
                            hint="leave the projection without a rule: `mla_kv_a` is for the kv_a projection "
                                 "of latent attention whose heads are sharded")

    def _weights(self, name: str, module: str, inputs: list[tuple[str, Layout, tuple[int, ...]]]) -> None:
        """A plain replicated weight applied to a sharded activation it does not span gets,
        on each rank, the gradient of that rank's piece only; nothing sums them."""
        sharded = [(lay, s) for _, lay, s in inputs if lay.kind == "shard" and not lay.dtensor and lay.dim is not None]
        if not sharded:
            return
        layout, shape = sharded[0]
        assert layout.dim is not None
        for ref, weight, wshape in inputs:
            attrs = self._attrs(ref)
            if attrs.get("kind") != "parameter" or weight.dtensor:
                continue
            aligned = layout.dim - (len(shape) - len(wshape))
            if 0 <= aligned < len(wshape) and wshape[aligned] != 1:
                continue  # the weight spans the sharded dimension itself
            owner = generic(str(attrs.get("fqn", ref)).rsplit(".", 1)[0])
            sequence = layout.dim == 1 and len(shape) == 3
            fix = ("`sequence_parallel`" if sequence else
                   f"`replicate(input = shard({layout.dim}), output = shard({layout.dim}))`")
            self.report(layout.origin,
                        f"`{owner}`'s weight is applied to a value {layout.describe()}: each rank's gradient "
                        "would cover only its own piece and nothing sums them, so the replicas drift apart",
                        hint=f"give `{owner}` the rule {fix}: its weight becomes a replicated DTensor whose "
                             "gradient is summed")
            return
