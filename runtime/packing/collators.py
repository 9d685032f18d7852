"""Collate one bin of token-id sequences into the tensors an attention backend wants.

LABELS ARE ALREADY SHIFTED. labels[i] is the target of token i: the next token of the
SAME sequence. Each sequence's last token and every padding token have label -100
(`IGNORE_INDEX`). The loss must not shift again —

    loss = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100)

— and so it never predicts across a sequence boundary. (Hugging Face models shift
`labels` internally: pass these as a precomputed target, not as `labels=`.)

Formats (all tensors int64 unless said otherwise; `k` sequences, `T` tokens in the row):

- `varlen` (flash-attn varlen): input_ids, position_ids, labels [1, T]; `cu_seqlens`
  int32 [k+1] (segment boundaries in the row; [k+2] when tail padding adds a segment);
  `max_seqlen` int (longest segment).
  position_ids restart at 0 for every sequence.
- `thd` (Transformer Engine): as varlen, but `cu_seqlens` holds the real sequence
  boundaries and, when sequences are padded individually (cp_size > 1),
  `cu_seqlens_padded` int32 [k+1] holds the padded ones, which lay out the row.
- `segment_ids`: input_ids, position_ids, labels, segment_ids [1, seq_len]; segment ids
  are 1..k per sequence (its per-sequence CP pads included) and 0 on the tail padding.
- `padded`: one row per sequence: input_ids, labels, position_ids, attention_mask [k, L]
  (mask 1 on real tokens, 0 on padding).

Padding. With `seq_len`, the row is padded to exactly `seq_len` tokens with `pad_id`
(a bin whose tokens exceed it raises `PackingError`). In `varlen` and `thd` the tail
padding is one extra segment at the end of `cu_seqlens` (and `cu_seqlens_padded`), with
position ids from 0 and labels -100, so that every token belongs to a segment and no real
token attends to padding. With `cp_size > 1` (context parallelism, head-tail load
balancing) every sequence is first padded on its own to a multiple of 2 * cp_size: the
pads get `pad_id`, label -100, and position ids that continue the sequence's; `varlen`
then treats the padded sequences as its segments (causal attention keeps real tokens from
seeing their trailing pads), `thd` records both boundaries. `seq_len` must then be a
multiple of 2 * cp_size; pack with `pad_multiple=2 * cp_size` so the padded bin fits.

An empty bin (a padding bin from `PackedSampler`) collates to a row of padding only
(`seq_len` given) or to empty tensors.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .errors import PackingError

IGNORE_INDEX = -100
FORMATS: tuple[str, ...] = ("varlen", "thd", "segment_ids", "padded")

TokenSeq = Sequence[int] | torch.Tensor | np.ndarray
Batch = dict[str, Any]


def _as_tensor(seq: TokenSeq, i: int) -> torch.Tensor:
    if isinstance(seq, torch.Tensor):
        t = seq
    else:
        try:
            t = torch.as_tensor(np.asarray(seq))
        except (TypeError, ValueError, RuntimeError) as e:
            raise PackingError(f"sequence {i}: not a list of token ids ({e})") from None
    if t.ndim != 1:
        raise PackingError(f"sequence {i}: expected 1-D token ids, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise PackingError(f"sequence {i} is empty")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise PackingError(f"sequence {i}: token ids must be integers, got {t.dtype}")
    return t.to(torch.int64)


def _int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool):
        raise PackingError(f"{name} must be an integer >= {low}, got {value!r}")
    try:
        v = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise PackingError(f"{name} must be an integer >= {low}, got {value!r}") from None
    if v < low:
        raise PackingError(f"{name} must be an integer >= {low}, got {v}")
    return v


def _check_cp(cp_size: int, length: int | None, name: str = "seq_len") -> int:
    """The per-sequence padding multiple: 2 * cp_size, or 1 without context parallelism;
    `length` (the row length `name`) must be a multiple of it."""
    multiple = 2 * _int("cp_size", cp_size, 1)
    multiple = 1 if multiple == 2 else multiple
    if length is not None and _int(name, length, 1) % multiple:
        raise PackingError(
            f"{name}={length} must be a multiple of 2*cp_size={multiple} under context parallelism"
        )
    return multiple


class _Row:
    """One packed row: tokens, shifted labels, positions, real and padded lengths."""

    def __init__(self, seqs: Sequence[TokenSeq], pad_id: int, multiple: int) -> None:
        tensors = [_as_tensor(s, i) for i, s in enumerate(seqs)]
        self.real = [int(t.numel()) for t in tensors]
        self.padded = [-(-n // multiple) * multiple for n in self.real]
        ids, labels, pos = [], [], []
        for t, n, p in zip(tensors, self.real, self.padded, strict=True):
            pads = p - n
            ids += [t, torch.full((pads,), pad_id, dtype=torch.int64)]
            # The shift happens here, inside the sequence: the last real token and the
            # pads have no target in this sequence.
            labels += [t[1:], torch.full((pads + 1,), IGNORE_INDEX, dtype=torch.int64)]
            pos.append(torch.arange(p, dtype=torch.int64))  # pads continue the positions
        empty = torch.zeros(0, dtype=torch.int64)
        self.input_ids = torch.cat(ids) if ids else empty
        self.labels = torch.cat(labels) if labels else empty
        self.position_ids = torch.cat(pos) if pos else empty
        self.tokens = int(self.input_ids.numel())
        self.pad_id = pad_id

    def tail(self, seq_len: int | None) -> int:
        """Append the padding up to seq_len; returns its length."""
        if seq_len is None:
            return 0
        extra = seq_len - self.tokens
        if extra < 0:
            raise PackingError(
                f"bin holds {self.tokens} tokens (with per-sequence padding), more than seq_len={seq_len}"
            )
        if extra:
            self.input_ids = torch.cat(
                [self.input_ids, torch.full((extra,), self.pad_id, dtype=torch.int64)]
            )
            self.labels = torch.cat(
                [self.labels, torch.full((extra,), IGNORE_INDEX, dtype=torch.int64)]
            )
            self.position_ids = torch.cat(
                [self.position_ids, torch.arange(extra, dtype=torch.int64)]
            )
        return extra


def _cu(lengths: list[int]) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    if lengths:
        out[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0).to(torch.int32)
    return out


def collate_varlen(
    seqs: Sequence[TokenSeq], *, seq_len: int | None = None, pad_id: int = 0, cp_size: int = 1
) -> Batch:
    """flash-attn varlen layout: one row, `cu_seqlens` over (padded) sequences."""
    multiple = _check_cp(cp_size, seq_len)
    row = _Row(seqs, pad_id, multiple)
    tail = row.tail(seq_len)
    segments = row.padded + ([tail] if tail else [])
    return {
        "input_ids": row.input_ids[None],
        "position_ids": row.position_ids[None],
        "labels": row.labels[None],
        "cu_seqlens": _cu(segments),
        "max_seqlen": max(segments, default=0),
    }


def collate_thd(
    seqs: Sequence[TokenSeq], *, seq_len: int | None = None, pad_id: int = 0, cp_size: int = 1
) -> Batch:
    """Transformer Engine `thd` layout: `cu_seqlens` real boundaries, and with cp_size > 1
    `cu_seqlens_padded` the padded ones that lay out the row."""
    multiple = _check_cp(cp_size, seq_len)
    row = _Row(seqs, pad_id, multiple)
    tail = row.tail(seq_len)
    extra = [tail] if tail else []
    batch: Batch = {
        "input_ids": row.input_ids[None],
        "position_ids": row.position_ids[None],
        "labels": row.labels[None],
        "cu_seqlens": _cu(row.real + extra),
        "max_seqlen": max(row.padded + extra, default=0),
    }
    if multiple > 1:
        batch["cu_seqlens_padded"] = _cu(row.padded + extra)
    return batch


def collate_segment_ids(
    seqs: Sequence[TokenSeq], *, seq_len: int, pad_id: int = 0, cp_size: int = 1
) -> Batch:
    """One row of exactly seq_len tokens with segment ids 1..k (0: tail padding)."""
    multiple = _check_cp(cp_size, seq_len)
    row = _Row(seqs, pad_id, multiple)
    row.tail(seq_len)
    segment = torch.zeros(seq_len, dtype=torch.int64)
    if row.padded:
        ids = torch.arange(1, len(row.padded) + 1, dtype=torch.int64)
        used = torch.repeat_interleave(ids, torch.tensor(row.padded, dtype=torch.int64))
        segment[: used.numel()] = used
    return {
        "input_ids": row.input_ids[None],
        "position_ids": row.position_ids[None],
        "labels": row.labels[None],
        "segment_ids": segment[None],
    }


def collate_padded(
    seqs: Sequence[TokenSeq],
    *,
    max_len: int | None = None,
    pad_id: int = 0,
    cp_size: int = 1,
) -> Batch:
    """One row per sequence, right-padded to the longest (rounded up to 2 * cp_size when
    cp_size > 1) or to `max_len`."""
    multiple = _check_cp(cp_size, max_len, "max_len")
    tensors = [_as_tensor(s, i) for i, s in enumerate(seqs)]
    longest = max((int(t.numel()) for t in tensors), default=0)
    width = -(-longest // multiple) * multiple if max_len is None else max_len
    if longest > width:
        raise PackingError(f"a sequence has {longest} tokens, more than max_len={max_len}")
    k = len(tensors)
    input_ids = torch.full((k, width), pad_id, dtype=torch.int64)
    labels = torch.full((k, width), IGNORE_INDEX, dtype=torch.int64)
    mask = torch.zeros((k, width), dtype=torch.int64)
    for r, t in enumerate(tensors):
        n = int(t.numel())
        input_ids[r, :n] = t
        labels[r, : n - 1] = t[1:]
        mask[r, :n] = 1
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": torch.arange(width, dtype=torch.int64).expand(k, width).clone(),
        "attention_mask": mask,
    }


def collate(seqs: Sequence[TokenSeq], format: str, **kwargs: Any) -> Batch:
    """Dispatch on the plan's `packing { format = ... }` value."""
    fns: dict[str, Callable[..., Batch]] = {
        "varlen": collate_varlen,
        "thd": collate_thd,
        "segment_ids": collate_segment_ids,
        "padded": collate_padded,
    }
    if format not in fns:
        raise PackingError(f"unknown collate format {format!r}; choose one of {', '.join(FORMATS)}")
    return fns[format](seqs, **kwargs)
