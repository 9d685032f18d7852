"""Token-level causal-LM loss for labels that are ALREADY SHIFTED.

`meshplan.runtime.packing.collators` shifts labels inside each sequence (labels[i] is the
target of token i, -100 at sequence ends and padding), so the loss here never shifts
again — unlike a transformers model's own `labels=` loss, which would.

Guarantees:

- `loss_sum_and_count(logits, labels)` returns the summed cross-entropy over the
  tokens whose label is not `ignore_index`, accumulated in float32 whatever the
  logits' dtype, and that token count. A packed batch's `sum / count` is therefore the
  token-weighted mean over its sequences — what the same sequences give unpacked — and
  sums and counts add up across micro-batches and ranks.
- Logits that are a DTensor sharded on the vocabulary (`Shard(-1)`, e.g. from an
  `lm_head` under `ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)`)
  are handled without gathering the vocabulary, through
  `torch.distributed.tensor.parallel.loss_parallel()`. Its backward must run inside
  that context too: wrap forward and backward in `vocab_parallel()`, which unlike
  `loss_parallel()` may be nested (this module enters it for the forward itself).
  The sum comes back as a plain tensor holding the full-vocabulary loss on every rank.
- `data_parallel_loss(sum, count, group)` scales a rank's sum so that gradients
  averaged over `group` (FSDP2's and DDP's default) equal those of the token-weighted
  mean over all ranks' tokens, and returns that global mean for logging.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Shard

__all__ = [
    "IGNORE_INDEX",
    "causal_lm_loss",
    "data_parallel_loss",
    "loss_sum_and_count",
    "vocab_parallel",
]

IGNORE_INDEX = -100

# `loss_parallel()` installs DTensor op handlers on entry and removes them on exit, so
# entering it twice would remove them under the outer user's feet: count the depth.
_vocab_parallel_depth = 0


@contextlib.contextmanager
def vocab_parallel() -> Iterator[None]:
    """Re-entrant `torch.distributed.tensor.parallel.loss_parallel()`."""
    global _vocab_parallel_depth
    from torch.distributed.tensor.parallel import loss_parallel

    if _vocab_parallel_depth:
        _vocab_parallel_depth += 1
        try:
            yield
        finally:
            _vocab_parallel_depth -= 1
        return
    with loss_parallel():
        _vocab_parallel_depth = 1
        try:
            yield
        finally:
            _vocab_parallel_depth = 0


def _vocab_shard_dim(logits: DTensor) -> bool:
    last = logits.ndim - 1
    return any(isinstance(p, Shard) and p.dim in (last, -1) for p in logits.placements)


def loss_sum_and_count(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed float32 cross-entropy, number of counted tokens) for shifted labels.

    `logits` is `[..., vocab]` and `labels` the matching `[...]` (int64).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}: "
            "expected logits [..., vocab] for labels [...]"
        )
    flat_labels = labels.reshape(-1)
    count = (flat_labels != ignore_index).sum()
    if isinstance(count, DTensor):
        count = count.full_tensor()
    if isinstance(logits, DTensor):
        if not _vocab_shard_dim(logits):
            # Not vocabulary-sharded: the plain loss on the full logits is exact.
            logits = logits.full_tensor()
        else:
            flat = logits.reshape(-1, logits.shape[-1]).float()
            with vocab_parallel():
                total = F.cross_entropy(
                    flat, flat_labels, ignore_index=ignore_index, reduction="sum"
                )
            assert isinstance(total, DTensor)
            return total.full_tensor(), count
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    total = F.cross_entropy(
        flat_logits, flat_labels.to(flat_logits.device), ignore_index=ignore_index, reduction="sum"
    )
    return total, count.to(total.device)


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Token-weighted mean loss of one batch (0 when no token is counted)."""
    total, count = loss_sum_and_count(logits, labels, ignore_index=ignore_index)
    return total / count.clamp(min=1)


def data_parallel_loss(
    loss_sum: torch.Tensor,
    count: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    gradients_averaged: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backpropagate on this rank, global token-weighted mean for logging).

    The loss is `loss_sum * world / global_count` when the data-parallel gradient
    reduction averages over `group` (`gradients_averaged`, FSDP2 and DDP by default),
    else `loss_sum / global_count`; either way the reduced gradients are those of
    `sum of all ranks' sums / sum of all ranks' counts`. One all-reduce (no gradient
    flows through it). Without an initialised process group this is the local mean.
    """
    stats = torch.stack([loss_sum.detach().double(), count.detach().double()])
    world = 1
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size(group)
        if world > 1:
            dist.all_reduce(stats, group=group)
    global_count = stats[1].clamp(min=1)
    factor = world if gradients_averaged else 1
    loss = loss_sum * (factor / global_count).to(loss_sum.dtype)
    return loss, (stats[0] / global_count).to(loss_sum.dtype)
