"""Where packed sequences start: one layout derived from whatever packing info is given.

A transformers model forwards the extra keyword arguments of its `forward` to the
attention function of every layer (checked with transformers 5.23: Llama, Qwen2, Gemma-2
pass `**kwargs` from the causal-LM forward through the decoder layers unchanged). The
attention function then receives, besides `query/key/value [B, H, T, D]`, the model's
`attention_mask`, `dropout` and `scaling`:

- `position_ids` [1 or B, T] — always (the model makes `arange(T)[None]` when not given);
- `cu_seq_lens_q`, `cu_seq_lens_k` (int32 [n+1]), `max_length_q`, `max_length_k` (int)
  — transformers' own names for flash-attn varlen packing, when the caller passes them;
- `sliding_window` and `softcap` — from models that have them (Gemma-2: `sliding_window`
  is the window on sliding layers and None on global ones);
- meshplan's own names, which transformers passes through like any other kwarg:
  `cu_seq_lens_q_padded` / `cu_seq_lens_k_padded` (the Transformer Engine `thd` layout
  under context parallelism) and `segment_ids` [B, T].

`forward_kwargs(batch)` turns a batch from `meshplan.runtime.packing.collators` into
these keyword arguments. `find_segments` reads them back, in this order of precedence:

1. `cu_seq_lens_q_padded`, else `cu_seq_lens_q` (`_k` when `_q` is absent): the
   boundaries of the segments in the flattened `B * T` token stream (flash-attn varlen
   semantics: a segment may cross a row boundary). The real (unpadded) cumulative
   lengths are `cu_seq_lens_q` when the padded ones are given.
2. `segment_ids`: a segment is a run of equal ids in a row.
3. `position_ids`: a new sequence starts wherever the position id is 0 (and at every row
   start). Position ids that never restart inside a row are not packing info.

Guarantees: the result is None exactly when there is no packing info; otherwise every
token of the batch belongs to exactly one segment, segments are contiguous and in order,
and a boundary list that does not cover the `B * T` tokens raises `ValueError` naming
both numbers (the model was handed a sharded sequence with full-length boundaries).
Derived segments are cached per forward pass: every layer receives the same kwargs
tensors, so the host-device synchronisations are paid once, not once per layer.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "CU_SEQ_LENS_K",
    "CU_SEQ_LENS_K_PADDED",
    "CU_SEQ_LENS_Q",
    "CU_SEQ_LENS_Q_PADDED",
    "MAX_LENGTH_K",
    "MAX_LENGTH_Q",
    "SEGMENT_IDS",
    "Segments",
    "find_segments",
    "forward_kwargs",
]

CU_SEQ_LENS_Q = "cu_seq_lens_q"
CU_SEQ_LENS_K = "cu_seq_lens_k"
MAX_LENGTH_Q = "max_length_q"
MAX_LENGTH_K = "max_length_k"
CU_SEQ_LENS_Q_PADDED = "cu_seq_lens_q_padded"
CU_SEQ_LENS_K_PADDED = "cu_seq_lens_k_padded"
SEGMENT_IDS = "segment_ids"


@dataclass(frozen=True)
class Segments:
    """Packed segments of a `[batch, length]` token grid, flattened row-major.

    `cu_seqlens` (int32 [n+1]) are the segment boundaries in the flattened stream; they
    lay the tokens out. `real_cu_seqlens` (int32 [n+1]) are the cumulated real lengths
    (Transformer Engine's `cu_seqlens`): equal to `cu_seqlens` unless the sequences carry
    their own padding (`thd` with context parallelism). `ids` (int64 [batch * length])
    is each token's segment index. `crosses_rows` is True when a segment may continue
    from one row into the next (boundaries given over the flattened batch).
    """

    batch: int
    length: int
    cu_seqlens: torch.Tensor
    real_cu_seqlens: torch.Tensor
    ids: torch.Tensor
    max_seqlen: int
    source: str
    crosses_rows: bool

    @property
    def count(self) -> int:
        return int(self.cu_seqlens.numel()) - 1

    def row_ids(self) -> torch.Tensor:
        """Segment ids as [batch, length] (ids are unique over the whole batch)."""
        return self.ids.view(self.batch, self.length)


# One entry: the tensor the segments were derived from (weakly held, so a freed tensor
# whose id is reused can never hit), its version counter, and the result. A tensor
# written outside autograd (`dist.recv` into a persistent buffer) keeps its version:
# callers that refill one must hand in a fresh tensor (the pipeline stages do).
_cache: dict[str, tuple[weakref.ref[torch.Tensor], int, tuple[Any, ...], Segments]] = {}


def _cached(key: str, source: torch.Tensor, extra: tuple[Any, ...]) -> Segments | None:
    hit = _cache.get(key)
    if hit is None:
        return None
    ref, version, hit_extra, segments = hit
    if ref() is source and version == source._version and hit_extra == extra:
        return segments
    return None


def _remember(key: str, source: torch.Tensor, extra: tuple[Any, ...], seg: Segments) -> Segments:
    _cache.clear()  # one forward pass at a time: keep only the latest
    _cache[key] = (weakref.ref(source), source._version, extra, seg)
    return seg


def _from_starts(
    starts: torch.Tensor,
    batch: int,
    length: int,
    source: str,
    *,
    crosses_rows: bool,
    real_cu: torch.Tensor | None = None,
) -> Segments:
    total = batch * length
    begin = torch.nonzero(starts).flatten()
    cu = torch.cat([begin, begin.new_tensor([total])]).to(torch.int32)
    ids = torch.cumsum(starts.to(torch.int64), 0) - 1
    lengths = cu[1:] - cu[:-1]
    max_seqlen = int(lengths.max()) if lengths.numel() else 0
    return Segments(
        batch=batch,
        length=length,
        cu_seqlens=cu,
        real_cu_seqlens=cu if real_cu is None else real_cu,
        ids=ids,
        max_seqlen=max_seqlen,
        source=source,
        crosses_rows=crosses_rows,
    )


def _check_cu(name: str, cu: Any, total: int) -> torch.Tensor:
    if not isinstance(cu, torch.Tensor) or cu.ndim != 1 or cu.numel() < 1:
        raise ValueError(f"{name} must be a 1-D tensor of cumulative lengths, got {cu!r}")
    if cu.dtype.is_floating_point or cu.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers, got {cu.dtype}")
    first, last = int(cu[0]), int(cu[-1])
    if first != 0 or last != total:
        raise ValueError(
            f"{name} runs from {first} to {last}, but the attention input holds "
            f"{total} tokens (batch x length); packed boundaries must cover all of them"
        )
    if cu.numel() > 1 and bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"{name} must be non-decreasing, got {cu.tolist()}")
    return cu


def _from_cu(
    cu: torch.Tensor, real: torch.Tensor | None, batch: int, length: int, device: torch.device
) -> Segments:
    total = batch * length
    starts = torch.zeros(total, dtype=torch.bool, device=device)
    cu = cu.to(device=device, dtype=torch.int64)
    # Zero-length segments start where the next one does; they own no token.
    starts[cu[:-1][cu[:-1] < total]] = True
    seg = _from_starts(starts, batch, length, "cu_seqlens", crosses_rows=True)
    if real is not None:
        if real.numel() != cu.numel():
            raise ValueError(
                f"{CU_SEQ_LENS_Q} has {real.numel()} entries but {CU_SEQ_LENS_Q_PADDED} "
                f"has {cu.numel()}; both describe the same sequences"
            )
        lengths = torch.diff(cu)
        nonempty = lengths > 0
        real_cu = torch.cat([real[:1], real[1:][nonempty]]).to(device=device, dtype=torch.int32)
        seg = Segments(**{**seg.__dict__, "real_cu_seqlens": real_cu})
    return seg


def _from_segment_ids(segment_ids: torch.Tensor, batch: int, length: int) -> Segments:
    ids = segment_ids
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[-1] != length or ids.shape[0] not in (1, batch):
        raise ValueError(
            f"{SEGMENT_IDS} must have shape [{batch}, {length}], got {tuple(segment_ids.shape)}"
        )
    ids = ids.expand(batch, length)
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    return _from_starts(starts.flatten(), batch, length, "segment_ids", crosses_rows=False)


def _from_position_ids(position_ids: torch.Tensor, batch: int, length: int) -> Segments | None:
    pos = position_ids
    if pos.ndim == 1:
        pos = pos[None]
    # Multi-axis rotary positions ([3, B, T] in Qwen2-VL) carry no packing convention here.
    if pos.ndim != 2 or pos.shape[-1] != length or pos.shape[0] not in (1, batch):
        return None
    starts = (pos == 0).expand(batch, length).clone()
    starts[:, 0] = True
    if not bool(starts[:, 1:].any()):
        return None  # one sequence per row: not packed
    return _from_starts(starts.flatten(), batch, length, "position_ids", crosses_rows=False)


def find_segments(
    batch: int,
    length: int,
    device: torch.device,
    kwargs: Mapping[str, Any],
) -> Segments | None:
    """The packed layout of a `[batch, length]` attention input, or None (not packed).

    `kwargs` are the keyword arguments the attention function received (see the module
    docstring for the names and their precedence).
    """
    total = batch * length
    padded = kwargs.get(CU_SEQ_LENS_Q_PADDED)
    if padded is None:
        padded = kwargs.get(CU_SEQ_LENS_K_PADDED)
    cu = kwargs.get(CU_SEQ_LENS_Q)
    if cu is None:
        cu = kwargs.get(CU_SEQ_LENS_K)
    if padded is not None or cu is not None:
        layout = padded if padded is not None else cu
        assert layout is not None
        key_tensor: torch.Tensor = layout
        extra: tuple[Any, ...] = ("cu", batch, length, device, id(cu) if padded is not None else 0)
        hit = _cached("cu", key_tensor, extra)
        if hit is not None:
            return hit
        name = CU_SEQ_LENS_Q_PADDED if padded is not None else CU_SEQ_LENS_Q
        _check_cu(name, layout, total)
        real = None
        if padded is not None and cu is not None:
            if not isinstance(cu, torch.Tensor) or cu.ndim != 1:
                raise ValueError(f"{CU_SEQ_LENS_Q} must be a 1-D tensor, got {cu!r}")
            real = cu
        return _remember("cu", key_tensor, extra, _from_cu(layout, real, batch, length, device))
    segment_ids = kwargs.get(SEGMENT_IDS)
    if segment_ids is not None:
        if not isinstance(segment_ids, torch.Tensor):
            raise ValueError(f"{SEGMENT_IDS} must be a tensor, got {type(segment_ids).__name__}")
        extra = ("segment_ids", batch, length, device)
        hit = _cached("segment_ids", segment_ids, extra)
        if hit is not None:
            return hit
        seg = _from_segment_ids(segment_ids.to(device), batch, length)
        return _remember("segment_ids", segment_ids, extra, seg)
    position_ids = kwargs.get("position_ids")
    if isinstance(position_ids, torch.Tensor):
        extra = ("position_ids", batch, length, device)
        hit = _cached("position_ids", position_ids, extra)
        if hit is not None:
            return hit
        found = _from_position_ids(position_ids.to(device), batch, length)
        if found is None:
            _cache.clear()  # this pass is the latest: an earlier one's segments are not its
            return None
        return _remember("position_ids", position_ids, extra, found)
    return None


def forward_kwargs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments for a transformers causal LM's `forward` from a collated batch.

    Works for every format of `meshplan.runtime.packing.collators`; `labels` are left out
    on purpose (they are already shifted, and a transformers model would shift them
    again: compute the loss with `meshplan.runtime.train.loss`). `varlen`/`thd` boundaries are
    passed under transformers' flash-attn names (`cu_seq_lens_q/k`, `max_length_q/k`),
    `thd`'s padded boundaries as `cu_seq_lens_q/k_padded`, and `segment_ids` and the
    `padded` format's `attention_mask` as themselves, and a context-parallel batch's
    `cp_*` tensors (see `meshplan.runtime.parallel.context`) as themselves.
    """
    out: dict[str, Any] = {"input_ids": batch["input_ids"]}
    if "position_ids" in batch:
        out["position_ids"] = batch["position_ids"]
    if "cu_seqlens" in batch:
        out[CU_SEQ_LENS_Q] = out[CU_SEQ_LENS_K] = batch["cu_seqlens"]
        if "max_seqlen" in batch:
            out[MAX_LENGTH_Q] = out[MAX_LENGTH_K] = int(batch["max_seqlen"])
    if "cu_seqlens_padded" in batch:
        out[CU_SEQ_LENS_Q_PADDED] = out[CU_SEQ_LENS_K_PADDED] = batch["cu_seqlens_padded"]
    if SEGMENT_IDS in batch:
        out[SEGMENT_IDS] = batch[SEGMENT_IDS]
    if "attention_mask" in batch:
        out["attention_mask"] = batch["attention_mask"]
    for name in ("cp_query_index", "cp_key_index", "cp_segment_ids", "cp_key_valid"):
        if name in batch:  # a batch split by `runtime.parallel.context.shard_batch`
            out[name] = batch[name]
    return out

