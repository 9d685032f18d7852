"""Pure-PyTorch stand-ins for the GPU kernels, with their exact calling conventions.

flash-attn and Transformer Engine cannot run on CPU. Their backends therefore build the
kernel's arguments in a separate, tested step (`flash.flash_varlen_args`,
`te.te_thd_args`), and these two functions take exactly those arguments:

- `varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
  dropout_p, softmax_scale, causal, window_size, softcap)` — the documented signature
  and semantics of `flash_attn.flash_attn_varlen_func` (flash-attn >= 2.6): unpadded
  `[total, heads, head_dim]` tensors, int32 cumulative lengths, grouped-query heads,
  causal masks aligned to the bottom-right of each (q, k) block, `window_size=(left,
  right)` inclusive with -1 for unbounded, `softcap=0.0` for none.
- `thd_attention(q, k, v, cu_seqlens_q, cu_seqlens_kv, cu_seqlens_q_padded,
  cu_seqlens_kv_padded, max_seqlen_q, max_seqlen_kv, attn_mask_type, softmax_scale,
  window_size, qkv_format)` — Transformer Engine's `DotProductAttention` in `qkv_format="thd"`:
  sequence i holds the real tokens `[cu_padded[i], cu_padded[i] + len_i)` with
  `len_i = cu[i+1] - cu[i]`; the rest of its padded span is padding, never attended to,
  and its output is zero. Returns `[total, heads * head_dim]` like TE. Mask types:
  `padding` (no causal mask), `padding_causal` (TE aligns its diagonal to the top left:
  query i sees keys <= i) and `padding_causal_bottom_right` (query i sees keys <=
  i + len_kv - len_q); the two agree when a sequence's q and kv lengths do. The window
  is aligned with the diagonal (bottom-right for `padding`).

Both check the contract the real kernel relies on (dtypes, shapes, that `max_seqlen` is
an int bounding every segment, boundaries in range) and raise `ValueError` when it is
broken, so a CPU test catches what would be a silent GPU error. They loop over segments
and are meant for tests, not speed. Dropout is not modelled (p must be 0).
"""

from __future__ import annotations

from itertools import pairwise

import torch

__all__ = ["thd_attention", "varlen_attention"]


def _check_cu(name: str, cu: torch.Tensor, total: int) -> list[int]:
    if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.ndim != 1:
        raise ValueError(f"{name} must be a 1-D int32 tensor, got {cu!r}")
    values = [int(x) for x in cu.tolist()]
    if not values or values[0] != 0 or any(b < a for a, b in pairwise(values)):
        raise ValueError(f"{name} must start at 0 and be non-decreasing, got {values}")
    if values[-1] > total:
        raise ValueError(f"{name} ends at {values[-1]} but the tensor holds {total} tokens")
    return values


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError(
            f"q, k, v must be [total, heads, head_dim], got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape[:2] + k.shape[2:] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"incompatible q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads cannot share {k.shape[1]} key/value heads")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")


def _check_max(name: str, value: object, lengths: list[int]) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be a Python int, got {value!r}")
    longest = max(lengths, default=0)
    if value < longest:
        raise ValueError(f"{name}={value} is shorter than the longest segment ({longest})")


def _block(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    left: int,
    right: int,
    softcap: float,
    bottom_right: bool = True,
) -> torch.Tensor:
    """One segment: q [Lq, H, D], k/v [Lk, Hkv, D] -> [Lq, H, D]."""
    lq, lk = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    # Query i sits at key position i + (lk - lq) (bottom-right alignment), or i.
    offset = torch.arange(lq, device=q.device)[:, None] + (lk - lq if bottom_right else 0)
    j = torch.arange(lk, device=q.device)[None, :]
    allowed = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
    if causal:
        allowed &= j <= offset
    if left >= 0:
        allowed &= j >= offset - left
    if right >= 0:
        allowed &= j <= offset + right
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32))
    probs = torch.nan_to_num(probs, nan=0.0)  # a query with no key outputs zeros
    return torch.einsum("hqk,khd->qhd", probs.to(v.dtype), v)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
) -> torch.Tensor:
    """`flash_attn_varlen_func` in PyTorch; returns `[total_q, heads, head_dim]`."""
    _check_qkv(q, k, v)
    cq = _check_cu("cu_seqlens_q", cu_seqlens_q, q.shape[0])
    ck = _check_cu("cu_seqlens_k", cu_seqlens_k, k.shape[0])
    if len(cq) != len(ck):
        raise ValueError(f"cu_seqlens_q has {len(cq)} entries, cu_seqlens_k {len(ck)}")
    _check_max("max_seqlen_q", max_seqlen_q, [b - a for a, b in pairwise(cq)])
    _check_max("max_seqlen_k", max_seqlen_k, [b - a for a, b in pairwise(ck)])
    if dropout_p:
        raise ValueError("the reference does not model dropout; pass dropout_p=0.0")
    if not (isinstance(window_size, tuple) and len(window_size) == 2):
        raise ValueError(f"window_size must be a (left, right) tuple, got {window_size!r}")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    for i in range(len(cq) - 1):
        if cq[i + 1] == cq[i]:
            continue
        out[cq[i] : cq[i + 1]] = _block(
            q[cq[i] : cq[i + 1]],
            k[ck[i] : ck[i + 1]],
            v[ck[i] : ck[i + 1]],
            scale=scale,
            causal=causal,
            left=window_size[0],
            right=window_size[1],
            softcap=softcap,
        )
    return out


_THD_MASKS = ("padding", "padding_causal", "padding_causal_bottom_right")


def thd_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_kv: torch.Tensor,
    cu_seqlens_q_padded: torch.Tensor,
    cu_seqlens_kv_padded: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_kv: int,
    attn_mask_type: str = "padding_causal",
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, 0),
    qkv_format: str = "thd",
) -> torch.Tensor:
    """Transformer Engine `thd` attention in PyTorch; returns `[total, heads * head_dim]`."""
    if qkv_format != "thd":
        raise ValueError(f"this reference implements qkv_format='thd' only, got {qkv_format!r}")
    _check_qkv(q, k, v)
    if attn_mask_type not in _THD_MASKS:
        raise ValueError(f"thd attention needs a padding mask type, got {attn_mask_type!r}")
    real_q = _check_cu("cu_seqlens_q", cu_seqlens_q, q.shape[0])
    real_k = _check_cu("cu_seqlens_kv", cu_seqlens_kv, k.shape[0])
    pad_q = _check_cu("cu_seqlens_q_padded", cu_seqlens_q_padded, q.shape[0])
    pad_k = _check_cu("cu_seqlens_kv_padded", cu_seqlens_kv_padded, k.shape[0])
    if not len(real_q) == len(real_k) == len(pad_q) == len(pad_k):
        raise ValueError("the four cu_seqlens tensors must describe the same number of sequences")
    lens_q = [b - a for a, b in pairwise(real_q)]
    lens_k = [b - a for a, b in pairwise(real_k)]
    for i, (lq, lk) in enumerate(zip(lens_q, lens_k, strict=True)):
        if pad_q[i] + lq > pad_q[i + 1] or pad_k[i] + lk > pad_k[i + 1]:
            raise ValueError(f"sequence {i}: its real length exceeds its padded span")
    _check_max("max_seqlen_q", max_seqlen_q, lens_q)
    _check_max("max_seqlen_kv", max_seqlen_kv, lens_k)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    for i, (lq, lk) in enumerate(zip(lens_q, lens_k, strict=True)):
        if lq == 0:
            continue
        sq, sk = pad_q[i], pad_k[i]
        out[sq : sq + lq] = _block(
            q[sq : sq + lq],
            k[sk : sk + lk],
            v[sk : sk + lk],
            scale=scale,
            causal=attn_mask_type != "padding",
            left=window_size[0],
            right=window_size[1],
            softcap=0.0,
            bottom_right=attn_mask_type != "padding_causal",
        )
    return out.reshape(q.shape[0], -1)
