"""Packed-sequence attention backends for transformers models.

    collated batch ──forward_kwargs()──▶ model(**kwargs) ──▶ each attention layer
                                                              ├─ meshplan_sdpa  (PyTorch, exact; CPU/GPU)
                                                              ├─ meshplan_flash (flash_attn_varlen_func)
                                                              └─ meshplan_te    (TE DotProductAttention, thd)

`use_backend(model, select_backend(device))` picks and installs one; `describe_backend`
says which and why for `plan explain` / `plan run`. Every backend reads the packing info
the same way (`layout.find_segments`: cu_seqlens, then segment ids, then position ids
restarting at 0) and so computes the same attention: a token sees exactly the earlier
tokens of its own sequence. `meshplan_sdpa` is the reference; the GPU backends' kernel
arguments are built by tested functions (`flash_varlen_args`, `te_thd_args`) that
reproduce it through the PyTorch stand-ins in `reference`. Attention sinks (`s_aux`,
one learned logit per head) are applied by `meshplan_sdpa` only; the GPU backends
refuse them.

Importing this package does not import transformers; `use_backend` and
`register_backends` register the backends (idempotently).
"""

from .exact import segment_mask
from .flash import flash_attention_forward, flash_varlen_args, make_flash_attention
from .layout import Segments, find_segments, forward_kwargs
from .reference import thd_attention, varlen_attention
from .registry import (
    BACKENDS,
    FLASH,
    SDPA,
    TE,
    BackendInfo,
    BackendUnavailable,
    available_backends,
    describe_backend,
    register_backend,
    register_backends,
    select_backend,
    use_backend,
)
from .sdpa import sdpa_attention_forward
from .te import make_te_attention, te_attention_forward, te_thd_args
from .varlen import Unpadded, unpad

__all__ = [
    "BACKENDS",
    "FLASH",
    "SDPA",
    "TE",
    "BackendInfo",
    "BackendUnavailable",
    "Segments",
    "Unpadded",
    "available_backends",
    "describe_backend",
    "find_segments",
    "flash_attention_forward",
    "flash_varlen_args",
    "forward_kwargs",
    "make_flash_attention",
    "make_te_attention",
    "register_backend",
    "register_backends",
    "sdpa_attention_forward",
    "segment_mask",
    "select_backend",
    "te_attention_forward",
    "te_thd_args",
    "thd_attention",
    "unpad",
    "use_backend",
    "varlen_attention",
]
