"""Attention backends: packing layout, meshplan_sdpa exactness, the flash-attn and
Transformer Engine argument contracts (checked on CPU through PyTorch stand-ins with the
kernels' signatures), and backend selection."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meshplan.planner.models import resolve_model
from meshplan.runtime.attention import (
    FLASH,
    SDPA,
    TE,
    BackendUnavailable,
    available_backends,
    describe_backend,
    find_segments,
    flash_varlen_args,
    forward_kwargs,
    make_flash_attention,
    make_te_attention,
    register_backend,
    sdpa_attention_forward,
    select_backend,
    te_thd_args,
    thd_attention,
    use_backend,
    varlen_attention,
)
from meshplan.runtime.attention.te import TEThdArgs
from meshplan.runtime.packing import collate

CPU = torch.device("cpu")


class _Module(nn.Module):
    """Stands in for a transformers attention module (the backends read `is_causal`)."""

    is_causal = True


MODULE = _Module()


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny matmuls on a shared 2-core machine: thread synchronisation costs more than it
    # saves (8x slower under load), and the ranks of the multi-rank tests need the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _qkv(
    t: int, *, batch: int = 1, heads: int = 4, kv_heads: int = 2, dim: int = 8, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, t, dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, t, dim, generator=g, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, t, dim, generator=g, dtype=torch.float64)
    return q, k, v


def _cu(*lengths: int) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _positions(*lengths: int) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths])[None]


def _per_segment(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: tuple[int, ...],
    *,
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Each segment attended on its own (one row, B=1), output [1, T, H, D]."""
    outs = []
    start = 0
    group = q.shape[1] // k.shape[1]
    for n in lengths:
        qs = q[:, :, start : start + n]
        ks = k[:, :, start : start + n].repeat_interleave(group, 1)
        vs = v[:, :, start : start + n].repeat_interleave(group, 1)
        s = (qs @ ks.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        i = torch.arange(n)
        allowed = i[:, None] >= i[None, :]
        if window:
            allowed &= (i[:, None] - i[None, :]) < window
        s = s.masked_fill(~allowed, float("-inf"))
        outs.append(torch.softmax(s, -1) @ vs)
        start += n
    return torch.cat(outs, dim=2).transpose(1, 2)


# --------------------------------------------------------------------------- layout


def test_segments_from_cu_seqlens() -> None:
    seg = find_segments(1, 10, CPU, {"cu_seq_lens_q": _cu(4, 3, 3)})
    assert seg is not None and seg.source == "cu_seqlens"
    assert seg.cu_seqlens.dtype == torch.int32
    assert seg.cu_seqlens.tolist() == [0, 4, 7, 10]
    assert seg.ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert seg.max_seqlen == 4


def test_segments_from_position_ids_restart_at_zero() -> None:
    seg = find_segments(1, 9, CPU, {"position_ids": _positions(2, 4, 3)})
    assert seg is not None and seg.source == "position_ids"
    assert seg.cu_seqlens.tolist() == [0, 2, 6, 9]
    # Rows that never restart are not packed, whatever their offset.
    assert find_segments(2, 5, CPU, {"position_ids": torch.arange(5)[None]}) is None
    assert find_segments(1, 5, CPU, {"position_ids": torch.arange(3, 8)[None]}) is None
    assert find_segments(1, 5, CPU, {}) is None


def test_segments_from_segment_ids_are_runs_per_row() -> None:
    ids = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 2, 2]])
    seg = find_segments(2, 6, CPU, {"segment_ids": ids})
    assert seg is not None
    assert seg.cu_seqlens.tolist() == [0, 2, 5, 6, 10, 12]
    assert not seg.crosses_rows


def test_cu_seqlens_take_precedence_and_padded_ones_lay_out() -> None:
    kwargs = {
        "cu_seq_lens_q": _cu(3, 2),  # real lengths
        "cu_seq_lens_q_padded": _cu(4, 4),  # layout
        "position_ids": torch.zeros(1, 8, dtype=torch.long),  # would say 8 segments
    }
    seg = find_segments(1, 8, CPU, kwargs)
    assert seg is not None
    assert seg.cu_seqlens.tolist() == [0, 4, 8]
    assert seg.real_cu_seqlens.tolist() == [0, 3, 5]


def test_boundaries_that_do_not_cover_the_tokens_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"runs from 0 to 10, but the attention input holds 5"):
        find_segments(1, 5, CPU, {"cu_seq_lens_q": _cu(4, 6)})


def test_forward_kwargs_per_format() -> None:
    seqs = [[5, 6, 7], [8, 9]]
    varlen = forward_kwargs(collate(seqs, "varlen"))
    assert set(varlen) == {
        "input_ids",
        "position_ids",
        "cu_seq_lens_q",
        "cu_seq_lens_k",
        "max_length_q",
        "max_length_k",
    }
    assert varlen["max_length_q"] == 3
    thd = forward_kwargs(collate(seqs, "thd", seq_len=12, cp_size=2))
    assert thd["cu_seq_lens_q"].tolist() == [0, 3, 5, 9]
    assert thd["cu_seq_lens_q_padded"].tolist() == [0, 4, 8, 12]
    assert "segment_ids" in forward_kwargs(collate(seqs, "segment_ids", seq_len=6))
    padded = forward_kwargs(collate(seqs, "padded"))
    assert "attention_mask" in padded and "labels" not in padded


# --------------------------------------------------------------------------- meshplan_sdpa


@pytest.mark.parametrize(
    ("window", "softcap", "scale"),
    [(None, None, None), (3, None, None), (None, 5.0, 0.3), (2, 2.0, None)],
)
def test_sdpa_is_block_diagonal_causal(
    window: int | None, softcap: float | None, scale: float | None
) -> None:
    lengths = (5, 1, 7, 3)
    q, k, v = _qkv(sum(lengths))
    expected = _per_segment(q, k, v, lengths, window=window, softcap=softcap, scale=scale)
    for info in (
        {"cu_seq_lens_q": _cu(*lengths)},
        {"position_ids": _positions(*lengths)},
        {"segment_ids": torch.repeat_interleave(torch.arange(4), torch.tensor(lengths))[None]},
    ):
        out, weights = sdpa_attention_forward(
            MODULE, q, k, v, None, scaling=scale, sliding_window=window, softcap=softcap, **info
        )
        assert weights is None
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_sdpa_ignores_the_model_mask_when_packing_info_is_present() -> None:
    lengths = (4, 6)
    q, k, v = _qkv(10)
    # What a sharded sequence-parallel model might build: wrong length, wrong pattern.
    bogus = torch.zeros(1, 1, 10, 10, dtype=torch.bool)
    out, _ = sdpa_attention_forward(MODULE, q, k, v, bogus, cu_seq_lens_q=_cu(*lengths))
    torch.testing.assert_close(out, _per_segment(q, k, v, lengths))


def test_sdpa_boundaries_over_the_flattened_batch_may_cross_rows() -> None:
    q, k, v = _qkv(6, batch=2)
    out, _ = sdpa_attention_forward(MODULE, q, k, v, None, cu_seq_lens_q=_cu(4, 5, 3))
    flat = [t.transpose(0, 1).reshape(1, t.shape[1], 12, t.shape[3]) for t in (q, k, v)]
    expected = _per_segment(flat[0], flat[1], flat[2], (4, 5, 3)).reshape(2, 6, 4, -1)
    torch.testing.assert_close(out, expected)


def test_sdpa_left_padding_gives_no_nan_and_exact_real_tokens() -> None:
    q, k, v = _qkv(6, batch=2)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    out, _ = sdpa_attention_forward(MODULE, q, k, v, mask)
    assert not out.isnan().any()
    real = _per_segment(q[:1, :, 2:], k[:1, :, 2:], v[:1, :, 2:], (4,))
    torch.testing.assert_close(out[:1, 2:], real)
    torch.testing.assert_close(out[1:], _per_segment(q[1:], k[1:], v[1:], (6,)))


# --------------------------------------------------------------------------- kernel contracts

_LAYOUTS: dict[str, Callable[[], tuple[int, dict[str, Any], torch.Tensor | None]]] = {
    "cu_seqlens": lambda: (1, {"cu_seq_lens_q": _cu(5, 2, 9), "max_length_q": 9}, None),
    "thd_padded": lambda: (
        1,
        {"cu_seq_lens_q": _cu(3, 2, 6), "cu_seq_lens_q_padded": _cu(4, 4, 8)},
        None,
    ),
    "segment_ids": lambda: (2, {"segment_ids": torch.tensor([[1] * 5 + [2] * 3] * 2)}, None),
    "position_ids": lambda: (1, {"position_ids": _positions(6, 10)}, None),
    "padding_mask": lambda: (2, {}, torch.tensor([[1] * 8, [1] * 5 + [0] * 3])),
    "plain": lambda: (2, {}, None),
}


def _layout(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any], Any]:
    batch, kwargs, mask = _LAYOUTS[name]()
    total = 16
    q, k, v = _qkv(total // batch, batch=batch, seed=3)
    return q, k, v, kwargs, mask


def _real(name: str, out: torch.Tensor) -> torch.Tensor:
    """Only the real tokens: thd pads and padding-mask pads have no defined output."""
    if name == "thd_padded":
        keep = torch.tensor([1, 1, 1, 0, 1, 1, 0, 0] + [1] * 6 + [0, 0], dtype=torch.bool)
        return out[:, keep]
    if name == "padding_mask":
        return torch.cat([out[0], out[1, :5]])
    return out


@pytest.mark.parametrize("layout", sorted(_LAYOUTS))
@pytest.mark.parametrize(("window", "softcap"), [(None, None), (4, None), (3, 7.0)])
def test_flash_contract_reproduces_meshplan_sdpa(
    layout: str, window: int | None, softcap: float | None
) -> None:
    q, k, v, kwargs, mask = _layout(layout)
    expected, _ = sdpa_attention_forward(
        MODULE, q, k, v, mask, scaling=0.4, sliding_window=window, softcap=softcap, **kwargs
    )
    args = flash_varlen_args(
        q, k, v, mask, scaling=0.4, sliding_window=window, softcap=softcap, **kwargs
    )
    # The exact values flash_attn_varlen_func would receive.
    lay = args.layout
    assert lay.query.ndim == 3 and lay.query.shape[1:] == (4, 8) and lay.query.is_contiguous()
    assert lay.key.shape[1] == 2  # grouped-query heads are not repeated
    assert lay.cu_seqlens.dtype == torch.int32 and isinstance(lay.max_seqlen, int)
    assert args.window_size == ((window - 1, 0) if window else (-1, -1))
    assert args.softcap == (softcap or 0.0) and isinstance(args.softcap, float)
    assert args.causal is True and args.softmax_scale == 0.4
    out = args.call(varlen_attention)
    torch.testing.assert_close(_real(layout, out), _real(layout, expected))


@pytest.mark.parametrize("layout", sorted(_LAYOUTS))
@pytest.mark.parametrize("window", [None, 4])
def test_te_contract_reproduces_meshplan_sdpa(layout: str, window: int | None) -> None:
    q, k, v, kwargs, mask = _layout(layout)
    expected, _ = sdpa_attention_forward(
        MODULE, q, k, v, mask, scaling=0.4, sliding_window=window, **kwargs
    )
    args = te_thd_args(q, k, v, mask, scaling=0.4, sliding_window=window, **kwargs)
    call = args.forward_kwargs()
    assert call["qkv_format"] == "thd" and call["attn_mask_type"] == "padding_causal"
    assert call["window_size"] == ((window - 1, 0) if window else (-1, 0))
    for key in ("cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded"):
        assert call[key].dtype == torch.int32
    if layout == "thd_padded":
        assert call["cu_seqlens_q"].tolist() == [0, 3, 5, 11]
        assert call["cu_seqlens_q_padded"].tolist() == [0, 4, 8, 16]
    out = args.call(functools.partial(thd_attention, softmax_scale=args.softmax_scale))
    torch.testing.assert_close(_real(layout, out), _real(layout, expected))


def test_te_rejects_softcapping() -> None:
    q, k, v = _qkv(4)
    with pytest.raises(NotImplementedError, match="soft-capping"):
        te_thd_args(q, k, v, None, softcap=50.0)


def test_references_check_the_kernel_contract() -> None:
    q = torch.randn(6, 2, 4)
    cu = _cu(3, 3)
    with pytest.raises(ValueError, match="int32"):
        varlen_attention(q, q, q, cu.long(), cu, 3, 3)
    with pytest.raises(ValueError, match="shorter than the longest segment"):
        varlen_attention(q, q, q, cu, cu, 2, 3)
    with pytest.raises(ValueError, match="Python int"):
        varlen_attention(q, q, q, cu, cu, torch.tensor(3), 3)
    with pytest.raises(ValueError, match="exceeds its padded span"):
        thd_attention(q, q, q, _cu(4, 2), _cu(4, 2), cu, cu, 4, 4)


# --------------------------------------------------------------------------- models

TEST_FLASH = "meshplan_test_flash_reference"
TEST_TE = "meshplan_test_te_reference"


def _te_reference(args: TEThdArgs) -> Callable[..., torch.Tensor]:
    return functools.partial(thd_attention, softmax_scale=args.softmax_scale)


@pytest.fixture(scope="module", autouse=True)
def _reference_backends() -> None:
    register_backend(TEST_FLASH, make_flash_attention(varlen_attention))
    register_backend(TEST_TE, make_te_attention(_te_reference))


def _model(name: str) -> Any:  # a transformers causal LM
    src = resolve_model(name)
    torch.manual_seed(0)
    model = src.model_class(src.config)
    return model.eval()


def _seqs(*lengths: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(1, 256, (n,), generator=g) for n in lengths]


def _logits(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(**forward_kwargs(batch)).logits
    return out


@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-llama"])
def test_model_packed_equals_each_sequence_alone(name: str) -> None:
    """Gemma-2 brings sliding windows (8) and soft-capping; a 13-token sequence
    crosses the window. The unpacked reference is transformers' eager attention."""
    model = _model(name)
    seqs = _seqs(13, 4, 9)
    use_backend(model, "eager")
    alone = torch.cat([_logits(model, collate([s], "varlen"))[0] for s in seqs])
    use_backend(model, SDPA)
    packed = _logits(model, collate(seqs, "varlen", seq_len=32))[0, : alone.shape[0]]
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "backend", "fmt", "kw"),
    [
        ("tiny-gemma2", TEST_FLASH, "varlen", {"seq_len": 32}),
        ("tiny-llama", TEST_FLASH, "thd", {"seq_len": 32, "cp_size": 2}),
        ("tiny-llama", TEST_FLASH, "padded", {}),
        ("tiny-llama", TEST_TE, "thd", {"seq_len": 32, "cp_size": 2}),
        ("tiny-llama", TEST_TE, "segment_ids", {"seq_len": 32}),
        ("tiny-qwen2", TEST_TE, "padded", {}),
    ],
)
def test_model_through_kernel_contracts_equals_meshplan_sdpa(
    name: str, backend: str, fmt: str, kw: dict[str, Any]
) -> None:
    model = _model(name)
    batch = collate(_seqs(13, 4, 9), fmt, **kw)
    use_backend(model, SDPA)
    expected = _logits(model, batch)
    use_backend(model, backend)
    got = _logits(model, batch)
    real = batch["labels"] != -100  # the tokens whose output reaches the loss
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)


@pytest.fixture
def spy() -> Iterator[list[dict[str, Any]]]:
    calls: list[dict[str, Any]] = []

    def attention(
        module: nn.Module,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        calls.append({"mask": mask, **kwargs})
        return sdpa_attention_forward(module, q, k, v, mask, **kwargs)

    register_backend("meshplan_test_spy", attention)
    yield calls


def test_model_passes_packing_kwargs_and_only_a_2d_padding_mask(
    spy: list[dict[str, Any]],
) -> None:
    """What transformers 5.23 hands an attention function registered through meshplan."""
    model = _model("tiny-llama")
    use_backend(model, "meshplan_test_spy")
    _logits(model, collate(_seqs(5, 3), "varlen"))
    assert len(spy) == 2  # one call per decoder layer
    call = spy[0]
    assert call["mask"] is None
    assert call["cu_seq_lens_q"].tolist() == [0, 5, 8]
    assert call["max_length_q"] == 5
    assert call["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]]
    assert call["scaling"] == 0.25 and call["dropout"] == 0.0
    spy.clear()
    _logits(model, collate(_seqs(5, 3), "padded"))
    assert spy[0]["mask"].shape == (2, 5) and spy[0]["mask"].dtype == torch.bool
    spy.clear()
    _logits(model, collate(_seqs(5, 5), "padded"))
    assert spy[0]["mask"] is None  # nothing padded


# --------------------------------------------------------------------------- registry


def test_cpu_has_only_the_exact_fallback() -> None:
    assert available_backends("cpu") == [SDPA]
    assert select_backend("cpu") == SDPA
    info = describe_backend(FLASH, "cpu")
    assert not info.available and "runs on cuda, not cpu" in info.reason
    assert str(describe_backend(SDPA, "cpu")).startswith("meshplan_sdpa: ")
    assert "\n" not in str(info)


def test_selection_prefers_flash_then_te_on_cuda() -> None:
    assert select_backend("cuda", available=[SDPA, TE, FLASH]) == FLASH
    assert select_backend("cuda", available=[SDPA, TE]) == TE
    assert select_backend("cuda", available=[SDPA]) == SDPA
    assert select_backend("cuda", available=[]) == SDPA
    assert select_backend("cpu", available=[SDPA, FLASH]) == SDPA
    with pytest.raises(ValueError, match="unknown attention backends"):
        select_backend("cuda", available=["flash_attention_2"])


def test_use_backend_sets_the_config_and_refuses_what_cannot_run() -> None:
    model = _model("tiny-llama")
    previous = use_backend(model, SDPA)
    assert previous == "sdpa"
    assert model.config._attn_implementation == SDPA
    assert model.model.layers[0].self_attn.config._attn_implementation == SDPA
    with pytest.raises(BackendUnavailable, match="meshplan_flash cannot run"):
        use_backend(model, FLASH)
    with pytest.raises(ValueError, match="unknown attention implementation"):
        use_backend(model, "no_such_backend")
    # A meta-device model (planning time) is not checked against the device.
    meta = resolve_model("tiny-llama")
    with torch.device("meta"):
        planned = meta.model_class(meta.config)
    use_backend(planned, FLASH)
    assert planned.config._attn_implementation == FLASH


def test_packed_input_through_plain_causal_attention_is_not_exact() -> None:
    """The negative control: without the packing info the loss differs, so the exact
    comparisons above can fail."""
    model = _model("tiny-llama")
    use_backend(model, SDPA)
    batch = collate(_seqs(5, 6), "varlen")
    packed = _logits(model, batch)
    plain = _logits(model, {"input_ids": batch["input_ids"]})
    assert not torch.allclose(packed[0, 5:], plain[0, 5:], atol=1e-3)
    assert F.mse_loss(packed[0, :5], plain[0, :5]) < 1e-10  # the first sequence is unaffected
