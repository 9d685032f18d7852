"""`meshplan_te`: packed attention through Transformer Engine's `thd` format (GPU only).

Written against Transformer Engine's documented `DotProductAttention`::

    attn = transformer_engine.pytorch.DotProductAttention(
        num_attention_heads, kv_channels, num_gqa_groups=kv_heads,
        attention_dropout=p, qkv_format="thd", attn_mask_type="padding_causal",
        softmax_scale=scale)
    out = attn(q, k, v,                                  # [total, H, D], [total, Hkv, D]
               qkv_format="thd", attn_mask_type="padding_causal",
               cu_seqlens_q=real, cu_seqlens_kv=real,     # int32 cumulated real lengths
               cu_seqlens_q_padded=offsets, cu_seqlens_kv_padded=offsets,  # int32 layout
               max_seqlen_q=m, max_seqlen_kv=m, window_size=(left, right))
    # out: [total, H * D]; padding positions are not attended to

Transformer Engine is imported lazily, on the first call.

Guarantees:

- `te_thd_args` builds those arguments with `varlen.unpad` (the segmentation of
  `meshplan_sdpa`). `cu_seqlens_q/kv` are the real cumulated lengths and
  `cu_seqlens_*_padded` the offsets that lay the tokens out: they differ only for a
  `thd` batch collated with context-parallel padding (`cu_seq_lens_q_padded`), and are
  otherwise equal. Fed to `reference.thd_attention`, these arguments reproduce
  `meshplan_sdpa` on every real token; the tests check that on CPU.
- `sliding_window=W` becomes `window_size=(W-1, 0)`; without a window, (-1, 0) for
  causal attention and (-1, -1) otherwise.
- Logit soft-capping (Gemma-2) raises `NotImplementedError`: `DotProductAttention` has
  no soft-cap; use `meshplan_flash` or `meshplan_sdpa` for such models.
- Context parallelism (a `runtime.attention.context.ContextParallelAttention` on the module): with
  `rotate = allgather`, `te_cp_args` lays the local queries and the all-gathered keys
  out in pieces as `cp_varlen.cp_varlen_args` does for flash-attn — the queries' and
  keys' boundaries now differ (`cu_seqlens_kv`), so the mask type is
  `padding_causal_bottom_right` (TE's `padding_causal` aligns the diagonal top-left)
  and `window_size=(W-1, 0)` is aligned with it. Fed to `reference.thd_attention`, this
  reproduces `meshplan_sdpa`'s CP path; the tests check that on CPU. With `rotate =
  ring`, and for non-causal sliding windows, the call goes to
  `ContextParallelAttention.attend` (meshplan's exact PyTorch path; TE's own context
  parallelism needs its own process groups and layout and is not used). Soft-capping
  still raises.
- Attention sinks (`s_aux`) raise `NotImplementedError` on every path: the
  `DotProductAttention` call above passes no sink logits; use `meshplan_sdpa`.
- One `DotProductAttention` per head layout is created and cached outside the model,
  so it never enters the model's state dict; fp32 inputs run in the autocast dtype or
  bfloat16 and the output is cast back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .context import ContextParallelAttention
from .cp_varlen import CpVarlenArgs, cp_varlen_attention
from .interface import AttentionCall, AttentionFunction, attention_function
from .varlen import Unpadded, unpad

__all__ = [
    "TEThdArgs",
    "make_te_attention",
    "te_attention_forward",
    "te_cp_args",
    "te_kernel",
    "te_thd_args",
]


@dataclass(frozen=True)
class TEThdArgs:
    """Everything a `DotProductAttention(qkv_format="thd")` call takes, and its layout."""

    layout: Unpadded
    heads: int
    kv_heads: int
    head_dim: int
    value_dim: int
    softmax_scale: float
    dropout: float
    attn_mask_type: str
    window_size: tuple[int, int]
    training: bool
    # Keys laid out apart from the queries (context parallelism, `te_cp_args`): their
    # boundaries in `layout.key`, no padding. None: the queries' boundaries.
    cu_seqlens_kv: torch.Tensor | None = None
    max_seqlen_kv: int | None = None

    def forward_kwargs(self) -> dict[str, Any]:
        lay = self.layout
        real_kv = lay.real_cu_seqlens if self.cu_seqlens_kv is None else self.cu_seqlens_kv
        padded_kv = lay.cu_seqlens if self.cu_seqlens_kv is None else self.cu_seqlens_kv
        return {
            "qkv_format": "thd",
            "attn_mask_type": self.attn_mask_type,
            "cu_seqlens_q": lay.real_cu_seqlens,
            "cu_seqlens_kv": real_kv,
            "cu_seqlens_q_padded": lay.cu_seqlens,
            "cu_seqlens_kv_padded": padded_kv,
            "max_seqlen_q": lay.max_seqlen,
            "max_seqlen_kv": lay.max_seqlen if self.max_seqlen_kv is None else self.max_seqlen_kv,
            "window_size": self.window_size,
        }

    def call(self, kernel: Callable[..., torch.Tensor]) -> torch.Tensor:
        """Run `kernel(q, k, v, **forward_kwargs())` -> `[B, T, H, Dv]`."""
        lay = self.layout
        return lay.restore(kernel(lay.query, lay.key, lay.value, **self.forward_kwargs()))


def te_thd_args(
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
    training: bool = False,
    **kwargs: Any,
) -> TEThdArgs:
    """The Transformer Engine `thd` call for one attention layer (see the module doc)."""
    _refuse_softcap(softcap)
    layout = unpad(query, key, value, attention_mask, kwargs)
    if sliding_window:
        window = (int(sliding_window) - 1, 0 if causal else int(sliding_window) - 1)
    else:
        window = (-1, 0) if causal else (-1, -1)
    return TEThdArgs(
        layout=layout,
        heads=query.shape[1],
        kv_heads=key.shape[1],
        head_dim=query.shape[-1],
        value_dim=value.shape[-1],
        softmax_scale=float(query.shape[-1] ** -0.5 if scaling is None else scaling),
        dropout=float(dropout),
        attn_mask_type="padding_causal" if causal else "padding",
        window_size=window,
        training=training,
    )


def _refuse_softcap(softcap: float | None) -> None:
    if softcap:
        raise NotImplementedError(
            "Transformer Engine's DotProductAttention has no attention logit soft-capping "
            f"(softcap={softcap}); use meshplan_flash or meshplan_sdpa for this model"
        )


def te_cp_args(pieces: CpVarlenArgs, *, training: bool = False) -> TEThdArgs:
    """The `thd` call for a context-parallel rank's pieces (`cp_varlen.cp_varlen_args`):
    queries and keys with their own boundaries, the causal diagonal bottom-right."""
    _refuse_softcap(pieces.softcap)
    if pieces.causal:
        mask_type = "padding_causal_bottom_right"
        window = (pieces.window_size[0], 0)  # (-1, 0) without a window
    else:
        mask_type, window = "padding", (-1, -1)  # cp_varlen has no non-causal windows
    query = pieces.query
    layout = Unpadded(
        query,
        pieces.key,
        pieces.value,
        cu_seqlens=pieces.cu_seqlens_q,
        real_cu_seqlens=pieces.cu_seqlens_q,
        max_seqlen=pieces.max_seqlen_q,
        indices=None,
        batch=pieces.batch,
        length=pieces.length,
    )
    scale = pieces.softmax_scale
    return TEThdArgs(
        layout=layout,
        heads=query.shape[1],
        kv_heads=pieces.key.shape[1],
        head_dim=query.shape[-1],
        value_dim=pieces.value.shape[-1],
        softmax_scale=float(query.shape[-1] ** -0.5 if scale is None else scale),
        dropout=pieces.dropout_p,
        attn_mask_type=mask_type,
        window_size=window,
        training=training,
        cu_seqlens_kv=pieces.cu_seqlens_k,
        max_seqlen_kv=pieces.max_seqlen_k,
    )


_modules: dict[tuple[Any, ...], nn.Module] = {}


def te_kernel(args: TEThdArgs) -> Callable[..., torch.Tensor]:
    """The cached `DotProductAttention` for `args`' head layout, in half precision."""
    try:
        import transformer_engine.pytorch as te
    except ImportError as exc:
        raise RuntimeError(
            "meshplan_te needs Transformer Engine (pip install 'meshplan[gpu]' on a CUDA "
            f"machine); it cannot be imported: {exc}"
        ) from exc
    key = (
        args.heads,
        args.kv_heads,
        args.head_dim,
        args.value_dim,
        args.softmax_scale,
        args.dropout,
        args.layout.query.device,
    )
    module = _modules.get(key)
    if module is None:
        channels: int | tuple[int, int] = (
            args.head_dim if args.head_dim == args.value_dim else (args.head_dim, args.value_dim)
        )
        module = te.DotProductAttention(
            args.heads,
            channels,
            num_gqa_groups=args.kv_heads,
            attention_dropout=args.dropout,
            qkv_format="thd",
            attn_mask_type=args.attn_mask_type,
            softmax_scale=args.softmax_scale,
        )
        _modules[key] = module
    # Not a submodule of the model, so model.train()/eval() does not reach it.
    module.train(args.training)

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> torch.Tensor:
        dtype = q.dtype
        if dtype not in (torch.float16, torch.bfloat16):
            half = (
                torch.get_autocast_dtype(q.device.type)
                if torch.is_autocast_enabled(q.device.type)
                else torch.bfloat16
            )
            q, k, v = q.to(half), k.to(half), v.to(half)
        out: torch.Tensor = module(q, k, v, **kw)
        return out.to(dtype)

    return run


_NO_SINKS = "its DotProductAttention call passes no per-head sink logits"


def make_te_attention(
    kernel_for: Callable[[TEThdArgs], Callable[..., torch.Tensor]],
) -> AttentionFunction:
    """A transformers attention function running `kernel_for(args)` with Transformer
    Engine's `thd` calling convention (the real module, or `reference.thd_attention`)."""

    def local(call: AttentionCall) -> torch.Tensor:
        call.refuse_sinks("meshplan_te", _NO_SINKS)
        args = te_thd_args(
            call.query, call.key, call.value, call.attention_mask, dropout=call.dropout,
            scaling=call.scaling, sliding_window=call.sliding_window, softcap=call.softcap,
            causal=call.causal, training=call.module.training, **call.kwargs,
        )
        return args.call(kernel_for(args))

    def context_parallel(call: AttentionCall, cp: ContextParallelAttention) -> torch.Tensor:
        # The sequence is split over ranks (see runtime.parallel.context).
        _refuse_softcap(call.softcap)  # also on the ring path: the backend's contract
        call.refuse_sinks("meshplan_te", _NO_SINKS)

        def run(pieces: CpVarlenArgs) -> torch.Tensor:
            cp_args = te_cp_args(pieces, training=call.module.training)
            return cp_args.call(kernel_for(cp_args))

        return cp_varlen_attention(
            cp, call.query, call.key, call.value, call.kwargs, causal=call.causal,
            window=call.window, scaling=call.scaling, dropout=call.dropout, softcap=None, run=run,
        )

    return attention_function("meshplan_te", local=local, context_parallel=context_parallel)


te_attention_forward = make_te_attention(te_kernel)
