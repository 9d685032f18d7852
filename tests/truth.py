"""Ground truth for a plan on a model: apply it on gloo ranks and compare with one process.

    verdict = judge(pool, plan, "tiny-llama", world=4)      # Truth("exact" | "wrong" | "crash" | "n/a")

What is measured (DESIGN.md § Ground truth): the plan is compiled WITHOUT the compiler's
checks (`compile_plan(..., check=False)`, so a rejected plan is judged too), every
FSDP mixed-precision policy is dropped (fp32 throughout: adapters in their base's dtype,
a 4-bit base dequantised to fp32; `precision=True` keeps the plan's dtypes, for the
mistakes that are about them), and the Program is applied on
`world` ranks through the runtime's own building path (`build_applied`: meta model,
meshplan's packed attention, `apply`, local shards, layout-independent random weights)
and its own step (`train_step`, with an optimizer that does not step): one forward and
backward over a fixed global batch of packed bins, dealt to data-parallel ranks by the
runtime's loader (cut per context-parallel rank when the plan splits sequences). One
process runs the same step on the same model with the whole global batch.

Compared, on EVERY rank: the loss (the global token-weighted mean the step reports), the
gradient norm, and every parameter's gradient — a plain gradient whole (a replicated
plain parameter can be right on rank 0 and wrong on rank 1), a DTensor gradient (TP,
FSDP, both) by its local shard against the matching slice of the single-process
gradient (pending partial sums reduced first; fused rows mapped back to the packed
order). A tied parameter that the plan unties is compared under each of its names with
the tied gradient, so an untied copy with half the gradient is wrong.

Adapters (a Program with an `Adapters` step): the step the truth applies is the plan as
written, every module its `targets` patterns match (the compiler leaves out the ones it
refuses, which would measure another plan), with dropout off (the ranks would draw other
masks than one process). The one process applies the same step (`install_adapters` on
its meta model, as the runtime's build does) before its weights exist. PEFT starts
lora_B at zero, which gives lora_A no gradient at the first step and would hide a wrong
lora_A layout: both sides give every adapter matrix seeded, layout-independent nonzero
values (`seed_adapters`: the runtime's `init_random`, the matrix PEFT zeroes drawn
normal instead). Frozen base parameters have no gradient on either side; a gradient on
one side only is wrong. A plan measured with its own adapter dropout (`dropout=True`)
has no one-process match (other masks): there the copies of every replicated gradient
must agree instead (`judge_program(replicas=True)`).

Verdicts:
- `exact`: every compared value within `RTOL` (1e-4) relative (for a Program measured
  in its own dtypes, one unit in the last place of its lowest dtype: `precision_rtol`) — `‖Δ‖ / max(‖ref‖, floor)`,
  where the floor (`FLOOR` × the gradient's RMS tensor norm) keeps gradients that are
  zero in exact arithmetic (a key bias under softmax) from turning fp32 noise into
  an error;
- `wrong`: the worst value and its relative error (and the rank that saw it);
- `crash`: an exception (or a hang) on some rank — the last line of its traceback;
- `n/a`: no Program could be built to apply (a language error, a mesh that does not
  fit the world): nothing runs, which is what the compiler's rejection means there.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from tests.distributed import RankError, RankPool

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from meshplan.planner.program import Program

__all__ = [
    "RTOL",
    "Compiled",
    "Reference",
    "Truth",
    "compile_for_truth",
    "judge",
    "judge_program",
    "measured",
    "precision_rtol",
    "rank_case",
    "reference",
    "seed_adapters",
]

RTOL = 1e-4
# One unit in the last place (relative) of the dtypes a Program may compute in: the
# tolerance of a Program measured in its own dtypes (`precision_rtol`).
ULP = {"bf16": 2.0 ** -7, "fp16": 2.0 ** -10}
FLOOR = 1e-3
SEQ_LEN = 32  # tokens per packed bin (the plan's `seq_len` is overridden to match)
BINS = 4  # bins in the global batch: one per data-parallel rank at dp 4

Kind = Literal["exact", "wrong", "crash", "n/a"]


@dataclass(frozen=True)
class Truth:
    """A measured verdict; `detail` names the worst tensor or the exception."""

    truth: Kind
    detail: str = ""
    error: float = 0.0  # the worst relative error (inf for a crash)
    seconds: float = 0.0

    def __str__(self) -> str:
        return f"{self.truth}: {self.detail}" if self.detail else self.truth


@dataclass(frozen=True)
class Compiled:
    """What the compiler said, and the Program built without its checks (None: none)."""

    accepted: bool
    codes: tuple[str, ...]  # the error codes, in the order reported
    program: Program | None
    reason: str = ""  # why there is no Program

    @property
    def verdict(self) -> str:
        return "accept" if self.accepted else "reject " + ",".join(dict.fromkeys(self.codes))


def compile_for_truth(plan: str | Path, model: Any, world: int, overrides: Iterable[str] = (),
                      *, graph: Any = None, precision: bool = False, dropout: bool = False,
                      net: bool = False) -> Compiled:
    """Compile twice: once as `plan compile` would (the verdict), once without the checks.
    The Program is `measured`'s (fp32 unless `precision`, adapter dropout off unless `dropout`).
    `net`: the verdict includes `plan compile`'s dry-run net (each block kind run once
    under the Program's layouts on a fake process group)."""
    from meshplan.dsl.errors import PlanRejected
    from meshplan.planner.compile import compile_plan

    target = graph if graph is not None else model
    try:
        compiled = compile_plan(plan, target, world, list(overrides))
        program = measured(compiled.program, plan, overrides, compiled.graph, precision, dropout)
        if net:
            from meshplan.runtime.explain.net import check_runs

            failed = check_runs(compiled)
            if failed:
                return Compiled(False, tuple(e.code for e in failed), program)
        return Compiled(True, (), program)
    except PlanRejected as rejected:
        codes = tuple(d.code for d in rejected.errors)
    except Exception as e:  # the compiler itself failed: no verdict, nothing to apply
        return Compiled(False, ("crash",), None, f"the compiler raised {type(e).__name__}: {e}")
    try:
        unchecked = compile_plan(plan, target, world, list(overrides), check=False)
    except PlanRejected as again:
        first = again.errors[0] if again.errors else None
        return Compiled(False, codes, None, f"{first.code}: {first.message}" if first else "rejected")
    except Exception as e:  # lowering a plan the passes could not make sense of
        return Compiled(False, codes, None, f"cannot lower: {type(e).__name__}: {e}")
    return Compiled(False, codes, measured(unchecked.program, plan, overrides, unchecked.graph, precision,
                                           dropout))


def measured(program: Program, plan: str | Path, overrides: Iterable[str], graph: Any,
             precision: bool = False, dropout: bool = False) -> Program:
    """The Program the truth applies: the adapters as the plan writes them (`as_written`),
    dropout off unless `dropout`, and fp32 throughout unless `precision`."""
    program = as_written(program, plan, overrides, graph, keep_dropout=dropout)
    return program if precision else fp32(program)


def fp32(program: Program) -> Program:
    """The Program without mixed precision: the truth is measured in fp32 (the experts'
    own FSDP units, in the ExpertParallel step, included; adapters in their base's dtype,
    a 4-bit base dequantised to fp32)."""
    from meshplan.planner.program import Adapters, ExpertParallel, FullyShard

    def plain(step: Any) -> Any:
        if isinstance(step, FullyShard | ExpertParallel):
            return dataclasses.replace(step, mixed_precision=None)
        if isinstance(step, Adapters):
            quantize = step.quantize and dataclasses.replace(step.quantize, compute="fp32")
            return dataclasses.replace(step, dtype=None, quantize=quantize)
        return step

    return dataclasses.replace(program, steps=tuple(plain(s) for s in program.steps))


def as_written(program: Program, plan: str | Path, overrides: Iterable[str], graph: Any, *,
               keep_dropout: bool = False) -> Program:
    """The Program with the Adapters step the plan's `adapters` section writes: every module
    a `targets` pattern matches, in model order (the compiler lowers only the targets it
    accepts), and dropout 0 (masks drawn on each rank are not one process's) unless
    `keep_dropout`."""
    from meshplan.dsl import load
    from meshplan.dsl.patterns import select
    from meshplan.planner.program import Adapters, Quantize

    spec, _ = load(plan, list(overrides))
    section = spec.adapters
    if section is None:
        return program
    fqns = graph.fqns()
    matched = {f for pattern in section.targets for f in select(pattern.text, fqns)}
    targets = tuple(f for f in fqns if f in matched)
    steps = list(program.steps)
    at = next((i for i, s in enumerate(steps) if isinstance(s, Adapters)), None)
    if not targets:
        return dataclasses.replace(program, steps=tuple(s for s in steps if not isinstance(s, Adapters)))
    if at is not None:
        old = steps[at]
        assert isinstance(old, Adapters)
        steps[at] = dataclasses.replace(old, fqns=targets, dropout=old.dropout if keep_dropout else 0.0)
    else:  # every target refused: the step goes first (after a pipeline cut), as lowering puts it
        q = section.quantize
        quantize = Quantize(format=q.format, backend=q.backend, compute=q.compute, storage=q.storage,
                            block_size=q.block_size, scaler_block_size=q.scaler_block_size) if q else None
        step = Adapters(fqns=targets, method=section.method, rank=section.rank, alpha=section.alpha,
                        dropout=section.dropout if keep_dropout else 0.0, dtype=section.dtype,
                        quantize=quantize, span=section.span)
        first = 1 if steps and steps[0].kind == "pipeline" else 0
        steps.insert(first, step)
    return dataclasses.replace(program, steps=tuple(steps))


def precision_rtol(program: Program) -> float:
    """The tolerance for `program` measured in its own dtypes (`precision=True`): one unit
    in the last place of the lowest float dtype it computes in (FSDP's `param` dtype, the
    adapters' dtype, a 4-bit base's compute dtype); `RTOL` when all are fp32. Rounding in
    that dtype (other summation orders on the ranks) stays below it; a wrong layout or a
    gradient lost is of order 1."""
    from meshplan.planner.program import Adapters, ExpertParallel, FullyShard

    dtypes: set[str] = set()
    for step in program.steps:
        if isinstance(step, FullyShard | ExpertParallel) and step.mixed_precision is not None:
            dtypes.add(str(step.mixed_precision.param))
        if isinstance(step, Adapters):
            dtypes.add(str(step.dtype))
            if step.quantize is not None:
                dtypes.add(step.quantize.compute)
    return max([RTOL, *(ULP[d] for d in dtypes if d in ULP)])


def adapters_of(program: Program) -> Any:
    """The Program's Adapters step, None without one."""
    from meshplan.planner.program import Adapters

    return next((s for s in program.steps if isinstance(s, Adapters)), None)


def seed_adapters(model: Any, seed: int = 0) -> None:
    """Seeded, layout-independent values for every weight (the runtime's `init_random`),
    with the adapter matrix PEFT starts at zero (lora_B on a Linear, lora_embedding_A on
    an Embedding) drawn normal(0, initializer_range) instead, so that its partner gets a
    gradient at the first step. The same values on every layout and in one process."""
    from meshplan.runtime.parallel.adapters import adapter_side
    from meshplan.runtime.weights.loading import init_random, init_rule

    def rule(name: str, module: torch.nn.Module, tensor: torch.Tensor, std: float) -> tuple[Any, float]:
        kind, scale = init_rule(name, module, tensor, std)
        if adapter_side(name) is not None and kind == "zeros":
            return "normal", std
        return kind, scale

    init_random(model, seed, rule=rule)


# --------------------------------------------------------------------------- both sides


class NoStep(torch.optim.Optimizer):
    """An optimizer that neither steps nor clears gradients: `train_step` runs as in
    training, and the gradients it produced stay on the parameters to be compared."""

    def __init__(self, params: Iterable[torch.Tensor]) -> None:
        super().__init__(list(params), {})

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None


def _data(source: Any, seq_len: int, context: Any) -> Any:
    from meshplan.planner.models import resolve_model
    from meshplan.runtime.train.data import PackedData, synthetic_sequences

    vocab = int(resolve_model(source).config.vocab_size)
    sequences = synthetic_sequences(4 * BINS, min(vocab, 256), min_len=4, max_len=seq_len, seed=1)
    return PackedData.build(sequences, seq_len, context=context)


def _step(model: torch.nn.Module, micro_batches: Sequence[Any], topology: Any) -> tuple[float, float]:
    from meshplan.runtime import train_step

    params = [p for p in model.parameters() if p.requires_grad]
    stats = train_step(model, NoStep(params), micro_batches, topology, max_grad_norm=None)
    return stats.loss, stats.grad_norm


@dataclass(frozen=True)
class Reference:
    """The single process's loss, gradient norm and gradients (every name of a tied one)."""

    loss: float
    norm: float
    grads: dict[str, torch.Tensor]
    floor: float


def reference(source: Any, seq_len: int = SEQ_LEN, context: Any = None, adapters: Any = None) -> Reference:
    """One process, the whole global batch as micro-batches; with the Program's
    `Adapters` step, the same adapters (and quantized bases) on the one-process model."""
    from meshplan.runtime import Topology, build_model, prepare
    from meshplan.runtime.weights.loading import canonical_name

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if adapters is None:
            model = build_model(source, seed=0)
        else:  # as build_applied: adapters on the meta model, then the weights (seeded adapters too)
            from meshplan.runtime.parallel.adapters import install_adapters
            from meshplan.runtime.train.build import _source, load_weights
            from meshplan.runtime.weights.loading import materialize, meta_model

            src = _source(source)
            model = meta_model(src)
            install_adapters(model, adapters)
            materialize(model, "cpu")
            load_weights(model, src, seed=0)
            seed_adapters(model, 0)  # as every rank does: lora_B nonzero
        prepare(model)
        batches = next(iter(_data(source, seq_len, context).loader(0, 1, micro_batch=BINS)))
        loss, norm = _step(model, batches, Topology())
    finally:
        torch.set_num_threads(threads)
    grads: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.grad is not None:
            grads[canonical_name(name)] = p.grad.detach().clone()
    norms = [float(g.norm()) for g in {id(g): g for g in grads.values()}.values()]
    rms = math.sqrt(sum(n * n for n in norms) / max(len(norms), 1))
    return Reference(loss, norm, grads, FLOOR * rms)


@dataclass(frozen=True)
class RankReport:
    loss: float
    norm: float
    worst: tuple[float, str]  # (relative error, what)


def _relative(diff: float, ref: float, floor: float) -> float:
    return diff / max(ref, floor, 1e-30)


def _compare_grads(module: torch.nn.Module, program: Program, ref: Reference) -> tuple[float, str]:
    from torch.distributed.tensor import DTensor, Partial, Replicate

    from meshplan.runtime.weights.loading import fused_rows, global_indices, weight_entries

    worst: tuple[float, str] = (0.0, "")
    for entry in weight_entries(module, fused_rows(module, program)):
        expected_full = next((ref.grads[n] for n in entry.aliases if n in ref.grads), None)
        grad = entry.tensor.grad
        if expected_full is None:
            if grad is not None and float(grad.norm() if not isinstance(grad, DTensor)
                                          else grad.to_local().norm()) > 0:
                worst = max(worst, (math.inf, f"{entry.name}: a gradient where one process has none"))
            continue
        if grad is None:
            err = _relative(float(expected_full.norm()), float(expected_full.norm()), ref.floor)
            worst = max(worst, (err if err > 0 else 0.0, f"{entry.name}: no gradient"))
            continue
        if isinstance(grad, DTensor):
            if any(isinstance(p, Partial) for p in grad.placements):  # pending sums: do them
                grad = grad.redistribute(placements=[Replicate() if isinstance(p, Partial) else p
                                                     for p in grad.placements])
            idx = list(global_indices(grad))
            local = grad.to_local()
        else:
            idx = [torch.arange(n) for n in grad.shape]
            local = grad
        if tuple(grad.shape) != tuple(expected_full.shape):
            worst = max(worst, (math.inf, f"{entry.name}: gradient of shape {list(grad.shape)}, "
                                          f"one process has {list(expected_full.shape)}"))
            continue
        if entry.fused is not None:
            d = entry.fused.dim
            idx[d] = entry.fused.order(grad.shape[d])[idx[d]]
        expected = expected_full
        for d, i in enumerate(idx):
            expected = expected.index_select(d, i)
        diff = float((local.detach().float().cpu() - expected.float()).norm())
        err = _relative(diff, float(expected.norm()), ref.floor)
        worst = max(worst, (err, f"{entry.name} (relative error {err:.2g})"))
    return worst


def _replica_spread(module: torch.nn.Module) -> tuple[float, str]:
    """The worst relative difference between the copies of a replicated gradient: every
    DTensor gradient (pending sums done) all-gathered over each mesh dimension it is
    replicated on. A collective: every rank walks the same parameters in the same order."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Partial, Replicate

    from meshplan.runtime.weights.loading import canonical_name

    worst: tuple[float, str] = (0.0, "")
    for name, p in module.named_parameters():
        grad = p.grad
        if not isinstance(grad, DTensor):
            continue
        if any(isinstance(pl, Partial) for pl in grad.placements):
            grad = grad.redistribute(placements=[Replicate() if isinstance(pl, Partial) else pl
                                                 for pl in grad.placements])
        local = grad.to_local().detach().float().contiguous()
        mesh = grad.device_mesh
        for dim, placement in enumerate(grad.placements):
            if not isinstance(placement, Replicate) or mesh.size(dim) == 1:
                continue
            copies = [torch.empty_like(local) for _ in range(mesh.size(dim))]
            dist.all_gather(copies, local, group=mesh.get_group(dim))
            err = _relative(max(float((c - copies[0]).norm()) for c in copies), float(copies[0].norm()), 0.0)
            axis = mesh.mesh_dim_names[dim] if mesh.mesh_dim_names else str(dim)
            worst = max(worst, (err, f"{canonical_name(name)}: its copies over `{axis}` differ "
                                     f"(relative {err:.2g})"))
    return worst


def rank_case(program_json: str, source: Any, seq_len: int, ref: Reference | None) -> RankReport:
    """On every rank: build as `plan run` does, one step, compare with `ref`; without one
    (the plan's own dropout), compare the copies of each replicated gradient instead."""
    from meshplan.planner.program import Program
    from meshplan.runtime import Topology, build_applied

    program = Program.from_json(program_json)
    if ref is None:
        # Each process torchrun starts draws its own initial seed (torch.initial_seed()
        # differs per process), so `plan run`'s ranks draw their own dropout masks; the
        # pool's ranks are forks of one process and would share one: each gets its own.
        import torch.distributed as dist

        torch.manual_seed(1_000_003 * (dist.get_rank() + 1))
    applied, _, _ = build_applied(program, source, seed=0)
    if adapters_of(program) is not None:
        seed_adapters(applied, 0)
    topology = Topology.of(applied)
    data = _data(source, seq_len, topology.context)
    micro = max(BINS // topology.dp_size, 1)
    loader = data.loader(topology.dp_rank, topology.dp_size, micro_batch=micro,
                         cp_rank=topology.cp_rank if topology.context else None)
    if applied.pipeline is not None:  # the schedule runs forward and backward
        from meshplan.runtime.train.loop import pipeline_train_step

        params = [p for p in applied.model.parameters() if p.requires_grad]
        stats = pipeline_train_step(applied, NoStep(params), next(iter(loader)), topology)
        loss, norm = stats.loss, stats.grad_norm
    else:
        loss, norm = _step(applied.model, next(iter(loader)), topology)
    worst = _compare_grads(applied.model, program, ref) if ref is not None else _replica_spread(applied.model)
    return RankReport(loss, norm, worst)


# --------------------------------------------------------------------------- the judge


@functools.cache
def _cached_reference(source: Any, seq_len: int, context: Any, adapters: Any = None) -> Reference:
    return reference(source, seq_len, context, adapters)


def _last_line(error: BaseException) -> str:
    text = str(error).strip()
    failed = [line for line in text.splitlines() if line.strip() and not line.startswith((" ", "---"))]
    tail = failed[-1] if failed else text.splitlines()[-1] if text else type(error).__name__
    root = str(Path(__file__).resolve().parent.parent) + "/"
    return tail.replace(root, "")[:300]


def judge_program(pool: RankPool, program: Program, source: Any, *, seq_len: int = SEQ_LEN,
                  timeout: float = 120.0, rtol: float = RTOL, replicas: bool = False) -> Truth:
    """The verdict of one Program on `pool.world_size` ranks (the Program's world size);
    `rtol`: `precision_rtol` for a Program measured in its own dtypes. `replicas`: a
    Program with its adapters' dropout, which no one process can match (other masks): the
    copies of every replicated gradient must agree instead (each rank drawing its own
    mask on a replicated input makes them differ, and the replicated adapter diverge)."""
    from meshplan.runtime.parallel.apply import context_split

    start = time.perf_counter()
    if program.world_size != pool.world_size:
        raise ValueError(f"a Program for {program.world_size} ranks on a pool of {pool.world_size}")
    from meshplan.planner.program import Adapters

    context = context_split(program)
    adapters = next(iter(program.steps_of(Adapters)), None)
    try:
        ref = None if replicas else _cached_reference(source, seq_len, context, adapters)
    except Exception as e:
        return Truth("n/a", f"one process fails: {type(e).__name__}: {str(e)[:200]}", math.inf,
                     time.perf_counter() - start)
    try:
        reports: list[RankReport] = pool.run(rank_case, program.to_json(), source, seq_len, ref,
                                             timeout=timeout)
    except RankError as e:
        return Truth("crash", _last_line(e), math.inf, time.perf_counter() - start)
    worst: tuple[float, str] = (0.0, "")
    for rank, rep in enumerate(reports):
        for value, expected, what in ((rep.loss, ref.loss, "loss"), (rep.norm, ref.norm, "gradient norm")) \
                if ref is not None else ():
            err = abs(value - expected) / max(abs(expected), 1e-30)
            worst = max(worst, (err, f"rank {rank}: {what} {value:.6g}, one process {expected:.6g}"))
        worst = max(worst, (rep.worst[0], f"rank {rank}: {rep.worst[1]}"))
    seconds = time.perf_counter() - start
    if worst[0] <= rtol:
        within = f" (within {rtol:.1e}: one unit in the last place of the plan's lowest dtype)" if rtol > RTOL else ""
        what = "the copies of every replicated gradient agree: worst" if replicas else "worst"
        return Truth("exact", f"{what} relative error {worst[0]:.1e}{within}", worst[0], seconds)
    return Truth("wrong", worst[1], worst[0], seconds)


def judge(pool: RankPool, plan: str | Path, model: Any, world: int, overrides: Iterable[str] = (),
          *, graph: Any = None, seq_len: int = SEQ_LEN, precision: bool = False) -> tuple[Compiled, Truth]:
    """Compile `plan` (verdict and unchecked Program) and measure the truth."""
    compiled = compile_for_truth(plan, model, world, overrides, graph=graph, precision=precision)
    if compiled.program is None:
        return compiled, Truth("n/a", compiled.reason, math.inf)
    return compiled, judge_program(pool, compiled.program, model, seq_len=seq_len)
