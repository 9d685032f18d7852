"""Checked plan + pass results → Program.

Order of steps, and why:
0. adapters (`Adapters`), right after the pipeline cut (which holds the modules in
   stages): PEFT wraps each target in a LoRA layer before any other step, so that the
   tensor-parallel styles go to its `base_layer` (and their adapter layouts to `lora_A` /
   `lora_B`) and FSDP shards base and adapters in one unit.
1. tensor parallel (`Parallelize`): replaces parameters by DTensors on the tp mesh;
   must come before FSDP, which shards those DTensors further (2-D FSDP+TP).
2. context parallel: swaps attention implementations; before AC so the recomputed
   forward runs the same attention.
2b. expert parallel: shards the fused experts over ep and replaces their forward (before
   AC, so a recomputed forward dispatches the same way); when the plan has FSDP it also
   gives the experts their own FSDP unit over the experts' FSDP group, which must exist
   before the dense unit of their layer (FSDP2 then leaves their parameters to it).
3. activation checkpointing: wraps blocks; after TP/CP (the wrapper must see the
   parallelised forward) and before FSDP (FSDP's hooks go on the wrapper's module).
4. FSDP (`FullyShard`), children before parents, root last: FSDP2 groups a module's
   parameters minus those already claimed by inner units.
A section on a mesh dimension of size 1 lowers to nothing (FSDP excepted: with one
rank it still applies mixed precision and offload).
"""

from __future__ import annotations

from meshplan.dsl.errors import Span

from .passes.context import Context, ResolvedUnit
from .program import (
    Checkpoint,
    ContextParallel,
    FullyShard,
    MixedPrecision,
    Offload,
    Parallelize,
    Program,
    Step,
    StyleCall,
    style_call,
)


def lower(ctx: Context) -> Program:
    assert ctx.mesh is not None, "lower() runs only after the passes succeeded"
    order = {fqn: i for i, fqn in enumerate(ctx.graph.fqns(include_root=True))}
    # The pipeline cut comes first: every later step applies to the stage modules that
    # hold its modules.
    steps: list[Step] = [ctx.pipeline] if ctx.pipeline is not None else []
    if ctx.pipeline is None and ctx.spec.pipeline is not None and ctx.size(ctx.spec.pipeline.on or "pp") > 1:
        # Only an unchecked lowering gets here (the pass reported why): a Program without
        # its stages would be another plan, so there is none.
        raise ValueError("the pipeline section cannot be cut into stages (see the pass's errors)")
    steps += _adapters(ctx)
    steps += _tensor_parallel(ctx, order)
    steps += _context_parallel(ctx, order)
    steps += _expert_parallel(ctx, order)
    steps += _checkpoints(ctx, order)
    steps += _fully_shard(ctx, order)
    return Program(plan=ctx.spec.name, model=ctx.graph.name, source=ctx.spec.file,
                   world_size=ctx.world_size, mesh=ctx.mesh, steps=tuple(steps))


def _adapters(ctx: Context) -> list[Step]:
    from .passes.adapters import adapters_step

    step = adapters_step(ctx)
    return [step] if step is not None else []


def _tensor_parallel(ctx: Context, order: dict[str, int]) -> list[Step]:
    tp = ctx.spec.tensor_parallel
    if tp is None or ctx.size(tp.on) <= 1:
        return []
    # One parallelize_module call per block (torchtitan's layer plans), one for the rest.
    groups: dict[str, list[tuple[str, StyleCall]]] = {}
    spans: dict[str, Span] = {}
    for fqn in sorted(ctx.tp_rules, key=order.__getitem__):
        rule = ctx.tp_rules[fqn]
        found = ctx.graph.stack_of(fqn)
        block = found[0].block(found[1]) if found else ""
        relative = fqn[len(block) + 1:] if block and fqn != block else ("" if block else fqn)
        groups.setdefault(block, []).append((relative, style_call(rule.style)))
        spans.setdefault(block, rule.span)
    ordered = sorted(groups, key=lambda b: (b != "", order.get(b, -1)))
    return [Parallelize(fqn=b, mesh_dim=tp.on, plan=tuple(groups[b]), span=spans[b]) for b in ordered]


def _context_parallel(ctx: Context, order: dict[str, int]) -> list[Step]:
    cp = ctx.spec.context_parallel
    if cp is None or ctx.size(cp.on) <= 1 or not ctx.cp_modules:
        return []
    fqns = tuple(sorted(ctx.cp_modules, key=order.__getitem__))
    return [ContextParallel(fqns=fqns, mesh_dim=cp.on, load_balance=cp.load_balance, rotate=cp.rotate,
                            span=cp.span)]


def _expert_parallel(ctx: Context, order: dict[str, int]) -> list[Step]:
    from .passes.experts import expert_step

    step = expert_step(ctx, order)
    return [step] if step is not None else []


def _checkpoints(ctx: Context, order: dict[str, int]) -> list[Step]:
    steps: list[Step] = []
    seen: dict[int, int] = {}
    for fqn in sorted(ctx.checkpoints, key=order.__getitem__):
        spec = ctx.checkpoints[fqn]
        index = seen.get(id(spec), 0)
        seen[id(spec)] = index + 1
        if index % spec.every == 0:
            steps.append(Checkpoint(fqn=fqn, mode=spec.mode, span=spec.span))
    return steps


def _fully_shard(ctx: Context, order: dict[str, int]) -> list[Step]:
    fsdp = ctx.spec.fully_shard
    if fsdp is None:
        return []
    mp = fsdp.mixed_precision
    policy = MixedPrecision(param=mp.param, reduce=mp.reduce, output=mp.output,
                            cast_forward_inputs=mp.cast_forward_inputs) if mp else None
    offload = Offload(pin_memory=fsdp.offload.pin_memory) if fsdp.offload else None
    units = [u for u in ctx.units if u.fqns]
    root = next((u for u in ctx.units if not u.fqns), None)
    forward = sorted(units, key=lambda u: min(order[f] for f in u.fqns))
    last = forward[-1] if forward else None

    def reshard(unit: ResolvedUnit) -> bool | int:
        value = unit.spec.reshard_after_forward
        if value == "auto":
            # Under a pipeline every microbatch would gather the parameters again, in
            # forward and in backward (torchtitan keeps them too).
            if ctx.pipeline is not None:
                return False
            # The last unit's parameters are needed again at once by backward: keep them.
            return unit is not last and unit is not root
        assert isinstance(value, bool | int)
        return value

    # Forward order, children before parents. named_modules() is a preorder walk, so a
    # module's subtree ends at the index of its last descendant: sorting by that end
    # (deeper first on ties) puts every unit after the units nested inside it.
    fqns = list(order)

    def subtree_end(fqn: str) -> int:
        end = order[fqn]
        while end + 1 < len(fqns) and fqns[end + 1].startswith(fqn + "."):
            end += 1
        return end

    ordered = sorted(units, key=lambda u: (max(subtree_end(f) for f in u.fqns),
                                           -max(f.count(".") for f in u.fqns)))
    if root is not None:
        ordered.append(root)
    return [FullyShard(fqns=u.fqns, mesh_dims=fsdp.on, reshard_after_forward=reshard(u),
                       mixed_precision=policy, offload=offload, span=u.spec.span) for u in ordered]
