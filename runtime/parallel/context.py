"""Context parallelism: the sequence split over the `cp` ranks, and exact attention over it.

    collated batch ──shard_batch(batch, split, rank)──▶ this rank's tokens, and where they sit
    model(**forward_kwargs(local)) ──▶ every attention module the plan names:
        local K/V ──all-gather (or ring) over cp──▶ local queries × all keys, full-sequence mask

Which rank holds which token (`owners`). A batch row is cut into its segments — the
packed sequences, each already padded by the collator to a multiple of 2·cp, plus the
tail padding; one segment per row for the `padded` format. With `load_balance =
headtail` every segment is cut into 2·cp equal chunks and rank r holds chunks r and
2·cp−1−r of EVERY segment (Transformer Engine's THD partitioning): under causal
attention chunk c costs about c + ½ units of work, so each rank gets (r + ½) + (2·cp −
1 − r + ½) = 2·cp units of every sequence, whatever the sequence lengths. With
`load_balance = none` rank r holds the r-th contiguous 1/cp of the row.

What a rank's local batch holds (`shard_batch`): `input_ids`, `position_ids` and
`labels` at its positions, in ascending order — labels were shifted by the collator on
the full row (position i holds the target of token i), so they stay correct wherever
the cut falls and the loss never shifts again — and four tensors the attention needs to
rebuild the full-sequence mask, passed to the model as keyword arguments (transformers
forwards them to every attention function untouched):

- `cp_query_index` int64 [T/cp]: the row positions of this rank's tokens;
- `cp_key_index` int64 [T]: the row positions of the keys after the all-gather (every
  rank's `cp_query_index`, concatenated in rank order);
- `cp_segment_ids` int64 [B, T]: each position's segment in the full row;
- `cp_key_valid` bool [B, T] (`padded` format only): which positions are real tokens.

`num_tokens` (real tokens, for throughput) is kept on cp rank 0 and 0 elsewhere, so
that its sum over the loss group still counts every token once.

Attention (`ContextParallelAttention.attend`), exact up to float summation order:
query i may attend key j iff they are in the same segment, j ≤ i (causal), i − j <
window (sliding window), and j is a real token or i itself (the `padded` format's rule
in `meshplan_sdpa`) — exactly the mask one process uses for the whole row.

- `rotate = allgather`: one all-gather of the stacked local K and V over the cp group
  (`all_gather_single_autograd`: its backward reduce-scatters their gradients), then
  one masked attention of the local queries over all T keys (`meshplan_sdpa`'s kernel).
- `rotate = ring`: cp − 1 shifts of the stacked K/V block to the next rank
  (`all_to_all_single_autograd`: its backward shifts the gradients back); each block is
  attended with its log-sum-exp and the blocks are merged by weights exp(lse_b − lse).
  The next shift is issued before the current block is computed, so it overlaps.
  Autograd keeps every received block for the backward: peak memory is the all-gather's.

Both are plain differentiable PyTorch over functional collectives: they run on gloo and
NCCL alike, and `CommCounter` (plan explain) sees their collectives.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

__all__ = [
    "CP_KEYS",
    "CP_KEY_INDEX",
    "CP_KEY_VALID",
    "CP_QUERY_INDEX",
    "CP_SEGMENT_IDS",
    "ContextSplit",
    "owners",
    "row_segments",
    "shard_batch",
]

CP_QUERY_INDEX = "cp_query_index"
CP_KEY_INDEX = "cp_key_index"
CP_SEGMENT_IDS = "cp_segment_ids"
CP_KEY_VALID = "cp_key_valid"
CP_KEYS: tuple[str, ...] = (CP_QUERY_INDEX, CP_KEY_INDEX, CP_SEGMENT_IDS, CP_KEY_VALID)

# Keys of a full-row batch that describe the whole row; a local batch replaces them by
# the cp_* tensors (they would contradict the local length).
_ROW_KEYS = ("cu_seqlens", "cu_seqlens_padded", "max_seqlen", "segment_ids", "attention_mask")
_TOKEN_KEYS = ("input_ids", "position_ids", "labels")

LoadBalance = Literal["headtail", "none"]
Rotate = Literal["allgather", "ring"]
Batch = dict[str, Any]


@dataclass(frozen=True)
class ContextSplit:
    """How a sequence is cut over `size` context-parallel ranks."""

    size: int
    load_balance: LoadBalance = "headtail"

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"context-parallel size must be an integer >= 1, got {self.size!r}")
        if self.load_balance not in ("headtail", "none"):
            raise ValueError(f"load_balance must be headtail or none, got {self.load_balance!r}")

    @property
    def chunks(self) -> int:
        """Chunks per segment (headtail) or per row (none)."""
        return 2 * self.size if self.load_balance == "headtail" else self.size

    @property
    def pad_multiple(self) -> int:
        """What the collator pads each sequence to (`collate(..., cp_size=)` and
        `pack(..., pad_multiple=)`): 2·cp under head-tail, else nothing."""
        return 2 * self.size if self.load_balance == "headtail" and self.size > 1 else 1

    @property
    def collate_cp_size(self) -> int:
        return self.size if self.pad_multiple > 1 else 1


# --------------------------------------------------------------------------- the split


def row_segments(batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(segment ids [B, T] int64, real-token mask [B, T] bool or None) of a collated batch
    of any format: `cu_seqlens_padded`, else `cu_seqlens` (boundaries within the row),
    else `segment_ids`, else one segment per row (with `attention_mask` as the real
    tokens)."""
    ids = batch["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
        raise ValueError(f"input_ids must be a [batch, length] tensor, got {getattr(ids, 'shape', ids)!r}")
    rows, length = ids.shape
    cu = batch.get("cu_seqlens_padded")
    if cu is None:
        cu = batch.get("cu_seqlens")
    if cu is not None:
        if rows != 1:
            raise ValueError(f"cu_seqlens describes one packed row; this batch has {rows} rows")
        cu = cu.to(torch.int64).cpu()
        if cu.ndim != 1 or int(cu[0]) != 0 or int(cu[-1]) != length:
            raise ValueError(f"cu_seqlens {cu.tolist()} does not cover the row of {length} tokens")
        sizes = torch.diff(cu)
        segments = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)
        return segments[None].to(ids.device), None
    seg = batch.get("segment_ids")
    if seg is not None:
        if tuple(seg.shape) != (rows, length):
            raise ValueError(f"segment_ids has shape {tuple(seg.shape)}, input_ids {(rows, length)}")
        return seg.to(torch.int64), None
    mask = batch.get("attention_mask")
    valid = mask.to(torch.bool) if mask is not None else None
    return torch.zeros(rows, length, dtype=torch.int64, device=ids.device), valid


def owners(segment_ids: torch.Tensor, split: ContextSplit) -> torch.Tensor:
    """The context-parallel rank that holds each position of a row ([T] int64).

    `segment_ids` is one row [T] (or [B, T] whose rows all cut alike). Raises
    `ValueError` naming the segment whose length is not a multiple of 2·cp (headtail) or
    the row whose length is not a multiple of cp (none)."""
    rows = segment_ids if segment_ids.ndim == 2 else segment_ids[None]
    result = _row_owners(rows[0].cpu(), split)
    for r in range(1, rows.shape[0]):
        if not torch.equal(_row_owners(rows[r].cpu(), split), result):
            raise ValueError(f"row {r} of the batch is segmented differently from row 0; "
                             "context parallelism cuts all rows alike: shard one packed row at a time")
    return result


def _row_owners(seg: torch.Tensor, split: ContextSplit) -> torch.Tensor:
    n, length = split.size, int(seg.numel())
    if n == 1:
        return torch.zeros(length, dtype=torch.int64)
    if split.load_balance == "none":
        if length % n:
            raise ValueError(f"a row of {length} tokens cannot be cut into cp = {n} equal parts")
        return torch.arange(length) // (length // n)
    starts = torch.ones(length, dtype=torch.bool)
    starts[1:] = seg[1:] != seg[:-1]
    begin = torch.nonzero(starts).flatten()
    sizes = torch.diff(torch.cat([begin, torch.tensor([length])]))
    bad = torch.nonzero(sizes % (2 * n)).flatten()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(
            f"segment {i} (tokens {int(begin[i])}..{int(begin[i] + sizes[i]) - 1}) has {int(sizes[i])} "
            f"tokens, not a multiple of 2·cp = {2 * n}: collate with cp_size={n} (and pack with "
            f"pad_multiple={2 * n}) so that every sequence can be cut head-tail")
    start = torch.repeat_interleave(begin, sizes)
    chunk = (torch.arange(length) - start) // torch.repeat_interleave(sizes // (2 * n), sizes)
    return torch.where(chunk < n, chunk, 2 * n - 1 - chunk)


def shard_batch(batch: Mapping[str, Any], split: ContextSplit, rank: int) -> Batch:
    """This cp rank's part of a collated full-row batch (see the module docstring)."""
    if not 0 <= rank < split.size:
        raise ValueError(f"cp rank {rank} is outside 0..{split.size - 1}")
    if CP_KEY_INDEX in batch:
        raise ValueError("this batch is already split for context parallelism")
    segments, valid = row_segments(batch)
    length = segments.shape[1]
    own = owners(segments, split).to(segments.device)
    key_index = torch.argsort(own, stable=True)  # rank-major, ascending within a rank
    local = length // split.size
    query_index = key_index[rank * local:(rank + 1) * local]
    tokens = {k: batch[k] for k in _TOKEN_KEYS if k in batch}
    tokens.setdefault("position_ids", torch.arange(length, device=segments.device)[None].expand_as(segments))
    out: Batch = {k: v for k, v in batch.items() if k not in _ROW_KEYS and k not in _TOKEN_KEYS}
    out.update({k: v[:, query_index] for k, v in tokens.items()})
    if "num_tokens" in batch:
        out["num_tokens"] = int(batch["num_tokens"]) if rank == 0 else 0
    out[CP_QUERY_INDEX] = query_index
    out[CP_KEY_INDEX] = key_index
    out[CP_SEGMENT_IDS] = segments
    if valid is not None:
        out[CP_KEY_VALID] = valid
    return out
