"""Pattern resolution.

Guarantees: every pattern of every section matches at least one module (otherwise
E502, with the nearest real module names as the hint); within one section no module is
matched by two different rules (E503, naming both lines). Records, for later passes,
which rule each module got (`ctx.tp_rules`), which modules are checkpointed, context-
or expert-parallel, and the resolved FSDP units.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

from meshplan.dsl.errors import Span
from meshplan.dsl.patterns import is_literal, select
from meshplan.dsl.spec import PatternSpec

from .context import Context, ResolvedUnit

_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")


def generic(fqn: str) -> str:
    """`model.layers.7.mlp` → `model.layers.*.mlp`: names a module of every block."""
    return _INDEX.sub("*", fqn)


# The segments PEFT inserts into an adapted module's names (`q_proj.base_layer`,
# `q_proj.lora_A.default`): never in the traced, unadapted graph plans are matched on.
_PEFT_SEGMENT = re.compile(r"\.(base_layer|lora_(A|B|embedding_A|embedding_B|dropout))(\.[^.]+)?$")


def nearest(pattern: str, fqns: Sequence[str], n: int = 3) -> list[str]:
    """Real module names closest to a pattern that matched nothing.

    Layer indices are folded into `*` first, so `model.layers.*.attn` is compared with
    `model.layers.*.self_attn`, not with 80 near-identical names.
    """
    names = list(dict.fromkeys(generic(f) for f in fqns))
    return difflib.get_close_matches(pattern, names, n=n, cutoff=0.5)


class ResolvePatterns:
    name = "patterns"

    def apply(self, ctx: Context) -> None:
        self.fqns = ctx.graph.fqns()
        self.overlaps: set[tuple[Span, Span]] = set()
        spec = ctx.spec
        if spec.tensor_parallel is not None:
            owner: dict[str, Span] = {}
            for rule in spec.tensor_parallel.rules:
                for fqn in self._match(ctx, rule.pattern):
                    if fqn in ctx.tp_rules:
                        self._overlap(ctx, fqn, rule.pattern.span, owner[fqn], "tensor_parallel rules")
                        continue
                    ctx.tp_rules[fqn] = rule
                    owner[fqn] = rule.pattern.span
        for ac in spec.checkpoints:
            for pattern in ac.patterns:
                for fqn in self._match(ctx, pattern):
                    if fqn in ctx.checkpoints:
                        self._overlap(ctx, fqn, pattern.span, ctx.checkpoints[fqn].span, "activation_checkpoint sections")
                        continue
                    ctx.checkpoints[fqn] = ac
        if spec.context_parallel is not None:
            self._collect(ctx, spec.context_parallel.attention, ctx.cp_modules, "attention items")
        if spec.expert_parallel is not None:
            self._collect(ctx, spec.expert_parallel.experts, ctx.ep_modules, "experts items")
        if spec.fully_shard is not None:
            self._units(ctx)

    def _match(self, ctx: Context, pattern: PatternSpec) -> list[str]:
        found: list[str] = select(pattern.text, self.fqns)
        if not found:
            base = _PEFT_SEGMENT.sub("", pattern.text)
            close = nearest(pattern.text, self.fqns)
            if base != pattern.text and select(base, self.fqns):
                # PEFT's names inside an adapted module (peft #2394): the plan names the base
                hint = (f"`base_layer` and `lora_A`/`lora_B` are PEFT's names inside an adapted module; plans "
                        f"name the base module as the unadapted model has it (its adapters follow its style): "
                        f"write `{base}`")
            elif close:
                hint = "did you mean " + " or ".join(f"`{c}`" for c in close) + "?"
            else:
                hint = (f"the model ({ctx.graph.name}) has top-level modules "
                        + ", ".join(f"`{f}`" for f in self.fqns if "." not in f))
            ctx.error(pattern.span, "E502", f"`{pattern.text}` matches no module of {ctx.graph.name}", hint)
        return found

    def _overlap(self, ctx: Context, fqn: str, span: Span, first: Span, what: str) -> None:
        """One error per pair of lines, naming a module of every block they share."""
        key = (span, first)
        if key in self.overlaps:
            return
        self.overlaps.add(key)
        ctx.error(span, "E503", f"`{generic(fqn)}` is matched by two {what} (lines {first.line} and {span.line})",
                  "make the patterns disjoint, e.g. with `{a,b}` alternatives",
                  related=((first, "first matched here"),))

    def _collect(self, ctx: Context, patterns: tuple[PatternSpec, ...], into: dict[str, PatternSpec],
                 what: str) -> None:
        for pattern in patterns:
            for fqn in self._match(ctx, pattern):
                if fqn in into:
                    self._overlap(ctx, fqn, pattern.span, into[fqn].span, what)
                    continue
                into[fqn] = pattern

    def _units(self, ctx: Context) -> None:
        """A unit statement of literal names is one unit; a wildcard makes one unit per match."""
        fsdp = ctx.spec.fully_shard
        assert fsdp is not None
        owner: dict[str, Span] = {}
        for unit in fsdp.units:
            matched = [(p, self._match(ctx, p)) for p in unit.patterns]
            groups: list[tuple[str, ...]]
            if all(is_literal(p.text) for p in unit.patterns):
                groups = [tuple(f for _, fs in matched for f in fs)]
            else:
                groups = [(f,) for _, fs in matched for f in fs]
            for group in groups:
                fresh = []
                for fqn in group:
                    if fqn in owner:
                        self._overlap(ctx, fqn, unit.span, owner[fqn], "fully_shard units")
                        continue
                    owner[fqn] = unit.span
                    fresh.append(fqn)
                if fresh:
                    ctx.units.append(ResolvedUnit(tuple(fresh), unit))
        if fsdp.root is not None:
            ctx.units.append(ResolvedUnit((), fsdp.root))
