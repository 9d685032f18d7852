"""`meshplan_flash`: packed attention through flash-attn's varlen kernel (GPU only).

Written against the documented API of flash-attn >= 2.6::

    flash_attn.flash_attn_varlen_func(
        q, k, v,                      # [total, H, D], [total, Hkv, D]; fp16/bf16, CUDA
        cu_seqlens_q, cu_seqlens_k,   # int32 [n+1]
        max_seqlen_q, max_seqlen_k,   # int
        dropout_p=0.0, softmax_scale=None, causal=False,
        window_size=(-1, -1),         # (left, right), inclusive; -1 = unbounded
        softcap=0.0,                  # 0.0 = off
    ) -> [total, H, D]

flash-attn is imported lazily, on the first call, so this module imports (and its
argument building is tested) on machines without it.

Guarantees:

- `flash_varlen_args` builds the kernel's arguments with `varlen.unpad` (the same
  segmentation as `meshplan_sdpa`: packing info first, then a 2-D padding mask, else
  one sequence per row), maps `sliding_window=W` to `window_size=(W-1, 0)` (causal:
  the query and the W-1 tokens before it, transformers' definition) and `softcap`
  to `softcap` (0.0 when absent). Fed to `reference.varlen_attention` — a PyTorch
  implementation of the same signature — these arguments reproduce `meshplan_sdpa`;
  the tests check that on CPU.
- Grouped-query heads are passed as they are (flash-attn broadcasts them).
- flash-attn runs in half precision only: fp32 inputs are cast to the autocast dtype
  when autocast is on, else to bfloat16, and the output is cast back.
- Context parallelism (a `runtime.attention.context.ContextParallelAttention` on the module): with
  `rotate = allgather` the local queries attend the all-gathered keys in ONE varlen
  call, the CP mask cut into per-segment pieces with bottom-right causal alignment
  (`cp_varlen.cp_varlen_args`; equal to `meshplan_sdpa`'s CP path, checked on CPU).
  With `rotate = ring`, and for non-causal sliding windows, the call goes to
  `ContextParallelAttention.attend`, meshplan's exact PyTorch path: flash-attn has no
  ring variant here.
- Attention sinks (`s_aux`) raise `NotImplementedError` on every path:
  `flash_attn_varlen_func` takes no sink logits; use `meshplan_sdpa` for such models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .context import ContextParallelAttention
from .cp_varlen import cp_varlen_attention
from .interface import AttentionCall, AttentionFunction, attention_function
from .varlen import Unpadded, unpad

__all__ = [
    "FlashVarlenArgs",
    "VarlenKernel",
    "flash_attention_forward",
    "flash_attn_varlen_kernel",
    "flash_varlen_args",
    "make_flash_attention",
]

# The signature of flash_attn_varlen_func, as this module calls it.
VarlenKernel = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class FlashVarlenArgs:
    """Everything `flash_attn_varlen_func` is called with, plus how to undo the layout."""

    layout: Unpadded
    dropout_p: float
    softmax_scale: float | None
    causal: bool
    window_size: tuple[int, int]
    softcap: float

    def call(self, kernel: VarlenKernel) -> torch.Tensor:
        """Run `kernel` (flash_attn_varlen_func or a stand-in) -> `[B, T, H, D]`."""
        lay = self.layout
        out = kernel(
            lay.query,
            lay.key,
            lay.value,
            lay.cu_seqlens,
            lay.cu_seqlens,
            lay.max_seqlen,
            lay.max_seqlen,
            dropout_p=self.dropout_p,
            softmax_scale=self.softmax_scale,
            causal=self.causal,
            window_size=self.window_size,
            softcap=self.softcap,
        )
        return lay.restore(out)


def flash_varlen_args(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    causal: bool = True,
    **kwargs: Any,
) -> FlashVarlenArgs:
    """The flash-attn varlen call for one attention layer (see the module docstring)."""
    layout = unpad(query, key, value, attention_mask, kwargs)
    if sliding_window:
        left = int(sliding_window) - 1
        window = (left, 0) if causal else (left, left)
    else:
        window = (-1, -1)
    return FlashVarlenArgs(
        layout=layout,
        dropout_p=float(dropout),
        softmax_scale=scaling,
        causal=causal,
        window_size=window,
        softcap=float(softcap) if softcap else 0.0,
    )


def _half_dtype(t: torch.Tensor) -> torch.dtype:
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.dtype
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return torch.bfloat16


def flash_attn_varlen_kernel(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any
) -> torch.Tensor:
    """`flash_attn.flash_attn_varlen_func`, imported on first use, in half precision."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as exc:  # reported by describe_backend before it gets here
        raise RuntimeError(
            "meshplan_flash needs the flash-attn package (pip install 'meshplan[gpu]' on a "
            f"CUDA machine); it cannot be imported: {exc}"
        ) from exc
    dtype = _half_dtype(q)
    out: torch.Tensor = flash_attn_varlen_func(
        q.to(dtype), k.to(dtype), v.to(dtype), *args, **kwargs
    )
    return out.to(q.dtype)


_NO_SINKS = "flash_attn_varlen_func takes no per-head sink logits"


def make_flash_attention(kernel: VarlenKernel) -> AttentionFunction:
    """A transformers attention function that runs `kernel` with flash-attn's varlen
    calling convention (the real kernel, or `reference.varlen_attention` in tests)."""

    def local(call: AttentionCall) -> torch.Tensor:
        call.refuse_sinks("meshplan_flash", _NO_SINKS)
        args = flash_varlen_args(
            call.query, call.key, call.value, call.attention_mask, dropout=call.dropout,
            scaling=call.scaling, sliding_window=call.sliding_window, softcap=call.softcap,
            causal=call.causal, **call.kwargs,
        )
        return args.call(kernel)

    def context_parallel(call: AttentionCall, cp: ContextParallelAttention) -> torch.Tensor:
        # The sequence is split over ranks (see runtime.parallel.context).
        call.refuse_sinks("meshplan_flash", _NO_SINKS)  # also on the ring path: the backend's contract
        return cp_varlen_attention(
            cp, call.query, call.key, call.value, call.kwargs, causal=call.causal,
            window=call.window, scaling=call.scaling, dropout=call.dropout,
            softcap=call.softcap, run=lambda pieces: pieces.call(kernel),
        )

    return attention_function("meshplan_flash", local=local, context_parallel=context_parallel)


flash_attention_forward = make_flash_attention(flash_attn_varlen_kernel)
