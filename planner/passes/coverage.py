"""Every mesh dimension with more than one rank is used, and used by something that runs.

Guarantees: `cp > 1` has a `context_parallel` section (otherwise its ranks would split
nothing yet be counted as separate data shards nowhere); `tp > 1` without a
`tensor_parallel` section is reported as a warning (those ranks compute the same thing);
`ep > 1` has an `expert_parallel` section; `pp > 1` has a `pipeline` section. A plan is
never accepted for a program that would silently leave a dimension out.
"""

from __future__ import annotations

from meshplan.dsl.errors import Span

from .context import Context


class Coverage:
    name = "coverage"

    def apply(self, ctx: Context) -> None:
        if ctx.mesh is None:
            return
        spec = ctx.spec
        mesh_span = spec.mesh.span

        def span_of(dim: str) -> Span:
            d = spec.mesh.dim(dim)
            return d.span if d is not None else mesh_span

        if ctx.size("cp") > 1 and spec.context_parallel is None:
            ctx.error(span_of("cp"), "E509", f"cp = {ctx.size('cp')} but the plan has no `context_parallel` section",
                      "add `context_parallel on cp { attention model.layers.*.self_attn }`, or set cp = 1")
        if ctx.size("tp") > 1 and spec.tensor_parallel is None:
            ctx.warn(span_of("tp"), "W102", f"tp = {ctx.size('tp')} but no `tensor_parallel` section: those ranks "
                     "would all compute the same thing")
        if ctx.size("pp") > 1 and spec.pipeline is None:
            ctx.error(span_of("pp"), "E509", f"pp = {ctx.size('pp')} but the plan has no `pipeline` section",
                      "add `pipeline on pp { schedule = 1f1b  microbatches = N }`, or set pp = 1")
        if ctx.size("ep") > 1 and spec.expert_parallel is None:
            ctx.error(span_of("ep"), "E509", f"ep = {ctx.size('ep')} but the plan has no `expert_parallel` section",
                      "add `expert_parallel on ep { experts model.layers.*.mlp.experts }`, or set ep = 1")
