"""Pipeline parallelism: how the decoder is cut into stages, and whether the cut can run.

Guarantees, for a plan with `pipeline on pp { … }` and pp > 1:
- the model is a decoder that can be cut (a stack of layers under the embedding, with a
  final norm, an output head and a rotary embedding: `model.embed_tokens`, `model.layers`,
  `model.norm`, `lm_head`, `model.rotary_emb`) (E512);
- the schedule gets the stages per rank it runs: one for gpipe and 1f1b, exactly two for
  zbv (`virtual_stages`); the interleaved schedules take any number (with one they run
  exactly, as 1F1B does — measured) (E512);
- microbatches ≥ pp: torch's schedules refuse fewer on the first step, and the other
  stages then wait for a microbatch that never comes (E512); any count ≥ pp runs
  exactly, a multiple of pp or not (measured for interleaved 1F1B, 3 over pp = 2);
- the split is valid: explicit `split` patterns name layers of the stack, in order,
  never the first layer, one stage per boundary, every stage holds at least one layer;
  without `split` the layers are dealt evenly, the first and last stages (which carry
  the embedding and the head) taking the smaller shares (E512);
- the tied embedding and output head (`tie_word_embeddings`) are not cut apart: they sit
  on the first and the last stage, on different ranks, and their two gradients would
  never be summed (E508);
- an uneven split is reported with each stage's share of the parameters (W104);
- FSDP units that reshard after forward are reported (W105): under a pipeline they
  gather their parameters again for every microbatch, in forward and in backward.
`pipeline_step` lowers the section to the `Pipeline` step.
"""

from __future__ import annotations

import itertools
import math

from meshplan.dsl.errors import Span
from meshplan.dsl.patterns import matches

from ..graph import Stack
from ..program import Pipeline
from .context import Context

# Schedules that run one stage per rank, and the V-shaped ones (two per rank); the
# runtime reads these too (runtime.parallel.pipeline).
SINGLE = ("gpipe", "1f1b")
V_SHAPED = ("zbv",)
_PARTS = {"embed": ("model.embed_tokens",), "head": ("model.norm", "lm_head"),
          "rotary": ("model.rotary_emb",)}


def _pp(ctx: Context) -> int:
    spec = ctx.spec.pipeline
    return ctx.size(spec.on) if spec is not None and spec.on else ctx.size("pp")


def decoder_stack(ctx: Context) -> Stack | None:
    return next((s for s in ctx.graph.stacks if s.fqn == "model.layers"), None)


def stages_of(ctx: Context, stack: Stack, count: int) -> tuple[tuple[int, ...], ...] | None:
    """The layers of each of `count` stages: from `split` patterns, or dealt evenly."""
    spec = ctx.spec.pipeline
    assert spec is not None
    n = stack.length
    if not spec.splits:
        if count > n:
            ctx.error(spec.span, "E512", f"{count} pipeline stages (pp × virtual_stages) cannot share "
                      f"{n} decoder layers: every stage needs at least one",
                      f"use at most {n} stages")
            return None
        base, extra = divmod(n, count)
        # The extra layers go to the middle stages: the first carries the embedding and
        # the last the norm and head.
        sizes = [base] * count
        order = sorted(range(count), key=lambda i: (i in (0, count - 1), abs(i - (count - 1) / 2)))
        for i in order[:extra]:
            sizes[i] += 1
        starts = [sum(sizes[:i]) for i in range(count)]
        return tuple(tuple(range(a, a + k)) for a, k in zip(starts, sizes, strict=True))
    starts = []  # list[int], as in the even split above
    for pattern in spec.splits:
        found = [i for i in range(n) if matches(pattern.text, stack.block(i))]
        if not found:
            ctx.error(pattern.span, "E512", f"split `{pattern.text}` matches no layer of `{stack.fqn}`",
                      f"name layers as `{stack.fqn}.N`, N from 1 to {n - 1}")
            return None
        if 0 in found:
            ctx.error(pattern.span, "E512", f"split `{pattern.text}` names the first layer: the first stage "
                      "would hold no layer", f"a stage begins at each split; name `{stack.fqn}.1` or later")
            return None
        starts += found
    bounds = [0, *sorted(set(starts)), n]
    if len(bounds) - 1 != count:
        ctx.error(spec.splits[0].span, "E512", f"the splits cut `{stack.fqn}` into {len(bounds) - 1} stages, "
                  f"but the schedule runs {count} (pp × virtual_stages)",
                  f"give {count - 1} split points")
        return None
    return tuple(tuple(range(a, b)) for a, b in itertools.pairwise(bounds))


def stage_ranks(schedule: str, pp: int, count: int) -> tuple[tuple[int, ...], ...]:
    """The stages each pp rank holds, in the order the schedule wants: looped schedules
    give rank r the stages r, r + pp, …; V-shaped ones r and 2·pp − 1 − r."""
    if schedule in V_SHAPED:
        return tuple((r, 2 * pp - 1 - r) for r in range(pp))
    return tuple(tuple(range(r, count, pp)) for r in range(pp))


class PipelineStages:
    name = "pipeline"

    def apply(self, ctx: Context) -> None:
        spec = ctx.spec.pipeline
        if ctx.mesh is None or spec is None or _pp(ctx) <= 1:
            return
        pp = _pp(ctx)
        self._schedule(ctx, pp)
        stack = decoder_stack(ctx)
        missing = [m for parts in _PARTS.values() for m in parts if m not in ctx.graph.modules]
        if stack is None or missing:
            what = ", ".join(f"`{m}`" for m in (missing or ["model.layers"]))
            ctx.error(spec.span, "E512", f"{ctx.graph.name} cannot be cut into pipeline stages: it has no "
                      f"{what}", "stages are built for decoder-only causal LMs laid out as model.embed_tokens, "
                      "model.layers, model.norm, model.rotary_emb and lm_head")
            return
        stages = stages_of(ctx, stack, pp * spec.virtual_stages)
        if stages is None:
            return
        self._tied(ctx, spec.span)
        self._balance(ctx, stack, stages, spec.span)
        self._reshard(ctx)
        # Lowered even when a check above failed, where the step can be built: an
        # unchecked Program (the ground-truth harness) then runs what the plan asks.
        try:
            ctx.pipeline = Pipeline(
                mesh_dim=spec.on, schedule=spec.schedule, microbatches=spec.microbatches,
                layers=stack.fqn, stages=stages, ranks=stage_ranks(spec.schedule, pp, len(stages)),
                embed=_PARTS["embed"], head=_PARTS["head"], rotary=_PARTS["rotary"], span=spec.span)
        except ValueError:
            if not ctx.failed:
                raise

    @staticmethod
    def _schedule(ctx: Context, pp: int) -> bool:
        spec = ctx.spec.pipeline
        assert spec is not None
        v, m, name = spec.virtual_stages, spec.microbatches, spec.schedule
        ok = True
        if name in SINGLE and v != 1:
            ctx.error(spec.span, "E512", f"{name} runs one stage per rank, not virtual_stages = {v}",
                      "use interleaved_1f1b or interleaved_zero_bubble for several stages per rank")
            ok = False
        if name in V_SHAPED and v != 2:
            ctx.error(spec.span, "E512", f"zbv runs exactly two stages per rank (r and 2·pp − 1 − r), not "
                      f"virtual_stages = {v}", "set virtual_stages = 2")
            ok = False
        if m < pp:
            ctx.error(spec.span, "E512", f"microbatches = {m} is fewer than pp = {pp}: the last stages would wait "
                      "for microbatches that never come (the schedule hangs or crashes)",
                      f"use at least {pp} microbatches")
            ok = False
        return ok

    @staticmethod
    def _tied(ctx: Context, span: Span) -> None:
        for group in ctx.graph.tied:
            names = set(group)
            if any(n.startswith("model.embed_tokens") for n in names) and any(
                    n.startswith("lm_head") for n in names):
                ctx.error(span, "E508", f"`{group[0]}` and `{group[1]}` are one tied tensor, but the pipeline puts "
                          "the embedding on the first stage and the head on the last: their two gradients "
                          "would never be summed and the copies would drift apart",
                          "untie them (tie_word_embeddings = false) or train without a pipeline")

    @staticmethod
    def _balance(ctx: Context, stack: Stack, stages: tuple[tuple[int, ...], ...], span: Span) -> None:
        per_stage = [0] * len(stages)
        where = {i: s for s, layers in enumerate(stages) for i in layers}
        for name, shape in ctx.graph.parameters.items():
            prefix = stack.fqn + "."
            if name.startswith(prefix):
                s = where[int(name[len(prefix):].split(".", 1)[0])]
            elif name.startswith("model.embed_tokens"):
                s = 0
            else:
                s = len(stages) - 1
            per_stage[s] += math.prod(shape)
        total = sum(per_stage) or 1
        if max(per_stage) > 1.25 * (total / len(stages)):
            shares = ", ".join(f"stage {i}: {len(layers)} layers, {per_stage[i] / total:.0%}"
                               for i, layers in enumerate(stages))
            ctx.warn(span, "W104", f"the pipeline stages are uneven ({shares} of the parameters): the "
                     "heaviest stage sets the pace of every step",
                     "move split points (or first/last stages lighter with `split`)")

    @staticmethod
    def _reshard(ctx: Context) -> None:
        fs = ctx.spec.fully_shard
        if fs is None:
            return
        for unit in fs.units:
            if unit.reshard_after_forward is True:
                ctx.warn(unit.span, "W105", "under a pipeline this unit frees its parameters after every "
                         "microbatch's forward and gathers them again for each backward",
                         "set reshard_after_forward = false for pipelined training (memory permitting)")
