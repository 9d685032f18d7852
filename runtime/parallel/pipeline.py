"""Pipeline parallelism at run time: a Hugging Face decoder cut into stages, run by a
`torch.distributed.pipelining` schedule.

    model (meta) ──stage_module(model, layers, first, last)──▶ this stage's module, same FQNs
    stage modules ──PipelineStage(group = pp)──▶ schedule (gpipe, 1f1b, interleaved, ZB, ZBV)
    batch ──schedule.step──▶ microbatches flow stage to stage; loss on the last stage

What a stage holds (`stage_module`): the decoder layers of its slice, under their own
names (`model.layers.5` stays `model.layers.5`, in a ModuleDict, so weights, the plan's
other steps and checkpoints see the Hugging Face names), the rotary embedding on every
stage, the token embedding on the first stage, the final norm and the head on the last.
Its forward is the decoder's own loop (embed → rotary → layers → norm → head), with the
model's own modules; between stages travel the hidden states and the position ids (the
packed attention backends rebuild every mask from full-length position ids, so no mask
crosses a stage boundary).

The loss (`PipelineLoss`): each microbatch's summed cross-entropy over the targets of the
GLOBAL batch (counted on every rank before the step, all-reduced over the loss group),
times the FSDP gradient divisor; the schedule does not rescale (`scale_grads=False`). The
gradients are therefore those of the global token-weighted mean, as in one process,
however the batch is cut into microbatches and data-parallel ranks.

Which stages a rank holds is the Program's (`Pipeline.ranks`, dealt by the compiler's
`planner.passes.pipeline.stage_ranks`): looped schedules give pp rank r the stages r,
r + pp, r + 2·pp, …; the V-shaped ones exactly two, r and 2·pp − 1 − r.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from meshplan.planner.passes.pipeline import SINGLE
from meshplan.planner.program import FullyShard, Pipeline, Program, Step

from .mesh import submesh
from .stage import StageModule, _Decoder

__all__ = [
    "SCHEDULES",
    "PipelineError",
    "PipelineLoss",
    "Pipelined",
    "StageModule",
    "build_schedule",
    "cut",
    "pipeline_step",
    "stage_module",
    "stage_steps",
]

# The plan's schedule names -> torch's classes (torch.distributed.pipelining).
SCHEDULES = {
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved_1f1b": "ScheduleInterleaved1F1B",
    "interleaved_zero_bubble": "ScheduleInterleavedZeroBubble",
    "zbv": "ScheduleZBVZeroBubble",
}


class PipelineError(RuntimeError):
    """The model cannot be cut as the plan asks; the message says why."""


def check_decoder(model: nn.Module) -> None:
    """Refuse models whose forward is not embed → rotary → layers → norm → head."""
    inner = getattr(model, "model", None)
    missing = [name for name in ("embed_tokens", "layers", "norm", "rotary_emb")
               if inner is None or not hasattr(inner, name)]
    if missing or not hasattr(model, "lm_head"):
        what = ", ".join(f"model.{m}" for m in missing) or "lm_head"
        raise PipelineError(
            f"{type(model).__name__} cannot be cut into pipeline stages: it has no {what}; "
            "stages are built for decoder-only causal LMs laid out as model.embed_tokens, "
            "model.layers, model.norm, model.rotary_emb and lm_head")


def stage_module(model: nn.Module, layers: Sequence[int], *, first: bool, last: bool) -> StageModule:
    """This stage's module, sharing `model`'s submodules (nothing is copied)."""
    check_decoder(model)
    return StageModule(model, layers, first=first, last=last)


@dataclass
class PipelineLoss:
    """The last stage's loss function: `fn(output, target)` times `scale`. The training
    loop sets both (a microbatch's summed cross-entropy, scaled to the global mean)."""

    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    scale: float = 1.0

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.fn is None:
            raise PipelineError("the pipeline's loss function was not set before the step")
        return self.fn(output, target) * self.scale


def build_schedule(schedule: str, stages: Sequence[nn.Module], indices: Sequence[int], num_stages: int,
                   *, microbatches: int, group: dist.ProcessGroup, device: torch.device,
                   loss: PipelineLoss) -> Any:
    """torch's schedule over this rank's `stages` (global indices `indices`)."""
    from torch.distributed import pipelining

    made = [pipelining.PipelineStage(module, index, num_stages, device, group=group)
            for module, index in zip(stages, indices, strict=True)]
    cls = getattr(pipelining, SCHEDULES[schedule])
    if schedule in SINGLE:  # these take one stage, the others a list
        return cls(made[0], n_microbatches=microbatches, loss_fn=loss, scale_grads=False)
    return cls(made, n_microbatches=microbatches, loss_fn=loss, scale_grads=False)


def pipeline_step(program: Program) -> Pipeline | None:
    """The Program's pipeline step, if it cuts the model (pp > 1)."""
    return next((s for s in program.steps_of(Pipeline) if program.mesh.size(s.mesh_dim) > 1), None)


@dataclass
class Pipelined:
    """This rank's part of a pipeline: its stage modules and how they are scheduled."""

    step: Pipeline
    stages: list[StageModule]
    indices: tuple[int, ...]
    group: dist.ProcessGroup
    rank: int  # this rank's pp coordinate
    device: torch.device
    loss: PipelineLoss = field(default_factory=PipelineLoss)
    _schedule: Any = field(default=None, repr=False)

    @property
    def num_stages(self) -> int:
        return len(self.step.stages)

    @property
    def first(self) -> bool:
        """Does this rank hold the first stage (it feeds the tokens)?"""
        return 0 in self.indices

    @property
    def last(self) -> bool:
        """Does this rank hold the last stage (it computes the loss)?"""
        return self.num_stages - 1 in self.indices

    @property
    def last_rank(self) -> int:
        """The pp coordinate holding the last stage."""
        return next(r for r, held in enumerate(self.step.ranks) if self.num_stages - 1 in held)

    def schedule(self) -> Any:
        if self._schedule is None:
            self._schedule = build_schedule(self.step.schedule, self.stages, self.indices, self.num_stages,
                                            microbatches=self.step.microbatches, group=self.group,
                                            device=self.device, loss=self.loss)
        return self._schedule


def cut(step: Pipeline, model: nn.Module, mesh: Any, device: torch.device) -> Pipelined:
    """Cut `model` into this rank's stage modules (they share its submodules)."""
    pp_mesh = submesh(mesh, (step.mesh_dim,))
    rank = pp_mesh.get_local_rank()
    indices = step.ranks[rank]
    last = len(step.stages) - 1
    stages = [stage_module(model, step.stages[i], first=i == 0, last=i == last) for i in indices]
    return Pipelined(step, stages, tuple(indices), pp_mesh.get_group(), rank, device)


def stage_steps(program: Program, stage: nn.Module) -> list[Step]:
    """The Program's other steps as they apply to one stage module: each restricted to
    the modules the stage holds, the root FSDP unit wrapping the stage itself."""
    present = {name for name, _ in stage.named_modules()}
    out: list[Step] = []
    for step in program.steps:
        if isinstance(step, Pipeline):
            continue
        if isinstance(step, FullyShard) and not step.fqns:
            out.append(step)  # the root: the stage module is what the schedule calls
            continue
        kept = step.renamed(lambda fqn: fqn if fqn in present else None)
        if kept is not None:
            out.append(kept)
    return out


def holder(stages: Sequence[StageModule]) -> nn.Module:
    """One module with this rank's parameters under their Hugging Face names (what
    loading, checkpoints and the optimizer see): the stage itself when there is one."""
    if len(stages) == 1:
        return stages[0]
    out = nn.Module()
    decoder = _Decoder()
    decoder.layers = nn.ModuleDict({k: v for s in stages for k, v in s.model.layers.items()})
    out.model = decoder
    for stage in stages:
        for name in ("embed_tokens", "norm"):
            if hasattr(stage.model, name):
                out.model.register_module(name, getattr(stage.model, name))
        if hasattr(stage, "lm_head"):
            out.lm_head = stage.lm_head
    out.model.rotary_emb = stages[0].model.rotary_emb
    out.config = stages[0].config
    return out


def apply_pipelined(program: Program, step: Pipeline, model: nn.Module, mesh: Any, device: torch.device,
                    apply_steps: Callable[[Sequence[Step], nn.Module], None]) -> tuple[nn.Module, Pipelined]:
    """Cut `model`, apply the other steps to each stage; returns the holder and the cut."""
    pipelined = cut(step, model, mesh, device)
    for stage in pipelined.stages:
        apply_steps(stage_steps(program, stage), stage)
    return holder(pipelined.stages), pipelined
