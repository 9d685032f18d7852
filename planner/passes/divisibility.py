"""Divisibility.

Guarantees: every size a plan shards divides by the mesh dimension it is sharded
over — output/input features of colwise/rowwise projections (per part for fused ones),
the vocabulary of a vocabulary-parallel embedding or `lm_head`, the embedding width,
attention heads and key/value heads behind q/k/v/o projections, the sequence length
for sequence parallelism (tp; under context parallelism each rank's seq_len / cp
tokens split tp ways) and context parallelism (2·cp with head-tail balancing),
the intermediate features of every expert under `tp_experts`, and the number of
experts for expert parallelism. Errors name the model fact:
"8 key/value heads cannot be split 16 ways". A size that does not divide where the
module's code never sees the shard (a colwise that gathers its output, a rowwise that
slices a whole input) is a warning (W107): DTensor splits it unevenly and exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from meshplan.dsl.errors import Span
from meshplan.dsl.spec import Placement, TPRuleSpec
from meshplan.dsl.styles import STYLES, shards_sequence

from ..mesh_facts import sequence_multiple
from .context import Context
from .patterns import generic
from .styles import fused_parts


def _ways(n: int) -> str:
    return f"{n} ways"


class Divisibility:
    name = "divisibility"

    def apply(self, ctx: Context) -> None:
        if ctx.mesh is None:
            return
        self.reported: set[tuple[Span, str]] = set()
        tp = ctx.spec.tensor_parallel
        if tp is not None and tp.on:
            n = ctx.size(tp.on)
            if n > 1:
                for fqn, rule in ctx.tp_rules.items():
                    self._module(ctx, fqn, rule, n)
                self._sequence(ctx, tp.on, n)
        self._context(ctx)
        self._experts(ctx)

    def _fail(self, ctx: Context, span: Span, fact: str, fqn: str | None = None, hint: str | None = None,
              related: tuple[tuple[Span, str], ...] = ()) -> None:
        """One error per plan line and fact, however many modules (layers) share it."""
        if (span, fact) in self.reported:
            return
        self.reported.add((span, fact))
        where = f" (`{generic(fqn)}`)" if fqn else ""
        ctx.error(span, "E505", fact + where, hint, related)

    def _module(self, ctx: Context, fqn: str, rule: TPRuleSpec, n: int) -> None:
        """The size the rule's style shards on this module (the style registry's
        `divides`), per part for a fused projection, and its heads."""
        graph = ctx.graph
        info = graph.module(fqn)
        divides = STYLES[rule.style.name].divides.get(info.kind)
        size = info.attrs.get(divides.attr) if divides is not None else None
        if divides is None or not isinstance(size, int):
            return
        span = rule.style.span
        # A style that gathers its output (colwise) or slices a whole input (rowwise) never
        # lets the code see a shard: parts and heads need not split (measured exact).
        args = rule.style.args
        whole = args.get("output" if rule.style.name.endswith("colwise") else "input") == Placement("replicate") \
            and int(str(args.get("parts", 1))) == 1 and rule.style.name.endswith(("colwise", "rowwise"))
        parts = (fused_parts(graph, fqn) or (size,)) if divides.per_part and not whole else (size,)
        for part in parts:
            if part % n:
                per = " per part" if len(parts) > 1 else ""
                fact = f"{divides.fact.format(n=part)}{per} cannot be split {_ways(n)}"
                if whole:
                    # The module's code never sees the shard: DTensor splits unevenly and the
                    # result is exact (measured: GPT-2's odd vocabulary, rowwise embedding and
                    # gathered head); only the balance suffers.
                    self._uneven(ctx, span, fact, fqn)
                else:
                    self._fail(ctx, span, fact, fqn, divides.hint)
                return
        parent = graph.modules.get(fqn.rsplit(".", 1)[0]) if "." in fqn else None
        if divides.heads and not whole and parent is not None and parent.kind == "attention":
            self._heads(ctx, fqn, span, parent.attrs, size, n, fused=len(parts) > 1)

    def _uneven(self, ctx: Context, span: Span, fact: str, fqn: str) -> None:
        if (span, fact) in self.reported:
            return
        self.reported.add((span, fact))
        ctx.warn(span, "W107", f"{fact} evenly (`{generic(fqn)}`): DTensor gives the first ranks one row more, "
                 "which is exact but unbalanced",
                 "pad the size to a multiple of the tp size for an even split")

    def _heads(self, ctx: Context, fqn: str, span: Span, attrs: Mapping[str, Any], size: int,
               n: int, *, fused: bool) -> None:
        """q/k/v/o projections split whole heads: the head counts must divide too."""
        heads, kv, hd = attrs.get("num_heads"), attrs.get("num_kv_heads"), attrs.get("head_dim")
        if not (isinstance(heads, int) and isinstance(kv, int) and isinstance(hd, int)):
            return
        checks: list[tuple[int, str]] = []
        if fused:
            checks = [(heads, "attention heads"), (kv, "key/value heads")]
        elif size == kv * hd and kv != heads:
            checks = [(kv, "key/value heads")]
        elif size == heads * hd:
            checks = [(heads, "attention heads")]
        for count, what in checks:
            if count % n:
                hint = ("use a tp size that divides both head counts"
                        if what == "key/value heads" else None)
                self._fail(ctx, span, f"{count} {what} cannot be split {_ways(n)}", fqn, hint)
                return

    def _sequence(self, ctx: Context, dim: str, n: int) -> None:
        """Sequence parallelism (a style that shards dim 1 of activations) splits seq_len."""
        sp_rules = [r for r in ctx.tp_rules.values() if _shards_sequence(r)]
        found = ctx.seq_len
        if not sp_rules or found is None:
            return
        seq_len, seq_span = found
        cp_spec = ctx.spec.context_parallel
        cp = ctx.size(cp_spec.on) if cp_spec is not None and cp_spec.on else 1
        # The CP chunking is checked on its own (`_context`): here only SP's share of it.
        if seq_len % cp == 0 and seq_len % sequence_multiple(sp=n, cp=cp, headtail=False):
            # Each context-parallel rank holds seq_len / cp tokens, which SP splits again.
            rule = sp_rules[0]
            if cp == 1:
                self._fail(ctx, rule.style.span,
                           f"sequence length {seq_len} cannot be split {_ways(n)} for sequence parallelism "
                           f"on `{dim}`", hint=f"use a seq_len that is a multiple of {n}",
                           related=((seq_span, "seq_len set here"),))
                return
            self._fail(ctx, rule.style.span,
                       f"each context-parallel rank holds {seq_len // cp} tokens (sequence length "
                       f"{seq_len} / cp {cp}), which cannot be split {_ways(n)} for sequence parallelism "
                       f"on `{dim}`", hint=f"use a seq_len that is a multiple of cp × {dim} = {cp * n}",
                       related=((seq_span, "seq_len set here"),))

    def _context(self, ctx: Context) -> None:
        cp = ctx.spec.context_parallel
        found = ctx.seq_len
        if cp is None or not cp.on or found is None:
            return
        n = ctx.size(cp.on)
        if n <= 1:
            return
        seq_len, seq_span = found
        chunks = sequence_multiple(cp=n, headtail=cp.load_balance == "headtail")
        if seq_len % chunks:
            why = f"2·cp = {chunks} chunks (head-tail balancing)" if cp.load_balance == "headtail" else f"{n} chunks"
            self._fail(ctx, cp.span, f"sequence length {seq_len} cannot be cut into {why}",
                       hint=f"use a seq_len that is a multiple of {chunks}", related=((seq_span, "seq_len set here"),))

    def _experts(self, ctx: Context) -> None:
        ep = ctx.spec.expert_parallel
        if ep is None or not ep.on:
            return
        n = ctx.size(ep.on)
        if n <= 1:
            return
        for fqn, pattern in ctx.ep_modules.items():
            experts = ctx.graph.module(fqn).attrs.get("num_experts")
            if isinstance(experts, int) and experts % n:
                self._fail(ctx, pattern.span, f"{experts} experts cannot be split {_ways(n)}", fqn)
                return


def _shards_sequence(rule: TPRuleSpec) -> bool:
    style = rule.style
    placements = (style.args.get("input"), style.args.get("output"),
                  *(p for c in style.conversions for p in (c.source, c.target)))
    return bool(shards_sequence(style.name, tuple(str(p) if isinstance(p, Placement) else None for p in placements)))
