"""The reference training loop behind `plan run`, shared by single-process and parallel runs.

    init()                       process group from torchrun's environment (or a 1-rank one)
    prepare(model)               meshplan's packed attention backend for the device
    apply(program, model)        the plan's parallelism (runtime/parallel/apply.py)
    Topology.of(applied)         where this rank sits: dp coordinate, loss group, grad divisor
    train(model, opt, loader, topology, config)   AdamW steps over packed batches

Guarantees (what the equivalence tests check against a single process):

- The loss is the token-weighted mean over the GLOBAL batch: every rank sums the
  cross-entropy of its tokens (labels are already shifted, see `runtime.train.loss`), the token
  count is all-reduced over the `loss` group (the plan's `loss` submesh when declared,
  else the data-parallel and context-parallel dimensions) BEFORE the forward, and each
  rank backpropagates `sum * grad_divisor / global_count`, where `grad_divisor` is the
  number of ranks FSDP averages gradients over. The reduced gradients are therefore the
  gradients of the global mean, however the global batch is split into ranks and
  micro-batches (gradient accumulation included). A plan whose FSDP mesh does not cover
  the loss group (replicas nobody synchronises) is refused with `TrainError`.
- Tensor-parallel runs compute the loss from vocabulary-sharded DTensor logits with
  `loss_parallel()`, forward and backward inside it, never gathering the vocabulary.
- `grad_norm` is the norm of the FULL gradient, for plain tensors and DTensors on any
  mix of meshes: each local shard's sum of squares is all-reduced over exactly the mesh
  dimensions the gradient is sharded on (replicated dimensions are counted once), so FSDP
  + TP parameters on different meshes are handled. `clip_grad_norm` scales in place by
  `min(1, max_norm / (norm + 1e-6))`, as `torch.nn.utils.clip_grad_norm_`.
- Under sequence parallelism a Hugging Face model sees a sharded sequence after its
  embedding and would build positions and masks from that length: the batches carry
  full-length `position_ids` and packing boundaries, and `prepare` selects meshplan's
  packed attention backend, which builds the mask from them and ignores the model's.
- Every rank runs the same number of steps and collectives (empty padding bins included).

- With `checkpoint_root`, `train` saves model, optimizer and data-loader state every
  `config.checkpoint_every` steps and after the last (`runtime.weights.checkpoint`: DCP, atomic),
  and `resume` restores the latest complete checkpoint: the resumed run continues with
  the very batches and optimizer state the uninterrupted run would have had.

Model building (`build_applied`): meta device → Program → local shards allocated →
weights read per shard from safetensors, or seeded random weights that do not depend on
the layout (`runtime.weights.loading`), so no rank ever holds the whole model.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate

from ..attention import forward_kwargs
from ..parallel.apply import Applied
from .build import device_of
from .environment import TrainError
from .loss import IGNORE_INDEX, loss_sum_and_count, vocab_parallel
from .pipeline import pipeline_backward, stages_norm
from .topology import Topology

if TYPE_CHECKING:
    pass


__all__ = [
    "StepStats",
    "TrainConfig",
    "clip_grad_norm",
    "grad_norm",
    "make_optimizer",
    "resume",
    "save_checkpoint",
    "train",
    "train_step",
]

Batch = dict[str, Any]


# --------------------------------------------------------------------------- gradients


def _grads(parameters: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [p.grad for p in parameters if p.grad is not None]


def grad_norm(parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all gradients together, as a float32 scalar on every rank."""
    buckets: dict[Any, torch.Tensor] = {}
    for g in _grads(parameters):
        key: Any = None
        local = g
        if isinstance(g, DTensor):
            if any(isinstance(p, Partial) for p in g.placements):  # pending sums: do them first
                g = g.redistribute(placements=[Replicate() if isinstance(p, Partial) else p
                                               for p in g.placements])
            # Shard, and _StridedShard (FSDP over TP), which is not a Shard subclass.
            dims = tuple(i for i, p in enumerate(g.placements) if not p.is_replicate())
            key = (g.device_mesh, dims) if dims else None
            local = g.to_local()
        square = local.detach().float().pow(2).sum()
        buckets[key] = buckets[key] + square if key in buckets else square
    total = torch.zeros((), dtype=torch.float32)
    for key, square in buckets.items():
        if key is not None:
            mesh, dims = key
            for d in dims:  # sum over every dimension the gradient is sharded on
                dist.all_reduce(square, group=mesh.get_group(d))
        total = total + square.cpu()
    return total.sqrt()


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Scale gradients so their total norm is at most `max_norm`; returns the norm before."""
    params = list(parameters)
    norm = grad_norm(params)
    _scale_to(params, norm, max_norm)
    return norm


def _scale_to(params: list[torch.Tensor], norm: torch.Tensor, max_norm: float | None) -> None:
    """Scale the gradients, whose total norm is `norm`, by min(1, max_norm / (norm + 1e-6))."""
    if max_norm is None:
        return
    coef = min(1.0, max_norm / (float(norm) + 1e-6))
    if coef < 1.0:
        with torch.no_grad():
            for g in _grads(params):
                g.mul_(coef)


# --------------------------------------------------------------------------- the loop


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float | None = 1.0
    log_every: int = 1
    checkpoint_every: int = 0  # 0: never


@dataclass(frozen=True)
class StepStats:
    """One optimizer step, as every rank sees it (global figures)."""

    step: int
    loss: float  # token-weighted mean over the global batch
    grad_norm: float  # before clipping
    tokens: int  # real tokens in the global batch
    targets: int  # tokens with a label (what the loss averages over)
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def _set_sync(model: nn.Module, sync: bool) -> None:
    """FSDP2: reduce gradients only on the last micro-batch of a step."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over every trainable parameter (DTensors after `apply`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=config.lr, betas=config.betas,
                             weight_decay=config.weight_decay)


def _router_kwargs(model: nn.Module) -> dict[str, Any]:
    """MoE models whose config asks for the load-balancing loss return their router logits."""
    return {"output_router_logits": True} if getattr(getattr(model, "config", None), "output_router_logits",
                                                      False) else {}


def _balancing_loss(model: nn.Module, out: Any, topology: Topology) -> torch.Tensor | float:
    """`router_aux_loss_coef` × the load-balancing loss of one micro-batch over the loss
    group (counts and probabilities summed over its ranks; the backward sums too, which
    FSDP's average over the same ranks undoes): the value one process computes on every
    rank's micro-batch together. A step adds the mean over its micro-batches."""
    logits = getattr(out, "router_logits", None)
    config = getattr(model, "config", None)
    if not logits or config is None:
        return 0.0
    from ..parallel.experts import load_balancing_loss

    experts = getattr(config, "num_local_experts", None) or config.num_experts
    aux = load_balancing_loss(logits, int(experts), int(config.num_experts_per_tok), topology.loss_group)
    return float(config.router_aux_loss_coef) * aux


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: Sequence[Batch],
               topology: Topology, *, step: int = 0, max_grad_norm: float | None = None,
               device: torch.device | None = None) -> StepStats:
    """Forward and backward every micro-batch of this rank, clip, and step the optimizer."""
    start = time.perf_counter()
    device = device or device_of(model)
    model.train()
    batches = [_to(b, device) for b in micro_batches]
    counts = torch.tensor([sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches),
                           sum(int(b.get("num_tokens", b["input_ids"].numel())) for b in batches)],
                          dtype=torch.float64, device=device)
    if topology.loss_group is not None:
        dist.all_reduce(counts, group=topology.loss_group)
    targets, tokens = int(counts[0]), int(counts[1])
    scale = topology.grad_divisor / max(targets, 1)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i, batch in enumerate(batches):
        _set_sync(model, i == len(batches) - 1)
        with vocab_parallel() if topology.vocab_parallel else contextlib.nullcontext():
            out = model(**forward_kwargs(batch), **_router_kwargs(model))
            total, _ = loss_sum_and_count(out.logits, batch["labels"])
            (total * scale + _balancing_loss(model, out, topology) / len(batches)).backward()
        loss_sum += total.detach().double()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = clip_grad_norm(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if topology.loss_group is not None:
        dist.all_reduce(loss_sum, group=topology.loss_group)
    loss = float(loss_sum) / max(targets, 1)
    return StepStats(step, loss, float(norm), tokens, targets, time.perf_counter() - start)


def pipeline_train_step(applied: Applied, optimizer: torch.optim.Optimizer, micro_batches: Sequence[Batch],
                        topology: Topology, *, step: int = 0, max_grad_norm: float | None = None) -> StepStats:
    """`train_step` for a model cut into pipeline stages (`runtime.train.pipeline`): the
    schedule runs forward and backward; the norm and the clipping cover every stage."""
    start = time.perf_counter()
    loss, targets, tokens = pipeline_backward(applied, micro_batches, topology)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = stages_norm(applied, grad_norm(params))  # the norm over every stage, then clip by it
    _scale_to(params, norm, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepStats(step, loss, float(norm), tokens, targets, time.perf_counter() - start)


def train(model: nn.Module | Applied, optimizer: torch.optim.Optimizer,
          batches: Iterable[Sequence[Batch]], topology: Topology, config: TrainConfig, *,
          start_step: int = 0, on_step: Callable[[StepStats], None] | None = None,
          checkpoint_root: str | Path | None = None,
          on_checkpoint: Callable[[Path, int, float], None] | None = None) -> list[StepStats]:
    """Run steps `start_step + 1 … config.steps`; returns their statistics.

    `batches` yields, per step, this rank's micro-batches (e.g. a `data.PackedLoader`,
    whose state is checkpointed with the model). `on_step` sees every step's statistics
    (rank 0 shows them). With `checkpoint_root` and `config.checkpoint_every`, a
    checkpoint is saved every that many steps and after the last one; `on_checkpoint`
    sees each one's directory, step and seconds.
    """
    module = model.model if isinstance(model, Applied) else model
    history: list[StepStats] = []
    source: Iterator[Sequence[Batch]] = iter(batches)
    for step in range(start_step + 1, config.steps + 1):
        try:
            micro = next(source)
        except StopIteration:
            break
        if isinstance(model, Applied) and model.pipeline is not None:
            stats = pipeline_train_step(model, optimizer, micro, topology, step=step,
                                        max_grad_norm=config.max_grad_norm)
        else:
            stats = train_step(module, optimizer, micro, topology, step=step,
                               max_grad_norm=config.max_grad_norm)
        history.append(stats)
        if on_step is not None:
            on_step(stats)
        every = config.checkpoint_every
        if checkpoint_root is not None and every and (step % every == 0 or step == config.steps):
            began = time.perf_counter()
            path = save_checkpoint(checkpoint_root, model, optimizer, step, batches)
            if on_checkpoint is not None:
                on_checkpoint(path, step, time.perf_counter() - began)
    return history


def save_checkpoint(root: str | Path, model: nn.Module | Applied, optimizer: torch.optim.Optimizer,
                    step: int, loader: Any = None) -> Path:
    """Save model, optimizer and the loader's state as `root/step-XXXXXXXX` (a collective).

    A model carrying adapters saves only them and their optimizer state: its frozen base
    is the one `--model` gives again on resume (and a 4-bit base has no safetensors form)."""
    from ..parallel.adapters import adapted_modules
    from ..weights.checkpoint import checkpoint_dir, save

    state = loader.state_dict() if hasattr(loader, "state_dict") else None
    module = model.model if isinstance(model, Applied) else model
    return save(checkpoint_dir(root, step), model, optimizer, step, state, overwrite=True,
                adapters_only=bool(adapted_modules(module)))


def resume(root: str | Path, model: nn.Module | Applied, optimizer: torch.optim.Optimizer,
           loader: Any = None, *, on_warning: Callable[[str], None] | None = None) -> int:
    """Restore the newest intact checkpoint under `root` into model, optimizer and
    loader; returns its step (0 when there is none). A damaged checkpoint is skipped
    with a warning (`on_warning`), down to the newest intact one; none intact, or a
    checkpoint this run cannot continue (another layout), raises `TrainError`. A collective."""
    from ..packing import PackingError
    from ..weights.checkpoint import CheckpointError, load_latest

    try:
        found = load_latest(root, model, optimizer, on_warning=on_warning)
    except CheckpointError as e:
        raise TrainError(f"cannot resume from {root}: {e}") from None
    if found is None:
        return 0
    directory, step, state = found
    if state is not None and hasattr(loader, "load_state_dict"):
        try:
            loader.load_state_dict(state)
        except PackingError as e:
            raise TrainError(f"cannot resume from {directory}: {e} (resume with the layout that saved "
                             "it: the same --set values, world size and --micro-batch)") from None
    return step
