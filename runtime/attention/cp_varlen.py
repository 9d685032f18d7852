"""Context-parallel attention through one varlen kernel call (flash-attn, Transformer Engine).

    local Q [B, H, Tl, D] ───────────────────┐                  ┌─▶ q: local tokens in order, cut in pieces
                                             ├─ cp_varlen_args ─┤
    gathered K/V [B, Hkv, T, D] (rank-major) ┘                  └─▶ k/v: each piece's keys, piece after piece

Under context parallelism with `rotate = allgather` (see `runtime.parallel.context`) a rank holds
`Tl = T / cp` queries of each row and, after the all-gather, all `T` keys in
`cp_key_index` order. `meshplan_sdpa` attends them with a dense `[Tl, T]` mask; the GPU
kernels take no mask, only segments. This module turns the CP mask into segments:

- A *piece* is a maximal run of local queries at consecutive row positions inside one
  segment. Under `load_balance = headtail` a rank holds two chunks of every segment,
  so each segment gives it at most two pieces (one when the chunks touch, on the
  middle rank); under `none` each segment the rank's contiguous slice meets gives one.
- Piece `[a, b)` of the segment `[s, e)` of row r attends the keys `[s, b)` of row r
  (natural row order) with the causal diagonal aligned to the bottom right: its query
  at row position a + i is the last but (b − a − 1 − i) of those keys, so it sees
  exactly the keys `s .. a + i` of its segment. That is flash-attn's varlen `causal`
  for `seqlen_k > seqlen_q` and Transformer Engine's `padding_causal_bottom_right`.
  With a sliding window W the keys start at `max(s, a − W + 1)` instead (the window
  (W−1, 0) is aligned to the same diagonal), so no key outside every window is copied.
- Non-causal attention keeps the keys `[s, e)` of the whole segment and `causal=False`.
  Non-causal attention with a sliding window cannot be written this way (the window is
  aligned to the bottom right, and the pieces end at different distances from their
  segment's end): `cp_varlen_supported` says so and `cp_varlen_attention` hands such a
  call to `ContextParallelAttention.attend`.

Guarantees:

- `cp_varlen_args(...).call(kernel)` returns `[B, Tl, H, Dv]`, equal (up to float
  summation order) to `ContextParallelAttention.attend`'s all-gather path, i.e. the
  masked SDPA with `CpLayout.mask` — for every token of the packed formats (`varlen`,
  `thd`, `segment_ids`). The CPU tests check it through `reference.varlen_attention`.
- The `padded` format (`cp_key_valid`, one segment per row): each row's segment is cut
  further into its runs of real tokens and of padding, so real tokens attend exactly
  the real tokens the CP mask allows, causal or not. Pad queries attend the pads of
  their run (finite outputs, but not the mask's "valid keys or itself"); their outputs
  carry no loss and no real token sees them. A segment whose real tokens are not one
  contiguous run raises `ValueError` (real tokens on both sides of a pad could not
  see each other without seeing it).
- The q tensor is the local tokens flattened `[B·Tl, H, D]` in order (every local
  token is in exactly one piece); k/v are `index_select`s of the gathered tokens —
  keys shared by the two pieces of a segment are copied twice, which the kernel does
  not mind. Everything is `reshape`/`index_select`: gradients flow to the local
  queries and the gathered K/V (and on through the all-gather's reduce-scatter).
- `cu_seqlens_q/k` are int32 on the query's device, `max_seqlen_q/k` Python ints
  bounding every piece; grouped-query heads are passed as they are.
- The pieces are built on the host from `cp_query_index`, `cp_key_index`,
  `cp_segment_ids` (and `cp_key_valid`): one device-to-host copy and two small
  host-to-device copies, once per forward pass — the plan is cached for the latest
  cp tensors (every layer receives the same ones), per (causal, window).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .context import ContextParallelAttention, CpLayout

__all__ = [
    "CpVarlenArgs",
    "cp_varlen_args",
    "cp_varlen_attention",
    "cp_varlen_supported",
]

# flash_attn_varlen_func's calling convention (see flash.py); defined here too so that
# this module does not import flash.py, which imports it.
Kernel = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class CpVarlenArgs:
    """One varlen kernel call for a rank's local queries over the gathered keys."""

    query: torch.Tensor  # [B*Tl, H, D], the local tokens in order
    key: torch.Tensor  # [total_k, Hkv, D], each piece's keys, piece after piece
    value: torch.Tensor  # [total_k, Hkv, Dv]
    cu_seqlens_q: torch.Tensor  # int32 [n+1], piece boundaries in `query`
    cu_seqlens_k: torch.Tensor  # int32 [n+1], piece boundaries in `key`/`value`
    max_seqlen_q: int
    max_seqlen_k: int
    dropout_p: float
    softmax_scale: float | None
    causal: bool
    window_size: tuple[int, int]  # flash-attn's (left, right), -1 = unbounded
    softcap: float  # 0.0 = off
    batch: int
    length: int  # Tl, local tokens per row

    @property
    def pieces(self) -> int:
        return int(self.cu_seqlens_q.numel()) - 1

    def restore(self, out: torch.Tensor) -> torch.Tensor:
        """Kernel output `[B*Tl, H, Dv]` (or `[B*Tl, H*Dv]`) -> `[B, Tl, H, Dv]`."""
        return out.reshape(self.batch, self.length, self.query.shape[1], -1)

    def call(self, kernel: Kernel) -> torch.Tensor:
        """Run `kernel` (flash_attn_varlen_func or a stand-in) -> `[B, Tl, H, Dv]`."""
        out = kernel(
            self.query,
            self.key,
            self.value,
            self.cu_seqlens_q,
            self.cu_seqlens_k,
            self.max_seqlen_q,
            self.max_seqlen_k,
            dropout_p=self.dropout_p,
            softmax_scale=self.softmax_scale,
            causal=self.causal,
            window_size=self.window_size,
            softcap=self.softcap,
        )
        return self.restore(out)


def cp_varlen_supported(*, causal: bool, window: int | None) -> bool:
    """Whether `cp_varlen_args` can express the call (all but non-causal windows)."""
    return causal or window is None


def cp_varlen_args(
    query: torch.Tensor,
    key_all: torch.Tensor,
    value_all: torch.Tensor,
    layout: CpLayout,
    *,
    causal: bool,
    window: int | None,
    scaling: float | None,
    dropout: float,
    softcap: float | None,
) -> CpVarlenArgs:
    """The varlen call for local queries `[B, H, Tl, D]` over the all-gathered keys and
    values `[B, Hkv, T, D]` in `layout.key_index` order (see the module docstring).

    Raises `NotImplementedError` for non-causal attention with a sliding window and
    `ValueError` for shapes that do not match the layout."""
    window = int(window) if window else None
    if not cp_varlen_supported(causal=causal, window=window):
        raise NotImplementedError(
            "a varlen kernel cannot express non-causal sliding-window attention under context "
            "parallelism; ContextParallelAttention.attend computes it exactly"
        )
    batch, heads, local, dim = query.shape
    length = int(layout.key_index.numel())
    if key_all.shape[0] != batch or key_all.shape[2] != length or value_all.shape[:3] != key_all.shape[:3]:
        raise ValueError(
            f"gathered keys {tuple(key_all.shape)} / values {tuple(value_all.shape)} do not hold "
            f"the {length} tokens of the {batch} rows of the context-parallel layout"
        )
    if local != layout.query_index.numel():
        raise ValueError(f"{local} local queries, but the layout places {layout.query_index.numel()}")
    plan = _plan_for(layout, batch, causal=causal, window=window, device=query.device)
    q = query.transpose(1, 2).reshape(batch * local, heads, dim).contiguous()

    def keys(t: torch.Tensor) -> torch.Tensor:
        # [B, Hkv, T, D] -> [B*T, Hkv, D] (a view when B == 1), then each piece's keys.
        return t.transpose(1, 2).reshape(batch * length, t.shape[1], t.shape[3]).index_select(0, plan.keys)

    # Causal whenever there is a window (cp_varlen_supported): the query and the W-1 keys
    # before it, on the bottom-right diagonal.
    window_size = (window - 1, 0) if window is not None else (-1, -1)
    return CpVarlenArgs(
        query=q,
        key=keys(key_all),
        value=keys(value_all),
        cu_seqlens_q=plan.cu_seqlens_q,
        cu_seqlens_k=plan.cu_seqlens_k,
        max_seqlen_q=plan.max_seqlen_q,
        max_seqlen_k=plan.max_seqlen_k,
        dropout_p=float(dropout),
        softmax_scale=scaling,
        causal=causal,
        window_size=window_size,
        softcap=float(softcap) if softcap else 0.0,
        batch=batch,
        length=local,
    )


def cp_varlen_attention(
    cp: ContextParallelAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kwargs: Mapping[str, Any],
    *,
    causal: bool,
    window: int | None,
    scaling: float | None,
    dropout: float,
    softcap: float | None,
    run: Callable[[CpVarlenArgs], torch.Tensor],
) -> torch.Tensor:
    """A GPU backend's context-parallel attention, `[B, Tl, H, Dv]`.

    `rotate = allgather`: gather K/V over the cp group and `run` the pieces' varlen call
    (`run(args)` calls the backend's kernel and returns `[B, Tl, H, Dv]`). `rotate =
    ring`, and non-causal sliding windows: `cp.attend`, meshplan's exact PyTorch path —
    the kernels have no ring variant here (a ring step would need the kernel's
    log-sum-exp per block, which these calling conventions do not return)."""
    if cp.rotate != "allgather" or not cp_varlen_supported(causal=causal, window=window):
        return cp.attend(query, key, value, kwargs, causal=causal, window=window, scaling=scaling,
                         dropout=dropout, softcap=softcap)
    layout = cp.layout(kwargs, query.shape[0], query.shape[2])
    key_all, value_all = cp.gather_kv(key, value)
    args = cp_varlen_args(query, key_all, value_all, layout, causal=causal, window=window,
                          scaling=scaling, dropout=dropout, softcap=softcap)
    return run(args)


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class _Plan:
    keys: torch.Tensor  # int64 [total_k]: indices into the gathered [B*T] tokens
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int


def _row_pieces(
    query_index: torch.Tensor, segments: torch.Tensor, valid: torch.Tensor | None, row: int,
    *, causal: bool, window: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row, on the host: (local index of each piece's first query, its first key,
    its key end), keys as row positions."""
    length = int(segments.numel())
    starts = torch.ones(length, dtype=torch.bool)
    starts[1:] = segments[1:] != segments[:-1]
    if valid is not None:
        runs = starts.clone()
        runs[1:] |= valid[1:] != valid[:-1]
        # Real tokens split by a pad inside one segment would need to see each other
        # across it: no run of keys expresses that.
        real_runs = torch.bincount((torch.cumsum(starts, 0) - 1)[runs & valid])
        if bool((real_runs > 1).any()):
            raise ValueError(
                f"row {row}: the real tokens of a segment are not one contiguous run (padding "
                "inside a sequence); a varlen kernel cannot skip it under context parallelism. "
                "Pad at one end of the row, or use meshplan_sdpa"
            )
        starts = runs
    begin = torch.nonzero(starts).flatten()
    sizes = torch.diff(torch.cat([begin, torch.tensor([length])]))
    start_of = torch.repeat_interleave(begin, sizes)
    end_of = start_of + torch.repeat_interleave(sizes, sizes)
    local = int(query_index.numel())
    seg_start = start_of[query_index]
    cut = torch.ones(local, dtype=torch.bool)
    cut[1:] = (query_index[1:] != query_index[:-1] + 1) | (seg_start[1:] != seg_start[:-1])
    first = torch.nonzero(cut).flatten()
    last = torch.cat([first[1:], torch.tensor([local])]) - 1
    a = query_index[first]
    s = seg_start[first]
    if not causal:
        return first, s, end_of[a]
    if window is not None:
        s = torch.maximum(s, a - (window - 1))
    return first, s, query_index[last] + 1


_Sources = tuple[torch.Tensor, ...]
# The cp tensors the cached plans were built from (weakly held, so that a freed tensor
# whose id is reused never hits), their version counters, and the plans per call shape.
_cache: dict[str, Any] = {"sources": (), "versions": (), "plans": {}}


def _cached_plans(sources: _Sources) -> dict[tuple[Any, ...], _Plan]:
    refs: tuple[weakref.ref[torch.Tensor], ...] = _cache["sources"]
    same = len(refs) == len(sources) and all(r() is t for r, t in zip(refs, sources, strict=True))
    versions = tuple(t._version for t in sources)
    if not same or _cache["versions"] != versions:
        # A new forward pass (or a new batch): keep only the latest cp tensors' plans.
        _cache["sources"] = tuple(weakref.ref(t) for t in sources)
        _cache["versions"] = versions
        _cache["plans"] = {}
    plans: dict[tuple[Any, ...], _Plan] = _cache["plans"]
    return plans


def _plan_for(layout: CpLayout, batch: int, *, causal: bool, window: int | None,
              device: torch.device) -> _Plan:
    sources: _Sources = (layout.query_index, layout.key_index, layout.segment_ids)
    if layout.key_valid is not None:
        sources = (*sources, layout.key_valid)
    plans = _cached_plans(sources)
    config = (batch, causal, window, device)
    plan = plans.get(config)
    if plan is None:
        plan = plans[config] = _build_plan(layout, batch, causal=causal, window=window, device=device)
    return plan


def _build_plan(layout: CpLayout, batch: int, *, causal: bool, window: int | None,
                device: torch.device) -> _Plan:
    local = int(layout.query_index.numel())
    length = int(layout.key_index.numel())
    # One device-to-host copy of everything the pieces depend on.
    parts = [layout.query_index.reshape(-1), layout.key_index.reshape(-1),
             layout.segment_ids.reshape(-1).to(layout.query_index.dtype)]
    if layout.key_valid is not None:
        parts.append(layout.key_valid.reshape(-1).to(layout.query_index.dtype))
    host = torch.cat([p.to(layout.query_index.device) for p in parts]).to("cpu", torch.int64)
    query_index, key_index = host[:local], host[local:local + length]
    rest = host[local + length:]
    segments = rest[:layout.segment_ids.numel()].view(-1, length)
    valid = rest[layout.segment_ids.numel():].view(-1, length).bool() if layout.key_valid is not None else None
    if valid is not None and valid.shape[0] != batch:
        raise ValueError(f"cp_key_valid has {valid.shape[0]} rows, the batch {batch}")
    inverse = torch.empty_like(key_index)
    inverse[key_index] = torch.arange(length)  # row position -> index among the gathered keys

    # Rows segmented alike share one plan, shifted; otherwise each row is planned.
    distinct = segments.shape[0] > 1 or valid is not None
    firsts, key_starts, key_ends, rows = [], [], [], []
    shared = None
    for r in range(batch):
        if distinct or shared is None:
            shared = _row_pieces(query_index, segments[r if segments.shape[0] > 1 else 0],
                                 None if valid is None else valid[r], r, causal=causal, window=window)
        first, ks, ke = shared
        firsts.append(first + r * local)
        key_starts.append(ks)
        key_ends.append(ke)
        rows.append(torch.full_like(ks, r))
    first = torch.cat(firsts)
    ks, ke, row = torch.cat(key_starts), torch.cat(key_ends), torch.cat(rows)
    sizes_k = ke - ks
    cu_k = torch.zeros(sizes_k.numel() + 1, dtype=torch.int64)
    cu_k[1:] = torch.cumsum(sizes_k, 0)
    # Row position of every copied key: each piece's range [ks, ke), piece after piece.
    offset = torch.arange(int(cu_k[-1])) - torch.repeat_interleave(cu_k[:-1], sizes_k)
    positions = torch.repeat_interleave(ks, sizes_k) + offset
    keys = torch.repeat_interleave(row, sizes_k) * length + inverse[positions]
    cu_q = torch.cat([first, torch.tensor([batch * local])])
    cu = torch.stack([cu_q, cu_k]).to(device=device, dtype=torch.int32)
    return _Plan(
        keys=keys.to(device),
        cu_seqlens_q=cu[0],
        cu_seqlens_k=cu[1],
        max_seqlen_q=int(torch.diff(cu_q).max()) if first.numel() else 0,
        max_seqlen_k=int(sizes_k.max()) if sizes_k.numel() else 0,
    )
