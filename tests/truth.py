"""Ground truth for a plan on a model: apply it on gloo ranks and compare with one process.

    verdict = judge(pool, plan, "tiny-llama", world=4)      # Truth("exact" | "wrong" | "crash" | "n/a")

What is measured (DESIGN.md § Ground truth): the plan is compiled WITHOUT the compiler's
checks (`compile_plan(..., check=False)`, so a rejected plan is judged too), every
FSDP mixed-precision policy is dropped (fp32 throughout), and the Program is applied on
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

Verdicts:
- `exact`: every compared value within `RTOL` (1e-4) relative — `‖Δ‖ / max(‖ref‖, floor)`,
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
    "rank_case",
    "reference",
]

RTOL = 1e-4
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
                      *, graph: Any = None) -> Compiled:
    """Compile twice: once as `plan compile` would (the verdict), once without the checks."""
    from meshplan.dsl.errors import PlanRejected
    from meshplan.planner.compile import compile_plan

    target = graph if graph is not None else model
    try:
        compiled = compile_plan(plan, target, world, list(overrides))
        return Compiled(True, (), fp32(compiled.program))
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
    return Compiled(False, codes, fp32(unchecked.program))


def fp32(program: Program) -> Program:
    """The Program without mixed precision: the truth is measured in fp32 (the experts'
    own FSDP units, in the ExpertParallel step, included)."""
    from meshplan.planner.program import ExpertParallel, FullyShard

    steps = tuple(dataclasses.replace(s, mixed_precision=None) if isinstance(s, FullyShard | ExpertParallel)
                  else s for s in program.steps)
    return dataclasses.replace(program, steps=steps)


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


def reference(source: Any, seq_len: int = SEQ_LEN, context: Any = None) -> Reference:
    """One process, the whole global batch as micro-batches."""
    from meshplan.runtime import Topology, build_model, prepare
    from meshplan.runtime.weights.loading import canonical_name

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_model(source, seed=0)
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


def rank_case(program_json: str, source: Any, seq_len: int, ref: Reference) -> RankReport:
    """On every rank: build as `plan run` does, one step, compare with `ref`."""
    from meshplan.planner.program import Program
    from meshplan.runtime import Topology, build_applied

    program = Program.from_json(program_json)
    applied, _, _ = build_applied(program, source, seed=0)
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
    worst = _compare_grads(applied.model, program, ref)
    return RankReport(loss, norm, worst)


# --------------------------------------------------------------------------- the judge


@functools.cache
def _cached_reference(source: Any, seq_len: int, context: Any) -> Reference:
    return reference(source, seq_len, context)


def _last_line(error: BaseException) -> str:
    text = str(error).strip()
    failed = [line for line in text.splitlines() if line.strip() and not line.startswith((" ", "---"))]
    tail = failed[-1] if failed else text.splitlines()[-1] if text else type(error).__name__
    root = str(Path(__file__).resolve().parent.parent) + "/"
    return tail.replace(root, "")[:300]


def judge_program(pool: RankPool, program: Program, source: Any, *, seq_len: int = SEQ_LEN,
                  timeout: float = 120.0) -> Truth:
    """The verdict of one Program on `pool.world_size` ranks (the Program's world size)."""
    from meshplan.runtime.parallel.apply import context_split

    start = time.perf_counter()
    if program.world_size != pool.world_size:
        raise ValueError(f"a Program for {program.world_size} ranks on a pool of {pool.world_size}")
    context = context_split(program)
    try:
        ref = _cached_reference(source, seq_len, context)
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
        for value, expected, what in ((rep.loss, ref.loss, "loss"), (rep.norm, ref.norm, "gradient norm")):
            err = abs(value - expected) / max(abs(expected), 1e-30)
            worst = max(worst, (err, f"rank {rank}: {what} {value:.6g}, one process {expected:.6g}"))
        worst = max(worst, (rep.worst[0], f"rank {rank}: {rep.worst[1]}"))
    seconds = time.perf_counter() - start
    if worst[0] <= RTOL:
        return Truth("exact", f"worst relative error {worst[0]:.1e}", worst[0], seconds)
    return Truth("wrong", worst[1], worst[0], seconds)


def judge(pool: RankPool, plan: str | Path, model: Any, world: int, overrides: Iterable[str] = (),
          *, graph: Any = None, seq_len: int = SEQ_LEN) -> tuple[Compiled, Truth]:
    """Compile `plan` (verdict and unchecked Program) and measure the truth."""
    compiled = compile_for_truth(plan, model, world, overrides, graph=graph)
    if compiled.program is None:
        return compiled, Truth("n/a", compiled.reason, math.inf)
    return compiled, judge_program(pool, compiled.program, model, seq_len=seq_len)
