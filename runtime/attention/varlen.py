"""The unpadded token layout that varlen kernels (flash-attn, Transformer Engine) take.

`unpad(query, key, value, attention_mask, kwargs)` turns the `[B, H, T, D]` tensors a
transformers model hands its attention function into `[total, H, D]` tensors plus int32
cumulative boundaries, and `Unpadded.restore` puts the kernel's output back as
`[B, T, H, D]`.

Guarantees (the same segmentation rules as `meshplan_sdpa`, so the kernels compute the
same attention):

- Packing info present (`layout.find_segments`): every token is kept, in order, and
  the segments are its boundaries; the model's attention_mask is ignored. With
  `thd` padding (`cu_seq_lens_q_padded`), `cu_seqlens` are the padded boundaries (they
  lay the tokens out) and `real_cu_seqlens` the cumulated real lengths (TE's
  `cu_seqlens`); flash-attn gets the padded ones, where causality keeps a sequence's
  real tokens from seeing its trailing pads.
- Not packed, with a 2-D padding mask: only real tokens are kept (`indices`), each row
  one sequence; `restore` writes zeros at the padding positions.
- Not packed, no mask: each row is one sequence of T tokens.

Boundaries are int32 on the query's device; `max_seqlen` is a Python int bounding
every segment (from `max_length_q` when the caller passed it, else computed).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .layout import MAX_LENGTH_Q, find_segments

__all__ = ["Unpadded", "unpad"]


@dataclass(frozen=True)
class Unpadded:
    query: torch.Tensor  # [total, H, D]
    key: torch.Tensor  # [total, Hkv, D]
    value: torch.Tensor  # [total, Hkv, Dv]
    cu_seqlens: torch.Tensor  # int32 [n+1], layout boundaries in `query`
    real_cu_seqlens: torch.Tensor  # int32 [n+1], cumulated real lengths
    max_seqlen: int
    indices: torch.Tensor | None  # kept tokens in the flattened B*T stream (None: all)
    batch: int
    length: int

    def restore(self, out: torch.Tensor) -> torch.Tensor:
        """Kernel output `[total, H, Dv]` (or `[total, H*Dv]`) -> `[B, T, H, Dv]`."""
        heads = self.query.shape[1]
        out = out.reshape(out.shape[0], heads, -1)
        if self.indices is not None:
            full = out.new_zeros(self.batch * self.length, heads, out.shape[-1])
            out = full.index_copy(0, self.indices, out)
        return out.reshape(self.batch, self.length, heads, -1)


def _tokens(t: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> [B*T, H, D], contiguous (kernels need a unit last stride)."""
    b, h, s, d = t.shape
    return t.transpose(1, 2).reshape(b * s, h, d).contiguous()


def unpad(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    kwargs: Mapping[str, Any],
) -> Unpadded:
    """Lay `[B, H, T, D]` self-attention inputs out for a varlen kernel (see module doc)."""
    batch, _, length, _ = query.shape
    if key.shape[2] != length:
        raise ValueError(
            f"varlen attention needs queries and keys of one length (self-attention "
            f"without a KV cache), got {length} and {key.shape[2]}"
        )
    q, k, v = _tokens(query), _tokens(key), _tokens(value)
    segments = find_segments(batch, length, query.device, kwargs)
    if segments is not None:
        given = kwargs.get(MAX_LENGTH_Q)
        max_seqlen = int(given) if given is not None else segments.max_seqlen
        return Unpadded(
            q,
            k,
            v,
            cu_seqlens=segments.cu_seqlens,
            real_cu_seqlens=segments.real_cu_seqlens,
            max_seqlen=max(max_seqlen, segments.max_seqlen),
            indices=None,
            batch=batch,
            length=length,
        )
    device = query.device
    if attention_mask is not None and attention_mask.ndim == 2:
        keep = attention_mask[:, -length:].to(torch.bool)
        if not bool(keep.all()):
            lengths = keep.sum(dim=1, dtype=torch.int32)
            indices = torch.nonzero(keep.flatten()).flatten()
            cu = torch.zeros(batch + 1, dtype=torch.int32, device=device)
            cu[1:] = torch.cumsum(lengths, 0)
            return Unpadded(
                q.index_select(0, indices),
                k.index_select(0, indices),
                v.index_select(0, indices),
                cu_seqlens=cu,
                real_cu_seqlens=cu,
                max_seqlen=int(lengths.max()),
                indices=indices,
                batch=batch,
                length=length,
            )
    elif attention_mask is not None:
        raise ValueError(
            "varlen attention takes a 2-D padding mask or packing info, not a "
            f"{attention_mask.ndim}-D mask (register meshplan's mask function)"
        )
    cu = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device)
    return Unpadded(
        q,
        k,
        v,
        cu_seqlens=cu,
        real_cu_seqlens=cu,
        max_seqlen=length,
        indices=None,
        batch=batch,
        length=length,
    )
