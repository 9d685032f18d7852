"""Training an applied model in your own loop (or a Hugging Face `Trainer`).

An applied model cannot be called the obvious way: under sequence parallelism a
transformers model derives positions from the sharded length after its embedding
(rotary embeddings then fail on a shape mismatch), and with `labels=` it computes its
own loss on vocabulary-sharded DTensor logits (mixed Tensor/DTensor). These helpers are
the pieces of `plan run`'s loop, usable one by one:

    env = init()
    built = build_applied(compile_plan("plans/llama.plan", "tiny-llama", env.world_size).program,
                          "tiny-llama")
    topology = Topology.of(built.applied)
    loader = rank_loader(PackedData.build(sequences, 256, context=topology.context), topology)
    for _, micro in zip(range(steps), loader):
        count = global_target_count(micro, topology)          # before the forward
        for batch in micro:
            logits = model(**forward_arguments(batch)).logits
            total, _ = token_loss(logits, batch["labels"])
            (total * topology.grad_divisor / count).backward()
        ... clip, step, zero_grad; global_loss(totals, count, topology) for the log

Guarantees:

- `forward_arguments(batch)` gives a transformers causal LM's keyword arguments for a
  collated packed batch (positions and packing boundaries included, `labels` left out)
  or for a plain `{"input_ids": [B, S]}` batch, to which it adds full-length
  `position_ids` (0 … S-1 per row) unless the batch has them.
- `token_loss(logits, labels)` is `(summed float32 cross-entropy, counted tokens)` for
  labels already shifted (`shift=True` shifts unshifted ones, as transformers does),
  for plain logits and for DTensor logits sharded on the vocabulary, without gathering
  the vocabulary and without a context manager around the backward: the two
  reductions over the vocabulary shards are all-reduces whose backward is the identity
  (every rank of the group holds the same loss), so it can be backpropagated anywhere
  (a `Trainer`'s `compute_loss`). It agrees with `plan run`'s `loss_parallel()` loss to
  float32 rounding.
- `global_target_count(micro_batches, topology)`, `global_loss(...)`: the global token
  count (all-reduced over the loss group, before the forward) and the global mean for
  logging; backpropagating `sum * topology.grad_divisor / count` per micro-batch gives
  the gradients of the global token-weighted mean, as `plan run`'s loop does.
- `rank_loader(data, topology)` deals packed bins per data-parallel rank; the
  tensor- and context-parallel peers of a rank get the same bins (each context-parallel
  rank keeps its part of the sequence). `dp_sampler(dataset, topology)` does the same
  for any map-style dataset: a `DistributedSampler` over the data-parallel coordinate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.utils.data import Dataset, DistributedSampler

from ..attention import forward_kwargs
from .data import PackedData, PackedLoader
from .loss import IGNORE_INDEX
from .topology import Topology

__all__ = [
    "MeshplanTrainer",
    "dp_sampler",
    "forward_arguments",
    "global_loss",
    "global_target_count",
    "rank_loader",
    "token_loss",
]


def forward_arguments(batch: Mapping[str, Any], *, device: torch.device | str | None = None) -> dict[str, Any]:
    """Keyword arguments for the applied model's `forward` (see the module docstring)."""
    out = forward_kwargs(batch)
    ids = out["input_ids"]
    if "position_ids" not in out:
        # The model would count positions after the embedding, where sequence
        # parallelism has already cut the sequence: give the full length here.
        out["position_ids"] = torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)
    if device is not None:
        out = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in out.items()}
    return out


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) in the forward; identity in the backward: every rank of the
    group computes the same loss from the sum, so each rank's gradient of that one loss
    with respect to its own summand is the incoming gradient itself."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def _vocab_mesh_dim(logits: DTensor) -> int | None:
    """The mesh dimension sharding the vocabulary, when that is the only sharding."""
    last = logits.ndim - 1
    dims = [i for i, p in enumerate(logits.placements) if isinstance(p, Shard) and p.dim in (last, -1)]
    others = [p for i, p in enumerate(logits.placements) if i not in dims and not isinstance(p, Replicate)]
    return dims[0] if len(dims) == 1 and not others else None


def _vocab_parallel_sum(logits: DTensor, labels: torch.Tensor, mesh_dim: int,
                        ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    group = logits.device_mesh.get_group(mesh_dim)
    _, offset = compute_local_shape_and_global_offset(logits.shape, logits.device_mesh, logits.placements)
    local = logits.to_local().float()
    width, start = local.shape[-1], int(offset[-1])
    local = local.reshape(-1, width)
    flat = labels.reshape(-1).to(local.device)
    counted = flat != ignore_index
    peak = local.detach().max(dim=-1).values
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)  # a constant: no gradient
    shifted = local - peak[:, None]
    normaliser = _SumOverGroup.apply(shifted.exp().sum(dim=-1), group)
    here = counted & (flat >= start) & (flat < start + width)
    picked = shifted.gather(1, (flat - start).clamp(0, width - 1)[:, None]).squeeze(1) * here
    target = _SumOverGroup.apply(picked, group)
    total = ((normaliser.log() - target) * counted).sum()
    return total, counted.sum()


def token_loss(logits: torch.Tensor, labels: torch.Tensor, *, shift: bool = False,
               ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed float32 cross-entropy, counted tokens); see the module docstring."""
    if isinstance(labels, DTensor):
        labels = labels.full_tensor()
    if shift:  # transformers' convention: labels[i] is the target of token i - 1
        labels = torch.nn.functional.pad(labels[..., 1:], (0, 1), value=ignore_index)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}: "
                         "expected logits [..., vocab] for labels [...]")
    if isinstance(logits, DTensor):
        mesh_dim = _vocab_mesh_dim(logits)
        if mesh_dim is not None:
            return _vocab_parallel_sum(logits, labels, mesh_dim, ignore_index)
        logits = logits.full_tensor()
    flat = logits.reshape(-1, logits.shape[-1]).float()
    target = labels.reshape(-1).to(flat.device)
    total = torch.nn.functional.cross_entropy(flat, target, ignore_index=ignore_index, reduction="sum")
    return total, (target != ignore_index).sum()


def global_target_count(micro_batches: Sequence[Mapping[str, Any]], topology: Topology) -> int:
    """Tokens with a target in this step's global batch (a collective over the loss group)."""
    local = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches)
    count = torch.tensor([local], dtype=torch.float64)
    if topology.loss_group is not None:
        dist.all_reduce(count, group=topology.loss_group)
    return int(count.item())


def global_loss(totals: Sequence[torch.Tensor] | torch.Tensor, count: int, topology: Topology) -> float:
    """The global token-weighted mean of this step from this rank's summed losses (a
    collective over the loss group), for logging."""
    parts = [totals] if isinstance(totals, torch.Tensor) else list(totals)
    summed = torch.zeros((), dtype=torch.float64)
    for t in parts:
        summed += t.detach().double().cpu()
    if topology.loss_group is not None:
        dist.all_reduce(summed, group=topology.loss_group)
    return float(summed) / max(count, 1)


def rank_loader(data: PackedData, topology: Topology, *, micro_batch: int = 1, seed: int = 0) -> PackedLoader:
    """This rank's packed batches: its data-parallel share, its part of each sequence."""
    return data.loader(topology.dp_rank, topology.dp_size, micro_batch=micro_batch, seed=seed,
                       cp_rank=topology.cp_rank if topology.context is not None else None)


def dp_sampler(dataset: Dataset[Any], topology: Topology, *, shuffle: bool = True, seed: int = 0,
               drop_last: bool = True) -> DistributedSampler[Any]:
    """A `DistributedSampler` over the data-parallel coordinate, not the global rank:
    tensor- and context-parallel peers must read the same examples."""
    return DistributedSampler(dataset, num_replicas=topology.dp_size, rank=topology.dp_rank,
                              shuffle=shuffle, seed=seed, drop_last=drop_last)


# --------------------------------------------------------------------------- Hugging Face Trainer


def _clip_callback(params: list[torch.nn.Parameter], max_norm: float | None) -> Any:
    """A `TrainerCallback` clipping with `loop.clip_grad_norm` before each optimizer
    step: the Trainer's own clipping (`max_grad_norm`) calls
    `torch.nn.utils.clip_grad_norm_`, which cannot add the norms of DTensors on different
    meshes (FSDP's and tensor parallelism's)."""
    from transformers import TrainerCallback

    from .loop import clip_grad_norm

    class Clip(TrainerCallback):
        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clip_grad_norm(params, max_norm)

    return Clip()


def MeshplanTrainer(*args: Any, topology: Topology, train_loader: PackedLoader,
                    max_grad_norm: float | None = 1.0, **kwargs: Any) -> Any:
    """A `transformers.Trainer` for an applied model (see the README): this rank's
    batches from `train_loader` (its data-parallel share, not the Trainer's sampler over
    the global rank), `token_loss` scaled to the global token count, meshplan's
    gradient clipping, and `trainer.global_losses`, the global mean loss of each step.
    Give the Trainer `max_grad_norm=0` in its arguments (clipping is done here), and
    start no launcher of its own: the process group is meshplan's.

    The model is marked `is_distributed_loading_by_transformers`, the flag transformers
    sets on a model it sharded itself: the Trainer then leaves placement and gradient
    reduction to the model (FSDP2 and DTensors) instead of wrapping it in DDP, which
    refuses DTensor parameters, under torchrun's environment."""
    from transformers import Trainer

    model = kwargs.get("model", args[0] if args else None)
    if model is None:
        raise ValueError("MeshplanTrainer needs the applied model (model=applied.model)")
    if hasattr(type(model), "is_distributed_loading_by_transformers"):  # a property over this field
        model._is_distributed_loading_by_transformers = True
    else:
        model.is_distributed_loading_by_transformers = True

    class _Trainer(Trainer):
        global_losses: list[float]

        def get_train_dataloader(self) -> Any:
            return _Batches(train_loader)

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            count = global_target_count([inputs], topology)
            outputs = model(**forward_arguments(inputs))
            total, _ = token_loss(outputs.logits, inputs["labels"])
            self.global_losses.append(global_loss(total, count, topology))
            loss = total * topology.grad_divisor / max(count, 1)
            return (loss, outputs) if return_outputs else loss

    trainer = _Trainer(*args, **kwargs)
    trainer.global_losses = []
    trainer.add_callback(_clip_callback([p for p in model.parameters() if p.requires_grad], max_grad_norm))
    return trainer


class _Batches:
    """The loader's steps as single batches (one micro-batch per step: the Trainer
    accumulates gradients itself)."""

    def __init__(self, loader: PackedLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Any:
        for micro in self.loader:
            yield from micro
