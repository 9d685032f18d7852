"""Context-parallel attention through the varlen kernels (`attention.cp_varlen`), on CPU.

Every rank of a cp split is simulated in one process: `shard_batch` gives each rank's
`cp_*` layout, the local queries are the full queries at `cp_query_index` and the
"all-gathered" keys the full keys at `cp_key_index` — exactly what the all-gather
returns — so no process group is needed. The pieces' call, run through
`reference.varlen_attention` (flash-attn's contract) or `reference.thd_attention`
(Transformer Engine's), must equal the exact CP path (`sdpa.attend` with
`CpLayout.mask`) in outputs and gradients, and the ranks' outputs put together must
equal `meshplan_sdpa` over the whole row. The backends' dispatch (all-gather → kernel,
ring → `ContextParallelAttention.attend`) is checked with a 1-rank gloo group.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from meshplan.runtime.attention import (
    forward_kwargs,
    make_flash_attention,
    make_te_attention,
    sdpa_attention_forward,
    thd_attention,
    varlen_attention,
)
from meshplan.runtime.attention.context import CP_ATTRIBUTE, ContextParallelAttention, CpLayout
from meshplan.runtime.attention.cp_varlen import CpVarlenArgs, cp_varlen_args
from meshplan.runtime.attention.exact import attend
from meshplan.runtime.attention.te import TEThdArgs, te_cp_args
from meshplan.runtime.packing import collate
from meshplan.runtime.parallel.context import ContextSplit, LoadBalance, Rotate, shard_batch

T = 64  # row length of the packed formats
HEADS, KV_HEADS, DIM = 4, 2, 8  # grouped-query attention
SCALE = 0.3
FORMATS = ("varlen", "thd", "segment_ids", "padded")
BALANCES: tuple[LoadBalance, ...] = ("headtail", "none")
ROTATIONS: tuple[Rotate, ...] = ("allgather", "ring")


class _Module(nn.Module):
    """Stands in for a transformers attention module (the backends read `is_causal`)."""

    is_causal = True


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def _seqs(*lengths: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(1, 256, (n,), generator=g) for n in lengths]


def _batch(fmt: str, split: ContextSplit) -> dict[str, Any]:
    """Four sequences (one crosses a sliding window of 5, one is a single token)."""
    seqs = _seqs(13, 4, 9, 1)
    if fmt == "padded":
        # Rows of 16: a multiple of 2·cp (headtail) and of cp (none) for cp in 2, 4.
        return collate(seqs, fmt, max_len=16, cp_size=split.collate_cp_size)
    return collate(seqs, fmt, seq_len=T, cp_size=split.collate_cp_size)


def _qkv(batch: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, HEADS, length, DIM, generator=g, dtype=torch.float64)
    k = torch.randn(batch, KV_HEADS, length, DIM, generator=g, dtype=torch.float64)
    v = torch.randn(batch, KV_HEADS, length, DIM, generator=g, dtype=torch.float64)
    return q, k, v


def _layout(batch: dict[str, Any], split: ContextSplit, rank: int) -> CpLayout:
    local = shard_batch(batch, split, rank)
    rows, length = batch["input_ids"].shape
    return CpLayout.of(local, rows, length // split.size, split.size, "test")


def _real(layout: CpLayout, rows: int) -> torch.Tensor:
    """[B, Tl] bool: the local tokens whose outputs are defined (all but `padded` pads)."""
    if layout.key_valid is None:
        return torch.ones(rows, layout.query_index.numel(), dtype=torch.bool)
    return layout.key_valid[:, layout.query_index]


def _exact(q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, layout: CpLayout, *,
           causal: bool, window: int | None, softcap: float | None) -> torch.Tensor:
    """The all-gather path of `ContextParallelAttention.attend`, [B, Tl, H, D]."""
    mask = layout.mask(layout.key_index, causal=causal, window=window)
    out = attend(q, k_all, v_all, mask, is_causal=False, scale=SCALE, dropout=0.0, softcap=softcap)
    return out.transpose(1, 2)


def _pieces(q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, layout: CpLayout, *,
            causal: bool, window: int | None, softcap: float | None) -> CpVarlenArgs:
    return cp_varlen_args(q, k_all, v_all, layout, causal=causal, window=window, scaling=SCALE,
                          dropout=0.0, softcap=softcap)


def _grads(out: torch.Tensor, weight: torch.Tensor, real: torch.Tensor,
           leaves: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    loss = (out * weight)[real].sum()
    # Both paths share the slicing of q, k, v: keep it for the other path's backward.
    return torch.autograd.grad(loss, leaves, retain_graph=True)


# --------------------------------------------------------------------------- pieces


def test_pieces_of_a_headtail_split() -> None:
    """Two sequences of 8 on 2 ranks: rank 0 holds chunks 0 and 3 of each (four
    pieces), rank 1 chunks 1 and 2, which touch (one piece per sequence)."""
    batch = collate(_seqs(8, 8), "varlen", seq_len=16, cp_size=2)
    q, k, v = _qkv(1, 16)
    expected = {
        # rank: (cu_seqlens_q, cu_seqlens_k, with window 3)
        0: ([0, 2, 4, 6, 8], [0, 2, 10, 12, 20], [0, 2, 6, 8, 12]),
        1: ([0, 4, 8], [0, 6, 12], [0, 6, 12]),
    }
    for rank, (cu_q, cu_k, cu_k_window) in expected.items():
        lay = _layout(batch, ContextSplit(2), rank)
        qi, ki = lay.query_index, lay.key_index
        args = _pieces(q[:, :, qi], k[:, :, ki], v[:, :, ki], lay, causal=True, window=None, softcap=None)
        assert args.cu_seqlens_q.tolist() == cu_q and args.cu_seqlens_k.tolist() == cu_k
        # Piece [6, 8) of rank 0 sees keys [0, 8); its window of 3 only keys [4, 8).
        windowed = _pieces(q[:, :, qi], k[:, :, ki], v[:, :, ki], lay, causal=True, window=3, softcap=None)
        assert windowed.cu_seqlens_k.tolist() == cu_k_window
        assert windowed.window_size == (2, 0)
    # The keys are the gathered ones in row order: rank 0's second piece sees row 0..7.
    lay = _layout(batch, ContextSplit(2), 0)
    args = _pieces(q[:, :, lay.query_index], k[:, :, lay.key_index], v[:, :, lay.key_index], lay,
                   causal=True, window=None, softcap=None)
    torch.testing.assert_close(args.key[2:10], k[0, :, :8].transpose(0, 1), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("load_balance", BALANCES)
@pytest.mark.parametrize(("window", "softcap"), [(None, None), (5, None), (None, 4.0), (3, 2.0)])
def test_pieces_equal_the_cp_mask_in_outputs_and_gradients(
    fmt: str, cp: int, load_balance: LoadBalance, window: int | None, softcap: float | None
) -> None:
    split = ContextSplit(cp, load_balance)
    batch = _batch(fmt, split)
    rows, length = batch["input_ids"].shape
    q, k, v = (t.requires_grad_() for t in _qkv(rows, length))
    g = torch.Generator().manual_seed(1)
    whole = torch.zeros(rows, length, HEADS, DIM, dtype=torch.float64)
    for rank in range(cp):
        lay = _layout(batch, split, rank)
        qi, ki = lay.query_index, lay.key_index
        q_local, k_all, v_all = q[:, :, qi], k[:, :, ki], v[:, :, ki]
        args = _pieces(q_local, k_all, v_all, lay, causal=True, window=window, softcap=softcap)
        got = args.call(varlen_attention)  # raises ValueError if the kernel contract is broken
        expected = _exact(q_local, k_all, v_all, lay, causal=True, window=window, softcap=softcap)
        real = _real(lay, rows)
        assert got.shape == (rows, length // cp, HEADS, DIM)
        _close(got[real], expected[real])
        assert torch.isfinite(got).all()
        weight = torch.randn(got.shape, generator=g, dtype=torch.float64)
        for grad, exact in zip(_grads(got, weight, real, (q, k, v)),
                               _grads(expected, weight, real, (q, k, v)), strict=True):
            _close(grad, exact)
        whole[:, qi] = got.detach()
    # All ranks together are one process's attention over the whole row.
    kwargs = {n: t for n, t in forward_kwargs(batch).items() if n not in ("input_ids", "attention_mask")}
    mask = batch.get("attention_mask")
    one, _ = sdpa_attention_forward(_Module(), q.detach(), k.detach(), v.detach(), mask, scaling=SCALE,
                                    sliding_window=window, softcap=softcap, **kwargs)
    real_row = mask.bool() if mask is not None else torch.ones(rows, length, dtype=torch.bool)
    _close(whole[real_row], one[real_row])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("load_balance", BALANCES)
def test_non_causal_pieces_see_their_whole_segment(fmt: str, load_balance: LoadBalance) -> None:
    split = ContextSplit(2, load_balance)
    batch = _batch(fmt, split)
    rows, length = batch["input_ids"].shape
    q, k, v = _qkv(rows, length, seed=2)
    for rank in range(2):
        lay = _layout(batch, split, rank)
        qi, ki = lay.query_index, lay.key_index
        args = _pieces(q[:, :, qi], k[:, :, ki], v[:, :, ki], lay, causal=False, window=None, softcap=None)
        assert args.causal is False and args.window_size == (-1, -1)
        got = args.call(varlen_attention)
        expected = _exact(q[:, :, qi], k[:, :, ki], v[:, :, ki], lay, causal=False, window=None, softcap=None)
        real = _real(lay, rows)
        _close(got[real], expected[real])


def test_non_causal_windows_are_refused() -> None:
    batch = _batch("varlen", ContextSplit(2))
    lay = _layout(batch, ContextSplit(2), 0)
    q, k, v = _qkv(1, T)
    with pytest.raises(NotImplementedError, match="non-causal sliding-window"):
        _pieces(q[:, :, lay.query_index], k, v, lay, causal=False, window=4, softcap=None)


def test_left_padding_keeps_real_tokens_exact_and_holes_are_refused() -> None:
    """The padded format's real tokens are cut from the pads: with left padding a real
    token sees only the real tokens before it, as the CP mask says."""
    ids = torch.arange(1, 17).repeat(2, 1)
    left = torch.tensor([[0] * 5 + [1] * 11, [1] * 16])
    batch = {"input_ids": ids, "attention_mask": left}
    q, k, v = _qkv(2, 16, seed=4)
    for load_balance in BALANCES:
        split = ContextSplit(2, load_balance)
        for rank in range(2):
            lay = _layout(batch, split, rank)
            qi, ki = lay.query_index, lay.key_index
            for causal in (True, False):
                args = _pieces(q[:, :, qi], k[:, :, ki], v[:, :, ki], lay, causal=causal, window=None,
                               softcap=None)
                got = args.call(varlen_attention)
                expected = _exact(q[:, :, qi], k[:, :, ki], v[:, :, ki], lay, causal=causal, window=None,
                                  softcap=None)
                real = _real(lay, 2)
                _close(got[real], expected[real])
    hole = {"input_ids": ids[:1], "attention_mask": torch.tensor([[1] * 4 + [0] * 2 + [1] * 10])}
    lay = _layout(hole, ContextSplit(2), 0)
    with pytest.raises(ValueError, match="not one contiguous run"):
        _pieces(q[:1, :, lay.query_index], k[:1, :, lay.key_index], v[:1, :, lay.key_index], lay,
                causal=True, window=None, softcap=None)


def test_the_kernel_contract_is_respected() -> None:
    split = ContextSplit(4)
    batch = _batch("thd", split)
    q, k, v = _qkv(1, T)
    lay = _layout(batch, split, 1)
    args = _pieces(q[:, :, lay.query_index], k[:, :, lay.key_index], v[:, :, lay.key_index], lay,
                   causal=True, window=5, softcap=3.0)
    assert args.query.shape == (T // 4, HEADS, DIM) and args.query.is_contiguous()
    assert args.key.shape[1] == KV_HEADS and args.key.is_contiguous()  # GQA heads not repeated
    for cu in (args.cu_seqlens_q, args.cu_seqlens_k):
        assert cu.dtype == torch.int32 and cu.device == q.device
    assert args.cu_seqlens_q.numel() == args.cu_seqlens_k.numel() == args.pieces + 1
    assert int(args.cu_seqlens_q[-1]) == T // 4 and int(args.cu_seqlens_k[-1]) == args.key.shape[0]
    assert type(args.max_seqlen_q) is int and type(args.max_seqlen_k) is int
    assert args.max_seqlen_q == int(torch.diff(args.cu_seqlens_q).max())
    assert args.max_seqlen_k == int(torch.diff(args.cu_seqlens_k).max())
    assert args.softcap == 3.0 and args.softmax_scale == SCALE and args.dropout_p == 0.0
    # Head-tail: at most two pieces per segment on a rank (four segments with the tail).
    assert args.pieces <= 2 * 5
    # The reference checks what the kernel relies on: a broken call is an error.
    with pytest.raises(ValueError, match="shorter than the longest segment"):
        dataclasses.replace(args, max_seqlen_k=args.max_seqlen_k - 1).call(varlen_attention)
    with pytest.raises(ValueError, match="int32"):
        dataclasses.replace(args, cu_seqlens_k=args.cu_seqlens_k.long()).call(varlen_attention)


def test_the_plan_is_rebuilt_for_new_cp_tensors() -> None:
    """The host-built plan is cached per forward pass; another batch gets its own."""
    split = ContextSplit(2)
    q, k, v = _qkv(1, T)
    first = _layout(_batch("varlen", split), split, 0)
    other_batch = collate(_seqs(30, 2), "varlen", seq_len=T, cp_size=2)
    other = _layout(other_batch, split, 0)
    for lay in (first, other, first):
        qi, ki = lay.query_index, lay.key_index
        got = _pieces(q[:, :, qi], k[:, :, ki], v[:, :, ki], lay, causal=True, window=None,
                      softcap=None).call(varlen_attention)
        expected = _exact(q[:, :, qi], k[:, :, ki], v[:, :, ki], lay, causal=True, window=None, softcap=None)
        _close(got, expected)


# --------------------------------------------------------------------------- Transformer Engine


def _te_reference(args: TEThdArgs) -> Callable[..., torch.Tensor]:
    return functools.partial(thd_attention, softmax_scale=args.softmax_scale)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("window", [None, 5])
def test_te_pieces_equal_the_cp_mask(fmt: str, window: int | None) -> None:
    split = ContextSplit(2)
    batch = _batch(fmt, split)
    rows, length = batch["input_ids"].shape
    q, k, v = _qkv(rows, length, seed=5)
    for rank in range(2):
        lay = _layout(batch, split, rank)
        qi, ki = lay.query_index, lay.key_index
        pieces = _pieces(q[:, :, qi], k[:, :, ki], v[:, :, ki], lay, causal=True, window=window, softcap=None)
        args = te_cp_args(pieces)
        call = args.forward_kwargs()
        assert call["attn_mask_type"] == "padding_causal_bottom_right"
        assert call["window_size"] == ((window - 1, 0) if window else (-1, 0))
        assert call["cu_seqlens_kv"] is pieces.cu_seqlens_k and call["max_seqlen_kv"] == pieces.max_seqlen_k
        assert call["cu_seqlens_q_padded"] is pieces.cu_seqlens_q
        got = args.call(_te_reference(args))
        expected = _exact(q[:, :, qi], k[:, :, ki], v[:, :, ki], lay, causal=True, window=window, softcap=None)
        real = _real(lay, rows)
        _close(got[real], expected[real])
        if rank == 0:  # the negative control: TE's top-left `padding_causal` is wrong here
            top_left = dataclasses.replace(args, attn_mask_type="padding_causal")
            assert not torch.allclose(top_left.call(_te_reference(args)), expected, atol=1e-3)


def test_te_refuses_softcapping_under_cp() -> None:
    split = ContextSplit(2)
    lay = _layout(_batch("varlen", split), split, 0)
    q, k, v = _qkv(1, T)
    pieces = _pieces(q[:, :, lay.query_index], k, v, lay, causal=True, window=None, softcap=5.0)
    with pytest.raises(NotImplementedError, match="soft-capping"):
        te_cp_args(pieces)


# --------------------------------------------------------------------------- backends


@pytest.fixture(scope="module")
def one_rank() -> Iterator[dist.ProcessGroup]:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        group = dist.new_group([0])
        assert group is not None
        yield group
    finally:
        dist.destroy_process_group()


# One rank holds the whole row. (`load_balance = none`: `owners` under headtail asks for
# segments of an even length even when cp = 1.)
ONE = ContextSplit(1, "none")


@dataclasses.dataclass
class _Calls:
    attend: int = 0
    kernel: int = 0


def _cp_module(group: dist.ProcessGroup, rotate: Rotate, calls: _Calls,
               monkeypatch: pytest.MonkeyPatch) -> nn.Module:
    cp = ContextParallelAttention(group=group, size=1, rank=0, rotate=rotate,
                                  fqn="model.layers.0.self_attn")
    exact = cp.attend

    def attend_spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.attend += 1
        return exact(*args, **kwargs)

    monkeypatch.setattr(cp, "attend", attend_spy)
    module = _Module()
    setattr(module, CP_ATTRIBUTE, cp)
    return module


def _backends(calls: _Calls) -> dict[str, Callable[..., tuple[torch.Tensor, None]]]:
    def kernel(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.kernel += 1
        return varlen_attention(*args, **kwargs)

    def te_kernel(args: TEThdArgs) -> Callable[..., torch.Tensor]:
        reference = _te_reference(args)

        def run(*a: Any, **kw: Any) -> torch.Tensor:
            calls.kernel += 1
            return reference(*a, **kw)

        return run

    return {"flash": make_flash_attention(kernel), "te": make_te_attention(te_kernel)}


@pytest.mark.parametrize("backend", ["flash", "te"])
@pytest.mark.parametrize("rotate", ROTATIONS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_backends_under_one_rank_cp_equal_meshplan_sdpa(
    one_rank: dist.ProcessGroup, monkeypatch: pytest.MonkeyPatch, backend: str, rotate: Rotate, fmt: str
) -> None:
    """cp size 1: the local batch is the whole row, so the backend's CP path must equal
    `meshplan_sdpa` on the full batch; all-gather runs the kernel, ring `cp.attend`."""
    calls = _Calls()
    module = _cp_module(one_rank, rotate, calls, monkeypatch)
    attention = _backends(calls)[backend]
    batch = _batch(fmt, ONE)
    local = shard_batch(batch, ONE, 0)
    rows, length = batch["input_ids"].shape
    q, k, v = (t.requires_grad_() for t in _qkv(rows, length, seed=6))
    window, softcap = (5, 2.0) if backend == "flash" else (5, None)
    kwargs = {n: t for n, t in forward_kwargs(local).items() if n != "input_ids"}
    got, _ = attention(module, q, k, v, None, scaling=SCALE, sliding_window=window, softcap=softcap,
                       **kwargs)
    assert (calls.kernel, calls.attend) == ((1, 0) if rotate == "allgather" else (0, 1))
    full = {n: t for n, t in forward_kwargs(batch).items() if n not in ("input_ids", "attention_mask")}
    mask = batch.get("attention_mask")
    expected, _ = sdpa_attention_forward(_Module(), q, k, v, mask, scaling=SCALE, sliding_window=window,
                                         softcap=softcap, **full)
    real = mask.bool() if mask is not None else torch.ones(rows, length, dtype=torch.bool)
    _close(got[real], expected[real])
    # Gradients flow through the all-gather (and its reduce-scatter) to q, k and v.
    weight = torch.randn(got.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    for grad, exact in zip(_grads(got, weight, real, (q, k, v)),
                           _grads(expected, weight, real, (q, k, v)), strict=True):
        _close(grad, exact)


def test_non_causal_windows_fall_back_to_the_exact_path(
    one_rank: dist.ProcessGroup, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _Calls()
    module = _cp_module(one_rank, "allgather", calls, monkeypatch)
    batch = _batch("varlen", ONE)
    kwargs = {n: t for n, t in forward_kwargs(shard_batch(batch, ONE, 0)).items()
              if n != "input_ids"}
    q, k, v = _qkv(1, T)
    for attention in _backends(calls).values():
        attention(module, q, k, v, None, sliding_window=4, is_causal=False, **kwargs)
    assert (calls.kernel, calls.attend) == (0, 2)


def test_te_refuses_softcapping_on_every_cp_path(
    one_rank: dist.ProcessGroup, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = _batch("varlen", ONE)
    kwargs = {n: t for n, t in forward_kwargs(shard_batch(batch, ONE, 0)).items()
              if n != "input_ids"}
    q, k, v = _qkv(1, T)
    for rotate in ROTATIONS:
        calls = _Calls()
        module = _cp_module(one_rank, rotate, calls, monkeypatch)
        with pytest.raises(NotImplementedError, match="soft-capping"):
            _backends(calls)["te"](module, q, k, v, None, softcap=30.0, **kwargs)
