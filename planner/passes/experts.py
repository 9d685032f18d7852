"""Expert parallelism.

Guarantees, for a plan with `expert_parallel on ep { experts PATTERN }` and ep > 1:
- every matched module is a fused experts module (3-D `gate_up_proj`/`down_proj`,
  transformers 5), not the MoE block or the router (E504, naming what it is);
- ep divides dp_shard × cp × tp (the pool the expert mesh is carved from), and where tp
  ranks hold the same tokens, ep and tp divide one another (each ep group then splits
  its replicated tokens evenly) (E501);
- no router gets a tensor-parallel style: its logits must be whole for top-k (E504);
- under sequence parallelism, each MoE block converts its input to replicated plain
  tensors (`prepare_input(shard(1) -> replicate, local_output = true)`): otherwise every
  tp rank would route a different sequence slice through a router nobody reduces, or
  hand DTensors to code that mixes them with plain ones (E506);
- a float32 router (DeepSeek-V3's weight and `e_score_correction_bias`) is not in an
  FSDP unit with parameters of another dtype (E508);
- no activation checkpoint recomputes a random routing (router jitter noise): the
  runtime does not replay the RNG, so the recomputed routes would differ (E503).
The divisibility of the experts by ep (per layer) is `Divisibility`'s. `expert_step`
lowers the section to the `ExpertParallel` step.
"""

from __future__ import annotations

import math

from meshplan.dsl.errors import Span
from meshplan.dsl.spec import Placement

from ..program import ExpertParallel, MixedPrecision
from .context import Context
from .patterns import generic


def _ep(ctx: Context) -> int:
    ep = ctx.spec.expert_parallel
    return ctx.size(ep.on) if ep is not None and ep.on else 1


def _parent(fqn: str) -> str:
    return fqn.rsplit(".", 1)[0] if "." in fqn else ""


def _routers(ctx: Context, blocks: set[str]) -> list[str]:
    return [f for f in ctx.graph.fqns() if _parent(f) in blocks and ctx.graph.module(f).kind == "router"]


class ExpertPlacement:
    name = "experts"

    def apply(self, ctx: Context) -> None:
        ep_spec = ctx.spec.expert_parallel
        if ctx.mesh is None or ep_spec is None:
            return
        n = _ep(ctx)
        if n <= 1:
            return
        self._kinds(ctx)
        self._pool(ctx, ep_spec.span, n)
        blocks = {_parent(f) for f in ctx.ep_modules}
        routers = _routers(ctx, blocks)
        self._router_styles(ctx, routers)
        self._sequence_parallel(ctx, blocks)
        self._dtypes(ctx, routers)
        self._recompute(ctx, routers)

    def _kinds(self, ctx: Context) -> None:
        seen: set[Span] = set()
        for fqn, pattern in ctx.ep_modules.items():
            info = ctx.graph.module(fqn)
            fused = info.kind == "experts" and info.attrs.get("fused") and {"gate_up_proj", "down_proj"} <= set(info.params)
            if fused or pattern.span in seen:
                continue
            seen.add(pattern.span)
            experts = [f for f in ctx.graph.fqns() if f.startswith(fqn + ".") or _parent(f) == fqn]
            inner = next((f for f in experts if ctx.graph.module(f).kind == "experts"), None)
            hint = f"did you mean `{generic(inner)}`?" if inner else "match the layers' `mlp.experts` modules"
            ctx.error(pattern.span, "E504", f"`{pattern.text}` matches `{generic(fqn)}` ({info.type}, a "
                      f"{info.kind} module), not fused experts with 3-D gate_up_proj/down_proj", hint)

    def _pool(self, ctx: Context, span: Span, n: int) -> None:
        pool = ctx.size("dp_shard") * ctx.size("cp") * ctx.size("tp")
        dim = ctx.spec.mesh.dim("ep")
        where = dim.span if dim is not None else span
        if pool % n:
            ctx.error(where, "E501", f"ep = {n} must divide dp_shard × cp × tp = {pool}: the expert mesh is "
                      "carved out of those ranks")
            return
        tp = ctx.size("tp")
        if tp > 1 and n % tp and tp % n:
            ctx.error(where, "E501", f"ep = {n} and tp = {tp} must divide one another: tp ranks hold the same "
                      "tokens, and each expert group splits them evenly among its tp ranks")

    def _router_styles(self, ctx: Context, routers: list[str]) -> None:
        reported: set[Span] = set()
        for fqn in routers:
            rule = ctx.tp_rules.get(fqn)
            if rule is None or rule.span in reported:
                continue
            reported.add(rule.span)
            ctx.error(rule.style.span, "E504", f"the router `{generic(fqn)}` ({ctx.graph.module(fqn).type}) "
                      f"cannot be `{rule.style.name}`: top-k needs every expert's logit on every rank",
                      "leave the router out of tensor_parallel (it stays replicated)")

    def _sequence_parallel(self, ctx: Context, blocks: set[str]) -> None:
        sp = [r for r in ctx.tp_rules.values() if r.style.name == "sequence_parallel"]
        if not sp or ctx.size("tp") <= 1:
            return
        ep = ctx.spec.expert_parallel
        assert ep is not None
        for block in sorted(blocks):
            rule = ctx.tp_rules.get(block)
            ok = rule is not None and rule.style.name == "prepare_input" and bool(
                rule.style.args.get("local_output")) and all(
                c.target == Placement("replicate") for c in rule.style.conversions)
            if ok:
                continue
            what = (f"has `{rule.style.name}`" if rule is not None and rule.style.name != "prepare_input" else
                    "keeps DTensors" if rule is not None else "has no rule")
            span = rule.style.span if rule is not None else ep.span
            ctx.error(span, "E506", f"the MoE block `{generic(block)}` sits in a sequence-parallel region and "
                      f"{what}: its router and experts need the whole sequence as plain tensors",
                      "end sequence parallelism before the MoE block: `o_proj : rowwise` (replicated "
                      "output) and no sequence_parallel norms around it",
                      related=((sp[0].span, "sequence parallelism starts here"),))
            return

    def _dtypes(self, ctx: Context, routers: list[str]) -> None:
        """FSDP2 gathers a unit's parameters as one flat buffer of one original dtype: a
        float32 router in a unit of bf16 parameters fails at the first forward."""
        fsdp = ctx.spec.fully_shard
        fp32 = [f for f in routers if "e_score_correction_bias" in ctx.graph.module(f).buffers]
        config = ctx.graph.source.config if ctx.graph.source is not None else None
        dtype = str(getattr(config, "torch_dtype", None) or getattr(config, "dtype", None) or "float32")
        if fsdp is None or not fp32 or "float32" in dtype:
            return
        for unit in ctx.units:
            members = unit.fqns or ("",)
            inside = [r for r in fp32 if any(m == "" or r == m or r.startswith(m + ".") for m in members)]
            # A router in a unit nested inside this one is that unit's business.
            inside = [r for r in inside if not any(u is not unit and u.fqns and any(
                (r == f or r.startswith(f + ".")) and f != m for f in u.fqns for m in members)
                for u in ctx.units)]
            if not inside or all(m in inside for m in members):
                continue
            ctx.error(unit.spec.span, "E508", f"the float32 router `{generic(inside[0])}` (weight and "
                      f"e_score_correction_bias) is in this FSDP unit with the model's "
                      f"{dtype.replace('torch.', '')} parameters: FSDP2 needs one dtype per unit",
                      f"give the routers units of their own: `unit {generic(inside[0])}`")
            return

    def _recompute(self, ctx: Context, routers: list[str]) -> None:
        config = ctx.graph.source.config if ctx.graph.source is not None else None
        noise = float(getattr(config, "router_jitter_noise", 0.0) or 0.0)
        if noise <= 0:
            return
        for fqn, ac in ctx.checkpoints.items():
            inside = [r for r in routers if r.startswith(fqn + ".")]
            if inside:
                ctx.error(ac.span, "E503", f"checkpointing `{generic(fqn)}` recomputes the routing of "
                          f"`{generic(_parent(inside[0]))}`, which draws router jitter noise "
                          f"({noise}): the recomputed tokens would go to other experts",
                          "checkpoint the attention only, or set router_jitter_noise = 0")
                return


def expert_step(ctx: Context, order: dict[str, int]) -> ExpertParallel | None:
    """The section as a step: ep > 1 and experts matched (else nothing to do)."""
    spec = ctx.spec.expert_parallel
    n = _ep(ctx)
    if spec is None or n <= 1 or not ctx.ep_modules:
        return None
    tp = ctx.size("tp")
    copies = min(n, tp) if tp > 1 else 1
    fsdp = ctx.spec.fully_shard
    dims = tuple(d for name in (fsdp.on if fsdp else ()) for d in ctx.mesh.expand(name)) if ctx.mesh else ()
    mp = fsdp.mixed_precision if fsdp else None
    policy = MixedPrecision(param=mp.param, reduce=mp.reduce, output=mp.output,
                            cast_forward_inputs=mp.cast_forward_inputs) if mp else None
    # The dense parameters' FSDP averages over its mesh; each token set reaches the experts
    # once per tp/copies expert groups, which FSDP over efsdp also sums.
    divisor = math.prod(ctx.size(d) for d in dims) * (tp // copies)
    return ExpertParallel(
        fqns=tuple(sorted(ctx.ep_modules, key=order.__getitem__)), mesh_dim=spec.on, size=n,
        dispatch=spec.dispatch, replicas=("tp",) if tp > 1 else (), fsdp=fsdp is not None,
        hsdp=fsdp is not None and "dp_replicate" in dims and ctx.size("dp_replicate") > 1,
        gradient_divide_factor=max(divisor, 1) if fsdp is not None else 1, mixed_precision=policy, span=spec.span)
