"""FSDP structure.

Guarantees: no FSDP unit groups a module together with one of its own descendants
(units nest only across `fully_shard` calls, children first); tied parameters (one
tensor under two names, e.g. a tied embedding and `lm_head`) belong to one unit, so
the tensor is sharded and gathered once; every data-parallel dimension with more than
one rank (dp_replicate, dp_shard, cp) is covered by the FSDP mesh — otherwise gradients
are never averaged over it and the ranks drift apart silently; a two-name mesh is
(replicate, shard) with dp_replicate first. `root` is checked by the language.
"""

from __future__ import annotations

from meshplan.dsl.spec import MESH_DIMS

from .context import Context, ResolvedUnit


def _inside(fqn: str, ancestor: str) -> bool:
    return ancestor == "" or fqn == ancestor or fqn.startswith(ancestor + ".")


def owner(units: list[ResolvedUnit], param_fqn: str) -> ResolvedUnit | None:
    """The unit that shards a parameter: the innermost unit containing its module."""
    module = param_fqn.rsplit(".", 1)[0] if "." in param_fqn else ""
    best: tuple[int, ResolvedUnit] | None = None
    for unit in units:
        for fqn in unit.fqns or ("",):
            if _inside(module, fqn):
                depth = len(fqn.split(".")) if fqn else 0
                if best is None or depth > best[0]:
                    best = (depth, unit)
    return best[1] if best else None


class FsdpStructure:
    name = "fsdp"

    def apply(self, ctx: Context) -> None:
        fsdp = ctx.spec.fully_shard
        self._coverage(ctx)
        if fsdp is None:
            return
        for unit in ctx.units:
            for a in unit.fqns:
                inner = next((b for b in unit.fqns if b != a and _inside(b, a)), None)
                if inner is not None:
                    ctx.error(unit.spec.span, "E508",
                              f"this unit holds `{a}` and its own submodule `{inner}`",
                              "give the submodule a unit of its own: units nest across `unit` lines")
                    break
        for group in ctx.graph.tied:
            owners = {name: owner(ctx.units, name) for name in group}
            distinct = {id(u): (name, u) for name, u in owners.items() if u is not None}
            if len(distinct) > 1:
                (n1, u1), (n2, u2) = list(distinct.values())[:2]
                ctx.error(u2.spec.span, "E508",
                          f"`{n1}` and `{n2}` are one tied tensor but fall in different FSDP units "
                          f"(lines {u1.spec.span.line} and {u2.spec.span.line})",
                          "put both modules in one unit (e.g. `unit "
                          + ", ".join(sorted({n.rsplit('.', 1)[0] for n in (n1, n2)}))
                          + "`) or leave them to `root`",
                          related=((u1.spec.span, "the other unit"),))
        if ctx.mesh is not None:
            ranks = ctx.size(fsdp.on[-1])
            for written in fsdp.units + ((fsdp.root,) if fsdp.root else ()):
                n = written.reshard_after_forward
                if isinstance(n, int) and not isinstance(n, bool) and (ranks % n or n >= ranks):
                    ctx.error(written.span, "E505", f"`reshard_after_forward = {n}` must be a divisor of the "
                              f"{ranks} ranks FSDP shards over (`{fsdp.on[-1]}`), smaller than it",
                              "keep parameters resharded over a subgroup, e.g. the ranks of one node")
        if ctx.mesh is not None and len(fsdp.on) == 2:
            replicate = ctx.mesh.expand(fsdp.on[0])
            if "dp_shard" in replicate or "cp" in replicate:
                sharding = ", ".join(f"`{d}`" for d in replicate if d in ("dp_shard", "cp"))
                ctx.error(fsdp.span, "E509",
                          f"HSDP replicates parameters over its first mesh name, `{fsdp.on[0]}`, which holds the "
                          f"sharding dimension {sharding}",
                          f"swap them: `fully_shard on (dp_replicate, {fsdp.on[0]})`")

    def _coverage(self, ctx: Context) -> None:
        facts = ctx.facts
        if facts is None:
            return
        fsdp = ctx.spec.fully_shard
        missing = facts.uncovered(fsdp.on if fsdp else ())
        if not missing:
            return
        described = ", ".join(f"{d} ({ctx.size(d)} ranks)" for d in sorted(missing, key=MESH_DIMS.index))
        if fsdp is None:
            ctx.error(ctx.spec.mesh.span, "E509",
                      f"nothing averages gradients over {described}: the plan has no `fully_shard`",
                      "add `fully_shard on …` over the data-parallel dimensions")
        else:
            ctx.error(fsdp.span, "E509",
                      f"fully_shard's mesh leaves out {described}: gradients would not be averaged "
                      "over those ranks",
                      "shard over them, e.g. `fully_shard on (dp_replicate, fsdp)` with "
                      "`submesh fsdp = dp_shard * cp`")
