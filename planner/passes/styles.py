"""Style/module compatibility.

Guarantees: every tensor-parallel style sits on a module of a kind it is made for
(colwise/rowwise on Linear and Embedding, the conv1d styles on GPT-2's transposed
Conv1D, sequence_parallel on norms, tp_experts on fused experts in transformers'
[E, 2I, H] / [E, H, I] layout without biases or a per-expert norm, and not
expert-parallel too, its `parts` matching how gate_up_proj packs gate and up); a fused projection (q/k/v or gate/up packed in
one weight) is sharded part by part (`parts = N`) — a plain colwise would give each
rank a slice that mixes q with k, silently; fused parts must be equal; `shard(d)` in a
style's input/output names a dimension the traced activation has; context-parallel
patterns name attention modules. One error per rule, naming the first offender.
"""

from __future__ import annotations

from meshplan.dsl.spec import Placement, TPRuleSpec
from meshplan.dsl.styles import STYLES

from ..graph import ModelGraph
from .context import Context
from .patterns import generic

# Leaf names of fused projections and how many parts they pack.
FUSED = {"qkv_proj": 3, "c_attn": 3, "W_pack": 3, "gate_up_proj": 2}
# Not here: projections laid out per head (GPT-NeoX's query_key_value, [heads, 3·head_dim]);
# a FUSED name laid out per group (CodeGen's qkv_proj, `_grouped`) is treated like them.
# The layout walk sees them reshaped into heads before they are cut (`planner.ops`): plain
# colwise gives each rank whole heads (measured exact); `parts` splits a head (rejected).
_KIND_WORDS = {"linear": "a Linear", "embedding": "an Embedding", "conv1d": "a GPT-2 Conv1D",
               "norm": "a norm", "attention": "an attention module"}


def fused_parts(graph: ModelGraph, fqn: str) -> tuple[int, ...] | None:
    """The output sizes of a fused projection's parts, or None for a plain module."""
    leaf = fqn.rsplit(".", 1)[-1]
    if leaf not in FUSED:
        return None
    info = graph.module(fqn)
    out = info.attrs.get("out_features")
    if not isinstance(out, int):
        return None
    if _grouped(graph, fqn, out, FUSED[leaf]):
        return None
    parent = graph.modules.get(fqn.rsplit(".", 1)[0]) if "." in fqn else None
    if FUSED[leaf] == 3 and parent is not None and parent.kind == "attention":
        heads, kv, hd = (parent.attrs.get(k) for k in ("num_heads", "num_kv_heads", "head_dim"))
        if isinstance(heads, int) and isinstance(kv, int) and isinstance(hd, int) and out == (heads + 2 * kv) * hd:
            return (heads * hd, kv * hd, kv * hd)
    n = FUSED[leaf]
    return tuple([out // n] * n) if out % n == 0 else None


def _grouped(graph: ModelGraph, fqn: str, out: int, parts: int) -> bool:
    """Is the projection laid out per group rather than part-major? CodeGen's `qkv_proj`
    is viewed into (groups, 3·d) before it is split: each group packs its own q, v and k,
    so a plain colwise cut on whole groups is exact (measured), and the layout walk
    checks the cut lands on the groups. A part-major projection is sliced (Phi-3) or
    viewed into (parts, rest) (Baichuan's W_pack) and keeps its name's part count."""
    if not graph.traced or not graph.is_traced(fqn):
        return False
    call = graph.calls(fqn)
    if not call.outputs:
        return False
    g = graph.dataflow
    for succ in g.successors(call.outputs[0].node):
        attrs = g.nodes[succ]
        shape = tuple(attrs.get("shape") or ())
        if str(attrs.get("op")) not in ("aten.view.default", "aten.reshape.default",
                                        "aten._unsafe_view.default") or len(shape) < 2:
            continue
        groups, inner = shape[-2], shape[-1]
        if groups * inner == out and groups not in (1, parts) and inner % parts == 0:
            return True
    return False


def weight_placement(graph: ModelGraph, module: str, rule: TPRuleSpec | None) -> str:
    """How a style lays out a module's weight: `shard(0)`, `shard(1)` or `replicate`."""
    if rule is None or module not in graph.modules:
        return "replicate"
    return str(STYLES[rule.style.name].weight(graph.modules[module].kind))


class StyleFit:
    name = "styles"

    def apply(self, ctx: Context) -> None:
        by_rule: dict[int, tuple[TPRuleSpec, list[str]]] = {}
        for fqn, rule in ctx.tp_rules.items():
            by_rule.setdefault(id(rule), (rule, []))[1].append(fqn)
        for rule, fqns in by_rule.values():
            for fqn in fqns:
                if self._check(ctx, rule, fqn, len(fqns)):
                    break  # one error per rule is enough
        self._tied(ctx)
        for fqn, pattern in ctx.ep_modules.items():
            info = ctx.graph.module(fqn)
            if info.kind not in ("experts", "moe"):
                ctx.error(pattern.span, "E504", f"`{fqn}` is {info.type} ({info.kind}), not a block of experts",
                          "name the experts module, e.g. `experts model.layers.*.mlp.experts`")
                break
        for fqn, pattern in ctx.cp_modules.items():
            info = ctx.graph.module(fqn)
            if info.kind != "attention":
                ctx.error(pattern.span, "E504",
                          f"`{fqn}` is {info.type} ({info.kind}), not an attention module",
                          "context_parallel replaces attention; name the attention modules, e.g. "
                          "`attention model.layers.*.self_attn`")
                break

    @staticmethod
    def _tied(ctx: Context) -> None:
        """One tensor under two names must be sharded the same way under both."""
        for group in ctx.graph.tied:
            seen: list[tuple[str, str, TPRuleSpec | None]] = []
            for name in group:
                module = name.rsplit(".", 1)[0]
                rule = ctx.tp_rules.get(module)
                seen.append((name, weight_placement(ctx.graph, module, rule), rule))
            (n1, p1, r1), *rest = seen
            for n2, p2, r2 in rest:
                if p1 != p2:
                    chosen = r2 or r1
                    span = chosen.span if chosen is not None else ctx.spec.header_span
                    other = r1 if r2 is not None else None
                    ctx.error(span, "E504",
                              f"`{n1}` and `{n2}` are one tied tensor, but the plan shards it as {p1} "
                              f"under one name and {p2} under the other",
                              "shard both the same way (rowwise embedding with colwise lm_head both split "
                              "the vocabulary), or neither",
                              related=((other.span, "the other rule"),) if other else ())

    def _check(self, ctx: Context, rule: TPRuleSpec, fqn: str, count: int) -> bool:
        style = rule.style
        info = ctx.graph.module(fqn)
        schema = STYLES[style.name]
        more = f" (and {count - 1} more)" if count > 1 else ""
        if not schema.fits(info.kind):
            made_for = " and ".join(_KIND_WORDS.get(k, k) for k in schema.applies_to)
            hint = None
            if info.kind == "conv1d" and style.name in ("colwise", "rowwise"):
                hint = (f"Conv1D stores its weight as [in, out]; use `conv1d_{style.name}`"
                        + (f"(parts = {FUSED[fqn.rsplit('.', 1)[-1]]})" if fqn.rsplit('.', 1)[-1] in FUSED else ""))
            elif info.kind == "norm":
                hint = "norms take `sequence_parallel`, or no rule (they stay replicated)"
            elif style.name == "sequence_parallel":
                hint = "sequence_parallel is for norms; projections take colwise or rowwise"
            ctx.error(style.span, "E504",
                      f"`{style.name}` is made for {made_for}; `{fqn}`{more} is {info.type}", hint)
            return True
        if schema.contract.params:
            return self._experts(ctx, rule, fqn, more) or self._placements(ctx, rule, fqn, more)
        if schema.contract.head_params:
            return self._head_params(ctx, rule, fqn, more)
        parts = fused_parts(ctx.graph, fqn) if "parts" in schema.args else None
        wanted = int(str(style.args.get("parts", 1)))
        # Gathering the whole output (`output = replicate`) restores the packed order: a plain
        # style is then exact on a fused projection (measured), and parts need not be equal.
        gathered = wanted == 1 and style.args.get("output") == Placement("replicate")
        if parts is not None and not gathered and wanted != len(parts):
            ctx.error(style.span, "E504",
                      f"`{fqn}`{more} is a fused projection of {len(parts)} parts "
                      f"({' + '.join(map(str, parts))} features): a plain `{style.name}` would give each "
                      "rank a slice that mixes them",
                      f"use `{style.name}(parts = {len(parts)})`, which shards each part")
            return True
        if parts is not None and not gathered and len(set(parts)) > 1:
            ctx.error(style.span, "E504",
                      f"`{fqn}`{more} packs parts of unequal size ({' + '.join(map(str, parts))}); "
                      "`parts` shards equal parts only", "split the projection, or leave it replicated")
            return True
        if parts is None and wanted > 1 and info.kind not in ("linear", "conv1d"):
            ctx.error(style.span, "E504", f"`parts = {wanted}`: `{fqn}`{more} is {info.type}; `parts` splits "
                      "fused Linear or Conv1D projections")
            return True
        if parts is None and wanted > 1:
            out = info.attrs.get("out_features")
            if not isinstance(out, int) or out % wanted:
                ctx.error(style.span, "E504",
                          f"`parts = {wanted}`: `{fqn}`{more} has {out} output features, not {wanted} equal parts")
                return True
        return self._placements(ctx, rule, fqn, more)

    @staticmethod
    def _head_params(ctx: Context, rule: TPRuleSpec, fqn: str, more: str) -> bool:
        """A per-head parameter style shards 1-D parameters with one entry per query head:
        anything else the module owns has no head dimension to cut."""
        info = ctx.graph.module(fqn)
        heads = info.attrs.get("num_heads")
        bad = {n: s for n, s in info.params.items() if len(s) != 1 or (isinstance(heads, int) and s[0] != heads)}
        if bad:
            name, shape = next(iter(bad.items()))
            ctx.error(rule.style.span, "E504",
                      f"`{fqn}`{more} owns `{name}` of shape {list(shape)}, not one entry per attention head "
                      f"({heads}): `{rule.style.name}` shards per-head parameters with the heads",
                      "leave that module out, or give the parameter's owner its own rule")
            return True
        return False

    @staticmethod
    def _experts(ctx: Context, rule: TPRuleSpec, fqn: str, more: str) -> bool:
        """A tensor-parallel experts style shards 3-D expert tensors as its contract's
        `params` say: fused experts in transformers' layout, without what it cannot split."""
        style = rule.style
        info = ctx.graph.module(fqn)
        params = STYLES[style.name].contract.params
        shapes = {n: s for n, s in info.params.items() if n in params}
        what = f"`{fqn}`{more} ({info.type})"
        fail = None
        if set(shapes) not in ({"gate_up_proj", "down_proj"}, {"up_proj", "down_proj"},
                               {"gate_proj", "up_proj", "down_proj"}) or any(len(s) != 3 for s in shapes.values()):
            fail = (f"{what} has no 3-D gate_up_proj (or gate_proj and up_proj, or up_proj) and down_proj: "
                    f"`{style.name}` shards fused experts")
        elif set(info.params) - set(params):
            extra = ", ".join(sorted(set(info.params) - set(params)))
            fail = (f"{what} also has {extra}: an expert bias would be added once per rank and summed "
                    f"{ctx.size('tp')} times")
        elif not isinstance(info.attrs.get("is_transposed"), bool):
            fail = (f"{what} stores its experts in a layout meshplan cannot read: `{style.name}` shards "
                    "gate_up_proj [E, 2I, H] and down_proj [E, H, I], or both transposed")
        elif info.attrs.get("has_post_expert_norm"):
            fail = f"{what} normalises each expert's output, which would see a partial sum on every rank"
        elif any(m.type == "Identity" and f.rsplit(".", 1)[0] == fqn for f, m in ctx.graph.modules.items()):
            fail = (f"{what} has identity experts: their output is whole on every rank, and the sum over the "
                    f"ranks would count it {ctx.size('tp')} times")
        if fail is not None:
            ctx.error(style.span, "E504", fail, "leave the experts out of tensor_parallel (replicated), or make "
                      "them expert-parallel (`expert_parallel`)")
            return True
        if fqn in ctx.ep_modules:
            ctx.error(style.span, "E504", f"{what} is expert-parallel too: `{style.name}` cannot shard experts "
                      "that `expert_parallel` already splits over ep",
                      "choose one: expert_parallel (whole experts per rank) or tensor_parallel's "
                      f"`{style.name}` (every expert split over tp)",
                      related=((ctx.ep_modules[fqn].span, "made expert-parallel here"),))
            return True
        block = fqn.rsplit(".", 1)[0] if "." in fqn else ""
        noisy = [(f, m.attrs["jitter"]) for f, m in ctx.graph.modules.items() if (f == block or (
            f.startswith(block + ".") and f.count(".") == fqn.count("."))) and m.attrs.get("jitter", 0) > 0]
        if noisy:
            where, noise = noisy[0]
            ctx.error(style.span, "E504",
                      f"the routing of {what} draws random numbers in training (`{generic(where)}`, jitter {noise}): "
                      "each tp rank samples its own routes, so the partial expert outputs summed over tp belong "
                      "to different routes — silently wrong",
                      "leave the experts replicated (no tensor_parallel rule) or make them expert-parallel; or "
                      "set router_jitter_noise = 0 where the router is deterministic without it")
            return True
        wanted = int(str(style.args.get("parts", 1)))
        packed = "gate_up_proj" in shapes and info.attrs.get("is_concatenated") is not False
        parts = 2 if packed else 1
        if wanted != parts and packed:
            ctx.error(style.span, "E504",
                      f"{what} packs each expert's gate and up projections one after the other in gate_up_proj "
                      f"[E, 2I, H]: with `parts = {wanted}` a rank's share of those rows is not its share of the gate "
                      "and of the up rows (one part over tp 2: rank 0 holds gate rows only, rank 1 up rows only), "
                      "so act(gate) multiplies rows of the wrong projection — silently wrong",
                      f"use `{style.name}(parts = 2)`, which gives every rank its share of the gate and of the up "
                      "rows")
            return True
        if wanted != parts:
            layout = ("interleaves gate and up rows" if "gate_up_proj" in shapes else
                      "keeps gate_proj and up_proj apart" if "gate_proj" in shapes else "has no gate (up_proj only)")
            ctx.error(style.span, "E504",
                      f"{what} {layout}: `parts = {wanted}` would give each rank intermediate rows that do not "
                      "match its down_proj columns — silently wrong", f"use `{style.name}(parts = 1)`")
            return True
        return False

    def _placements(self, ctx: Context, rule: TPRuleSpec, fqn: str, more: str) -> bool:
        if not ctx.graph.traced or not ctx.graph.is_traced(fqn):
            return False
        call = ctx.graph.calls(fqn)
        g = ctx.graph.dataflow
        style = rule.style
        if style.conversions:
            args = call.outputs if style.name == "prepare_output" else call.inputs
            names = [a.name for a in args if a.name]
            what = "outputs" if style.name == "prepare_output" else "inputs"
            for conv in style.conversions:
                if conv.name is not None and conv.name not in names:
                    ctx.error(conv.span, "E504", f"`{fqn}`{more} has no input `{conv.name}` in the trace",
                              f"its inputs are {', '.join(f'`{n}`' for n in names) or 'unnamed'}")
                    return True
            positional = [c for c in style.conversions if c.name is None]
            if len(positional) > len(args):
                ctx.error(style.span, "E504", f"{len(positional)} positional conversions, but `{fqn}`{more} "
                          f"has {len(args)} traced {what}")
                return True
        if style.name == "sequence_parallel" and call.inputs:
            shape = g.nodes[call.inputs[0].node].get("shape") or ()
            dim = int(str(style.args.get("dim", 1)))
            if shape and not -len(shape) <= dim < len(shape):
                ctx.error(style.span, "E504", f"`dim = {dim}`: the input of `{fqn}`{more} has {len(shape)} "
                          f"dimensions (traced as {list(shape)})")
                return True
        for what, args in (("input", call.inputs), ("output", call.outputs)):
            placement = rule.style.args.get(what)
            if not isinstance(placement, Placement) or placement.kind != "shard" or not args:
                continue
            shape = g.nodes[args[0].node].get("shape")
            if shape is None:
                continue
            dim = placement.dim if placement.dim is not None else 0
            if not -len(shape) <= dim < len(shape):
                ctx.error(rule.style.span, "E504",
                          f"`{what} = shard({dim})`: the {what} of `{fqn}`{more} has {len(shape)} "
                          f"dimensions (traced as {list(shape)})",
                          f"dimensions run from {-len(shape)} to {len(shape) - 1}")
                return True
        return False
