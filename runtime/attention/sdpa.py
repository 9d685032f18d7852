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
- Attention sinks (`s_aux=`, one learned logit per query head: GPT-OSS, MiMo-V2-Flash,
  Granite-SWA): in every case above, each query row's softmax gets the head's sink as
  one more logit, after scaling, soft-capping and masking, and the sink's probability
  is dropped (it has no value), as transformers' eager attention computes it.
- Softmax runs in at least float32 on the soft-capping and sink paths (as transformers'
  eager attention does); otherwise `torch.nn.functional.scaled_dot_product_attention`
  decides.

- Context parallelism (a `runtime.attention.context.ContextParallelAttention` installed on the module
  by the plan's ContextParallel step): the call is handed to it, and the local queries
  attend exactly over the whole sequence (see `runtime.parallel.context`), sinks
  included.

The mask is a dense `[B, 1, T, T]` boolean tensor: this is the reference and the CPU
fallback, not a long-context kernel (use `meshplan_flash` or `meshplan_te` on GPUs).
"""

from __future__ import annotations

from functools import partial

import torch

from .exact import attend, order_mask, padding_mask, segment_mask
from .interface import AttentionCall, attention_function
from .layout import Segments, find_segments

__all__ = ["sdpa_attention_forward"]


def _sdpa_local(call: AttentionCall) -> torch.Tensor:
    """The whole sequence is on this rank: the mask from packing info or the model's."""
    query, key, value = call.query, call.key, call.value
    causal, window, attention_mask, kwargs = call.causal, call.window, call.attention_mask, call.kwargs
    batch, heads, q_len, _ = query.shape
    k_len = key.shape[2]
    segments: Segments | None = None
    if q_len == k_len:
        segments = find_segments(batch, q_len, query.device, kwargs)
    run = partial(attend, scale=call.scaling, dropout=call.dropout, softcap=call.softcap,
                  sinks=call.sinks)
    if segments is not None and segments.crosses_rows and batch > 1:
        # Boundaries over the flattened batch (flash-attn varlen semantics): attend
        # over one row of B*T tokens so that a segment may continue across rows.
        def flat(t: torch.Tensor) -> torch.Tensor:
            return t.transpose(0, 1).reshape(1, t.shape[1], batch * q_len, t.shape[3])

        flat_mask = segment_mask(segments.ids[None], causal=causal, window=window)
        out = run(flat(query), flat(key), flat(value), flat_mask, is_causal=False)
        out = out.reshape(heads, batch, q_len, -1).transpose(0, 1)
        return out.transpose(1, 2).contiguous()
    mask: torch.Tensor | None = None
    if segments is not None:
        mask = segment_mask(segments.row_ids(), causal=causal, window=window)
    elif attention_mask is not None:
        mask = padding_mask(attention_mask, q_len, k_len, causal=causal, window=window)
    elif window is not None or (causal and q_len != k_len):
        mask = order_mask(q_len, k_len, query.device, causal=causal, window=window)
    # Without a mask (plain causal or full attention) SDPA's own flag picks its fastest kernel.
    out = run(query, key, value, mask, is_causal=mask is None and causal and q_len > 1)
    return out.transpose(1, 2).contiguous()


# The `meshplan_sdpa` attention function (see the module docstring).
sdpa_attention_forward = attention_function(
    "meshplan_sdpa", local=_sdpa_local, context_parallel=AttentionCall.context_parallel
)
