"""`meshplan_sdpa`: exact block-diagonal causal attention in PyTorch (CPU and GPU).

The attention function registered as `meshplan_sdpa` (signature of transformers 5.23's
attention interface: `fn(module, query, key, value, attention_mask, **kwargs) ->
(output [B, T, H, D], None)`, with query `[B, H, T, D]` and key/value `[B, Hkv, T, D]`).

Guarantees:

- Packed input (packing info found by `layout.find_segments`: `cu_seq_lens_*`,
  `segment_ids`, or position ids restarting at 0): a token attends exactly to the
  earlier tokens of its own segment, and the mask is built here from that info. The
  model's own `attention_mask` is IGNORED then: under sequence parallelism the model
  builds it from a sharded length, while meshplan passes full-length packing info.
  The result equals running every sequence on its own, up to float summation order.
- Not packed: causal attention combined with the model's mask (a 2-D padding mask
  `[B, S]` as returned by meshplan's mask function, or a 4-D boolean or additive mask).
  Queries whose row would be fully masked (left padding) attend to themselves, so no
  NaN is produced; their outputs are padding and carry no loss.
- Grouped-query attention (fewer key/value heads, including the per-rank heads of tensor
  parallelism: the group size comes from the tensor shapes, not the module), sliding
  windows (`sliding_window=W`: a query sees itself and the W-1 tokens before it, as
  transformers' masks define it), logit soft-capping (`softcap`: `tanh(s / c) * c`
  before masking, computed explicitly since SDPA cannot), `scaling`, `dropout` (the
  model passes 0.0 in eval) and `is_causal=False`.
- Softmax runs in at least float32 on the soft-capping path (as transformers' eager
  attention does); otherwise `torch.nn.functional.scaled_dot_product_attention` decides.

- Context parallelism (a `runtime.cp.ContextParallelAttention` installed on the module
  by the plan's ContextParallel step): the call is handed to it, and the local queries
  attend exactly over the whole sequence (see `runtime.cp`).

The mask is a dense `[B, 1, T, T]` boolean tensor: this is the reference and the CPU
fallback, not a long-context kernel (use `meshplan_flash` or `meshplan_te` on GPUs).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..cp import context_parallel_of
from .layout import Segments, attention_causality, find_segments

__all__ = ["attend", "repeat_kv_heads", "sdpa_attention_forward", "segment_mask"]


def repeat_kv_heads(key: torch.Tensor, query_heads: int) -> torch.Tensor:
    """Repeat `[B, Hkv, T, D]` key/value heads so query head h uses kv head h // group."""
    kv_heads = key.shape[1]
    if query_heads % kv_heads:
        raise ValueError(
            f"{query_heads} query heads cannot share {kv_heads} key/value heads evenly"
        )
    group = query_heads // kv_heads
    return key if group == 1 else key.repeat_interleave(group, dim=1)


def _distance(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    # Queries are the last q_len keys (bottom-right alignment, as with a KV cache).
    q_idx = torch.arange(k_len - q_len, k_len, device=device)
    k_idx = torch.arange(k_len, device=device)
    return q_idx[:, None] - k_idx[None, :]


def _window_and_order(
    allowed: torch.Tensor, distance: torch.Tensor, *, causal: bool, window: int | None
) -> torch.Tensor:
    if causal:
        allowed = allowed & (distance >= 0)
    if window is not None:
        reach = distance if causal else distance.abs()
        allowed = allowed & (reach < window)
    return allowed


def segment_mask(
    ids: torch.Tensor, *, causal: bool = True, window: int | None = None
) -> torch.Tensor:
    """Boolean `[B, 1, T, T]` mask: True where query i may attend key j (same segment,
    j <= i when causal, i - j < window when given). `ids` is `[B, T]` segment ids."""
    same = ids[:, :, None] == ids[:, None, :]
    t = ids.shape[-1]
    distance = _distance(t, t, ids.device)
    return _window_and_order(same, distance, causal=causal, window=window)[:, None]


def _padding_mask(
    attention_mask: torch.Tensor,
    q_len: int,
    k_len: int,
    *,
    causal: bool,
    window: int | None,
) -> torch.Tensor:
    """A model-given mask as a boolean or additive `[B|1, 1|H, q, k]` mask."""
    if attention_mask.ndim == 4:
        # A prepared mask is the whole pattern already (transformers returns 4-D masks
        # as given); boolean or additive float are both accepted by SDPA.
        return attention_mask
    if attention_mask.ndim != 2:
        raise ValueError(
            f"attention_mask must be [batch, keys] or 4-D, got shape {tuple(attention_mask.shape)}"
        )
    keys = attention_mask[:, -k_len:].to(torch.bool)
    distance = _distance(q_len, k_len, attention_mask.device)
    allowed = _window_and_order(keys[:, None, :], distance[None], causal=causal, window=window)
    # A query that sees no key (left padding) would make softmax NaN: let it see itself.
    allowed = allowed | (distance == 0)[None]
    return allowed[:, None]


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    is_causal: bool,
    scale: float | None,
    dropout: float,
    softcap: float | None,
) -> torch.Tensor:
    """[B, H, Tq, D] attention output; `mask` is boolean (True = attend) or additive."""
    key = repeat_kv_heads(key, query.shape[1])
    value = repeat_kv_heads(value, query.shape[1])
    if not softcap:
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=is_causal, scale=scale
        )
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    # Soft-capping precedes masking, as in Gemma-2's eager attention.
    scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        mask = _window_and_order(
            torch.ones((), dtype=torch.bool, device=query.device),
            _distance(query.shape[-2], key.shape[-2], query.device),
            causal=True,
            window=None,
        )
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    # At least float32, as transformers' eager attention (never less precise than q).
    acc = torch.promote_types(query.dtype, torch.float32)
    probs = torch.softmax(scores, dim=-1, dtype=acc).to(query.dtype)
    if dropout:
        probs = F.dropout(probs, p=dropout, training=True)
    return torch.matmul(probs, value)


def sdpa_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The `meshplan_sdpa` attention function (see the module docstring)."""
    causal = attention_causality("meshplan_sdpa", module, is_causal, kwargs)
    window = int(sliding_window) if sliding_window else None
    cp = context_parallel_of(module)
    if cp is not None:  # the sequence is split over ranks: meshplan's exact CP attention
        out = cp.attend(query, key, value, kwargs, causal=causal, window=window, scaling=scaling,
                        dropout=dropout, softcap=softcap)
        return out, None
    batch, heads, q_len, _ = query.shape
    k_len = key.shape[2]
    segments: Segments | None = None
    if q_len == k_len:
        segments = find_segments(batch, q_len, query.device, kwargs)
    run = partial(attend, scale=scaling, dropout=dropout, softcap=softcap)
    if segments is not None and segments.crosses_rows and batch > 1:
        # Boundaries over the flattened batch (flash-attn varlen semantics): attend
        # over one row of B*T tokens so that a segment may continue across rows.
        def flat(t: torch.Tensor) -> torch.Tensor:
            return t.transpose(0, 1).reshape(1, t.shape[1], batch * q_len, t.shape[3])

        flat_mask = segment_mask(segments.ids[None], causal=causal, window=window)
        out = run(flat(query), flat(key), flat(value), flat_mask, is_causal=False)
        out = out.reshape(heads, batch, q_len, -1).transpose(0, 1)
        return out.transpose(1, 2).contiguous(), None
    mask: torch.Tensor | None = None
    if segments is not None:
        mask = segment_mask(segments.row_ids(), causal=causal, window=window)
    elif attention_mask is not None:
        mask = _padding_mask(attention_mask, q_len, k_len, causal=causal, window=window)
    elif window is not None or (causal and q_len != k_len):
        distance = _distance(q_len, k_len, query.device)
        allowed = torch.ones((), dtype=torch.bool, device=query.device)
        mask = _window_and_order(allowed, distance, causal=causal, window=window)
    # Without a mask (plain causal or full attention) SDPA's own flag picks its fastest kernel.
    out = run(query, key, value, mask, is_causal=mask is None and causal and q_len > 1)
    return out.transpose(1, 2).contiguous(), None
