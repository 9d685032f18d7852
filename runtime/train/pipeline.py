"""One training step through a pipeline schedule, with the loss one process would compute.

`pipeline_backward` is the forward and backward of `loop.pipeline_train_step`, the
`loop.train_step` of an Applied model whose Program cuts it into stages
(`runtime.parallel.pipeline`):

- the micro-batches of one step are one batch for the schedule, which cuts it into the
  plan's `microbatches` (the batch must divide by them);
- the targets of the global batch are counted on every rank (pipeline ranks read the
  same data) and summed over the loss group, before the step; the last stage's loss for
  each microbatch is its summed cross-entropy times `grad_divisor / targets`, so the
  gradients are those of the global token-weighted mean, as in one process;
- the step's loss is reported on every rank (sent from the rank holding the last stage),
  and the gradient norm covers every stage (summed over the pipeline ranks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from ..parallel.apply import Applied
from ..parallel.pipeline import PipelineError
from .loss import IGNORE_INDEX, loss_sum_and_count, vocab_parallel
from .topology import Topology

__all__ = ["pipeline_backward", "pipeline_batch", "stages_norm"]

Batch = dict[str, Any]


def _total(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    total, _ = loss_sum_and_count(logits, labels)
    return total


def pipeline_batch(micro_batches: Sequence[Batch], microbatches: int) -> tuple[torch.Tensor, ...]:
    """(input_ids, position_ids, labels) of one step, checked against the schedule."""
    for b in micro_batches:
        if "position_ids" not in b:
            raise PipelineError("pipelined batches need position_ids (the varlen packing format): the "
                                "stages rebuild every attention mask from them")
    ids = torch.cat([b["input_ids"] for b in micro_batches])
    positions = torch.cat([b["position_ids"].expand_as(b["input_ids"]) for b in micro_batches])
    labels = torch.cat([b["labels"] for b in micro_batches])
    if ids.shape[0] % microbatches:
        raise PipelineError(f"a step's batch of {ids.shape[0]} sequences cannot be cut into "
                            f"{microbatches} microbatches: make the per-rank batch a multiple of them")
    return ids, positions, labels


def pipeline_backward(applied: Applied, micro_batches: Sequence[Batch], topology: Topology,
                      device: torch.device | None = None) -> tuple[float, int, int]:
    """Forward and backward of one step through the schedule; returns the global loss
    (on every rank), the global target count and the global token count."""
    pipe = applied.pipeline
    if pipe is None:
        raise PipelineError("this model is not cut into pipeline stages")
    device = device or pipe.device
    ids, positions, labels = (t.to(device) for t in pipeline_batch(micro_batches, pipe.step.microbatches))
    counts = torch.tensor([int((labels != IGNORE_INDEX).sum()),
                           sum(int(b.get("num_tokens", b["input_ids"].numel())) for b in micro_batches)],
                          dtype=torch.float64, device=device)
    if topology.loss_group is not None:
        dist.all_reduce(counts, group=topology.loss_group)
    targets, tokens = int(counts[0]), int(counts[1])
    pipe.loss.fn = _total
    pipe.loss.scale = topology.grad_divisor / max(targets, 1)
    for stage in pipe.stages:
        stage.train()
    losses: list[torch.Tensor] = []
    args = (ids, positions) if pipe.first else ()
    kwargs: dict[str, Any] = {"target": labels, "losses": losses} if pipe.last else {}
    # Vocabulary-parallel logits: the loss and its backward both run inside the schedule.
    with vocab_parallel() if topology.vocab_parallel else contextlib.nullcontext():
        pipe.schedule().step(*args, **kwargs)
    # The schedule's losses carry the scale: the report undoes it. Only the rank of the
    # last stage adds anything; the sum over pp gives every rank the loss.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    if pipe.last:
        loss_sum += sum(float(x.detach()) for x in losses) / pipe.loss.scale
    dist.all_reduce(loss_sum, group=pipe.group)
    if topology.loss_group is not None:
        dist.all_reduce(loss_sum, group=topology.loss_group)
    return float(loss_sum) / max(targets, 1), targets, tokens


def stages_norm(applied: Applied, local: torch.Tensor) -> torch.Tensor:
    """The whole model's gradient norm from this rank's stages' norm: summed over pp."""
    pipe = applied.pipeline
    assert pipe is not None
    squares = (local.double() ** 2).reshape(1)
    dist.all_reduce(squares, group=pipe.group)
    return squares.sqrt()[0].to(local.dtype)
