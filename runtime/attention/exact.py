"""The exact attention kernel every meshplan backend is checked against (PyTorch, CPU and GPU).

`attend(query, key, value, mask, ...)` is one masked attention of `[B, H, Tq, D]` queries
over `[B, Hkv, Tk, D]` keys and values: grouped-query heads repeated from the tensor
shapes, SDPA where it can, an explicit softmax in at least float32 where soft-capping or
attention sinks need it (a sink is one more logit in each query row's softmax, with no
value: it takes its share of the probability and is dropped, as in transformers' eager
attention; a row that sees no key then outputs zeros, not NaN). The
mask builders (`segment_mask`, `padding_mask`, `order_mask`) give the boolean patterns
the backends and the context-parallel attention combine. No module here knows about
transformers or context parallelism, so every other attention module may import it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["attend", "order_mask", "padding_mask", "repeat_kv_heads", "segment_mask"]


def repeat_kv_heads(key: torch.Tensor, query_heads: int) -> torch.Tensor:
    """Repeat `[B, Hkv, T, D]` key/value heads so query head h uses kv head h // group."""
    kv_heads = key.shape[1]
    if query_heads % kv_heads:
        raise ValueError(
            f"{query_heads} query heads cannot share {kv_heads} key/value heads evenly"
        )
    group = query_heads // kv_heads
    return key if group == 1 else key.repeat_interleave(group, dim=1)


def query_key_distance(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    # Queries are the last q_len keys (bottom-right alignment, as with a KV cache).
    q_idx = torch.arange(k_len - q_len, k_len, device=device)
    k_idx = torch.arange(k_len, device=device)
    return q_idx[:, None] - k_idx[None, :]


def window_and_order(
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
    distance = query_key_distance(t, t, ids.device)
    return window_and_order(same, distance, causal=causal, window=window)[:, None]


def padding_mask(
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
    distance = query_key_distance(q_len, k_len, attention_mask.device)
    allowed = window_and_order(keys[:, None, :], distance[None], causal=causal, window=window)
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
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, H, Tq, D] attention output; `mask` is boolean (True = attend) or additive;
    `sinks` ([H] logits, one per query head) join every row's softmax and are dropped."""
    key = repeat_kv_heads(key, query.shape[1])
    value = repeat_kv_heads(value, query.shape[1])
    if not softcap and sinks is None:
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=is_causal, scale=scale
        )
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if softcap:
        # Soft-capping precedes masking, as in Gemma-2's eager attention.
        scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        mask = window_and_order(
            torch.ones((), dtype=torch.bool, device=query.device),
            query_key_distance(query.shape[-2], key.shape[-2], query.device),
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
    if sinks is None:
        probs = torch.softmax(scores, dim=-1, dtype=acc)
    else:
        # The sink is an extra last column of logits (after scaling, capping, masking).
        sink = sinks.to(acc).reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores.to(acc), sink], dim=-1), dim=-1)[..., :-1]
    probs = probs.to(query.dtype)
    if dropout:
        probs = F.dropout(probs, p=dropout, training=True)
    return torch.matmul(probs, value)


def order_mask(q_len: int, k_len: int, device: torch.device, *, causal: bool,
               window: int | None) -> torch.Tensor:
    """Boolean `[q, k]` mask of causality and the sliding window alone (no segments)."""
    allowed = torch.ones((), dtype=torch.bool, device=device)
    return window_and_order(allowed, query_key_distance(q_len, k_len, device), causal=causal, window=window)
