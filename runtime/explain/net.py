"""The compiler's dry-run net: run the model once under the Program's real layouts.

The planner's passes judge a plan from the traced graph and the style contracts; what
they do not model (a reshape by a head count read from the config, an op with no rule
that happens to run, a style the module's code cannot take) shows only when the model
runs. `plan compile` therefore runs each traced block kind once, as the runtime builds
it: the reduced Program (`reduction`: one block per distinct kind and steps) applied by
the runtime's own `apply` over a fake process group (`world`), the model's parameters
and activations fake tensors at their local shapes, one forward and backward
(`trace.trace_step`, the same step `plan explain` measures). Nothing is allocated and
nothing communicates.

Block kinds already verified (the same model config, reduced Program and sequence
length ran before on this machine) are not run again (`VERIFIED`).

Any exception on the way is the model not fitting the plan, never a compiler bug: it
becomes one error (E601) on the plan line whose step touched the module that raised,
with the model's source line as a related location (`failure`, shared with
`plan explain`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from meshplan.dsl.errors import PlanError, Span

from .diagnostics import dry_run_error
from .failure import TraceFailure

if TYPE_CHECKING:
    from meshplan.planner import Compiled
    from meshplan.planner.program import Program

__all__ = ["DEFAULT_SEQ_LEN", "check_runs", "failing_module", "model_line", "not_fitting", "not_fitting_at_run"]

# Without a declared sequence length: a short one (a multiple of what sequence and context
# parallelism cut it into is taken). Fake tensors cost the same at any length.
DEFAULT_SEQ_LEN = 16


def not_fitting(error: PlanError) -> PlanError:
    """`error` (E601) worded as what it means to the user: the model does not fit the plan."""
    return PlanError(error.span, error.code, f"this model does not fit the plan: {error.message}",
                     hint=error.hint, related=error.related, severity=error.severity)


def check_runs(compiled: Compiled, *, seq_len: int | None = None) -> list[PlanError]:
    """The dry-run net (see the module docstring): [] when one training step of every block
    kind runs under the Program, else the error naming the plan line and the model line.

    Only the tensor-parallel steps change what the model's code sees (FSDP and
    checkpointing keep every local shape), so a Program without them, or a model that
    cannot be rebuilt from a transformers config, has nothing to run. Inside a process
    that already has a process group (`plan run` under torchrun) it does not run either:
    there the first step's failure is mapped the same way (`not_fitting_at_run`)."""
    import torch.distributed as dist

    from meshplan.planner.program import Parallelize

    program, graph = compiled.program, compiled.graph
    source = graph.source
    if not program.steps_of(Parallelize) or source.config is None or source.model_class is None:
        return []
    if dist.is_initialized():  # the fake world needs a process without a process group
        return []
    from .reduction import reduce_program

    length = _length(compiled, seq_len)
    reduction = reduce_program(program, graph)
    key = _verified_key(compiled, reduction.program.to_json(), length)
    if key is not None and (VERIFIED / key).exists():
        return []  # these block kinds ran under these steps before: nothing new to learn
    try:
        _one_step(compiled, length)
    except TraceFailure as failure:
        return [not_fitting(dry_run_error(program, failure))]
    _remember(key)
    return []


# Block kinds already verified: one empty file per (model config, reduced Program, sequence
# length, torch and transformers versions). The step is deterministic in these, so a kind
# that ran once runs again; only successes are remembered, a failure is always re-run.
VERIFIED = Path(os.environ.get("MESHPLAN_CACHE", Path.home() / ".cache" / "meshplan")) / "verified"


def _verified_key(compiled: Compiled, reduced: str, seq_len: int) -> str | None:
    import torch
    import transformers

    config = compiled.graph.source.config
    try:
        text = config.to_json_string(use_diff=False)
    except (TypeError, ValueError):  # a config that does not serialise: always run
        return None
    blob = json.dumps([text, reduced, seq_len, torch.__version__, transformers.__version__,
                       type(config).__module__])
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _remember(key: str | None) -> None:
    if key is None:
        return
    try:
        VERIFIED.mkdir(parents=True, exist_ok=True)
        (VERIFIED / key).touch()
    except OSError:  # a read-only home: the net simply runs every time
        pass


def _length(compiled: Compiled, seq_len: int | None) -> int:
    from meshplan.planner.mesh_facts import program_sequence_multiple

    multiple = program_sequence_multiple(compiled.program)
    if seq_len is not None and seq_len % multiple == 0:
        return seq_len
    return multiple * max(1, -(-DEFAULT_SEQ_LEN // multiple))


def _one_step(compiled: Compiled, seq_len: int) -> None:
    """One forward and backward of the reduced model as rank 0 on meta tensors (on fake
    ones where the step cannot run on meta: `trace.meta_first`), with the Program's
    tensor-parallel steps applied; raises `TraceFailure` where the model fails.
    (`trace.trace_step` runs the same step twice to measure memory and traffic too.)"""
    import torch

    from meshplan.planner.program import ContextParallel, FullyShard, Parallelize

    from ..parallel.apply import DTYPES
    from .comm import compute_dtype
    from .failure import apply_each
    from .reduction import reduce_program
    from .trace import _fake_model, meta_first, run_step, step_tensors
    from .world import fake_world

    program, graph = compiled.program, compiled.graph
    cp_steps = program.steps_of(ContextParallel)
    local = max(1, seq_len // (program.mesh.size(cp_steps[0].mesh_dim) if cp_steps else 1))
    reduction = reduce_program(program, graph)  # deterministic: the same as `check_runs`'
    fsdp = next(iter(program.steps_of(FullyShard)), None)

    def step(meta: bool) -> None:
        with fake_world(program.mesh, 0) as mesh, step_tensors(meta=meta):
            # The dtype the step computes in (FSDP's mixed precision): what the model's
            # kernels see on the ranks.
            model = _fake_model(graph.source, reduction, DTYPES[compute_dtype(fsdp, "fp32")])
            apply_each(reduction.program, reduction.program.steps_of(Parallelize), model, mesh, reduction)
            ids = torch.zeros(1, local, dtype=torch.long)
            run_step(model, reduction, ids, torch.arange(local).expand(1, local))

    meta_first(step)


def model_line(error: PlanError) -> Span | None:
    """The model source line an error of the net names (its related location), if any."""
    return next((span for span, _ in error.related), None)


def failing_module(error: BaseException, model: nn.Module) -> str:
    """The innermost module of `model` whose forward was running when `error` was raised
    (full name, wrappers removed; '' when no module's frame is in the traceback)."""
    from .world import clean_name

    names = {id(m): clean_name(n) for n, m in model.named_modules()}
    found = ""
    tb = error.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if owner is not None and id(owner) in names and isinstance(owner, nn.Module):
            found = names[id(owner)]
        tb = tb.tb_next
    return found


def not_fitting_at_run(error: BaseException, model: nn.Module, program: Program) -> str | None:
    """What `plan run` says when the model's own code raised under the applied Program —
    the user's plan does not fit the model, not an internal error: the plan line of the
    step touching the failing module and the model's source line. None when no frame of
    the traceback is in the model's source (not the model's failure)."""
    from .failure import model_files, model_frame, touching_step

    source = model_frame(error.__traceback__, model_files(model))
    if source is None:
        return None
    module = failing_module(error, model)
    step = touching_step(program, module) if module else None
    span = step.span if step is not None and step.span.line >= 1 else None
    where = f"{span.file}:{span.line}:{span.column}: " if span is not None else ""
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    what = f"{type(error).__name__}: {first}" if first else type(error).__name__
    return (f"{where}error: this model does not fit the plan: `{module or 'the model'}` failed at {source} "
            f"(`{source.text}`): {what}")
