"""Attention sinks (`s_aux`): `meshplan_sdpa` against transformers' own eager attention.

The references are transformers' eager functions with sinks — GPT-OSS's (the sink as an
extra softmax column) and Granite-SWA's (the output scaled by sigmoid(lse − sink)) — fed
masks built here, independently of meshplan's mask builders. Outputs and the gradients
of query, key, value and the sinks agree in float64 to 1e-10 (1e-5 where a float32
step is involved: Granite-SWA's softmax, MiMo-V2-Flash's norms, float32 inputs) for
grouped-query heads, padding, sliding windows and packed segments (position ids
restarting, segment ids, cu_seq_lens over the flattened batch); tiny GPT-OSS and
MiMo-V2-Flash models (2 layers, random weights and sinks, float64) give eager's loss and
every parameter gradient, and on a packed row those of eager run on each sequence
alone. Context parallelism (2 gloo ranks, all-gather and ring) equals one process.
flash-attn and Transformer Engine refuse sinks, naming themselves.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.gpt_oss import modeling_gpt_oss
from transformers.models.granite_swa import modeling_granite_swa

from meshplan.runtime.attention import (
    SDPA,
    forward_kwargs,
    make_flash_attention,
    make_te_attention,
    sdpa_attention_forward,
    thd_attention,
    use_backend,
    varlen_attention,
)
from meshplan.runtime.attention.te import TEThdArgs
from meshplan.runtime.packing import collate
from tests.distributed import RankPool, rank_pool_fixture

HEADS, KV_HEADS, DIM = 4, 2, 8
SCALE = 0.3
F64 = {"rtol": 1e-10, "atol": 1e-10}
F32 = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _Attention(nn.Module):
    """What transformers' eager functions read from an attention module, with its sinks."""

    is_causal = True

    def __init__(self, heads: int = HEADS, kv_heads: int = KV_HEADS, *, seed: int = 0,
                 dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.num_key_value_groups = heads // kv_heads
        g = torch.Generator().manual_seed(100 + seed)
        self.sinks = nn.Parameter(torch.randn(heads, generator=g, dtype=dtype))
        self.eval()


def _qkv(batch: int, t: int, *, seed: int = 0, dtype: torch.dtype = torch.float64
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, HEADS, t, DIM, generator=g, dtype=dtype)
    k = torch.randn(batch, KV_HEADS, t, DIM, generator=g, dtype=dtype)
    v = torch.randn(batch, KV_HEADS, t, DIM, generator=g, dtype=dtype)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_()


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, Tq, Tk] boolean -> the [B, 1, Tq, Tk] additive mask eager attention takes."""
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def _allowed(ids: torch.Tensor, *, window: int | None = None) -> torch.Tensor:
    """[B, T] segment ids -> [B, T, T]: same segment, causal, inside the window."""
    t = ids.shape[-1]
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    allowed = (ids[:, :, None] == ids[:, None, :]) & (j <= i)
    if window is not None:
        allowed &= i - j < window
    return allowed


def _ids(*lengths: int) -> torch.Tensor:
    return torch.cat([torch.full((n,), s) for s, n in enumerate(lengths)])


Eager = Callable[..., tuple[torch.Tensor, Any]]
# Each eager function and the tolerance it allows: Granite-SWA's forces its softmax to
# float32 even for float64 inputs.
EAGER: dict[str, tuple[Eager, dict[str, float]]] = {
    "gpt_oss": (modeling_gpt_oss.eager_attention_forward, F64),
    "granite_swa": (modeling_granite_swa.eager_attention_forward, F32),
}


def _grads(out: torch.Tensor, leaves: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=out.dtype)
    return torch.autograd.grad((out * weight).sum(), leaves)


def _compare(got: torch.Tensor, expected: torch.Tensor, leaves: tuple[torch.Tensor, ...],
             tol: dict[str, float]) -> None:
    torch.testing.assert_close(got, expected, **tol)
    for name, a, b in zip(("query", "key", "value", "sinks"), _grads(got, leaves),
                          _grads(expected, leaves), strict=True):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, n=name: f"{n} gradient: {m}")


# Each case: batch, length, what meshplan_sdpa is given (mask, sliding window, kwargs) and
# the [B, T, T] pattern eager attention is given as an additive mask.
CASES: dict[str, Callable[[], tuple[int, int, torch.Tensor | None, int | None, dict[str, Any], torch.Tensor]]] = {
    "causal": lambda: (2, 9, None, None, {}, _allowed(torch.zeros(2, 9, dtype=torch.long))),
    "padding": lambda: (
        2, 9, torch.tensor([[1] * 9, [1] * 6 + [0] * 3]), None, {},
        _allowed(torch.zeros(2, 9, dtype=torch.long)) & torch.tensor([[True] * 9, [True] * 6 + [False] * 3])[:, None],
    ),
    "sliding-window": lambda: (2, 11, None, 4, {}, _allowed(torch.zeros(2, 11, dtype=torch.long), window=4)),
    "packed-position-ids": lambda: (
        1, 12, None, None, {"position_ids": torch.cat([torch.arange(5), torch.arange(4), torch.arange(3)])[None]},
        _allowed(_ids(5, 4, 3)[None]),
    ),
    "packed-segment-ids-window": lambda: (
        2, 10, None, 3, {"segment_ids": torch.stack([_ids(6, 4), _ids(2, 8)])},
        _allowed(torch.stack([_ids(6, 4), _ids(2, 8)]), window=3),
    ),
}


@pytest.mark.parametrize("eager", sorted(EAGER))
@pytest.mark.parametrize("case", sorted(CASES))
def test_sinks_equal_transformers_eager(case: str, eager: str) -> None:
    batch, t, mask, window, kwargs, allowed = CASES[case]()
    module = _Attention()
    q, k, v = _qkv(batch, t)
    got, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=SCALE, sliding_window=window,
                                    s_aux=module.sinks, **kwargs)
    reference, tol = EAGER[eager]
    expected, _ = reference(module, q, k, v, _additive(allowed, q.dtype), scaling=SCALE)
    real = torch.ones(batch, t, dtype=torch.bool) if mask is None else mask.bool()
    # Padding queries' outputs carry no loss: compare (and differentiate) real tokens only.
    _compare(got[real], expected[real], (q, k, v, module.sinks), tol)


def test_sinks_over_the_flattened_batch() -> None:
    """cu_seq_lens over B*T tokens: a segment continues from row 0 into row 1."""
    module = _Attention()
    q, k, v = _qkv(2, 8)
    cu = torch.tensor([0, 5, 11, 16], dtype=torch.int32)
    got, _ = sdpa_attention_forward(module, q, k, v, None, scaling=SCALE, s_aux=module.sinks,
                                    cu_seq_lens_q=cu, cu_seq_lens_k=cu)

    def flat(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(0, 1).reshape(1, x.shape[1], 16, DIM)

    eager, _ = EAGER["gpt_oss"]
    out, _ = eager(module, flat(q), flat(k), flat(v), _additive(_allowed(_ids(5, 6, 5)[None]), q.dtype),
                   scaling=SCALE)
    expected = out.reshape(2, 8, HEADS, DIM)
    _compare(got, expected, (q, k, v, module.sinks), F64)


def test_sinks_with_softcapping_and_float32() -> None:
    """No transformers model combines sinks with soft-capping: the reference is eager's
    math written out (scale, cap, mask, sink column, softmax, drop the sink)."""
    module = _Attention(dtype=torch.float32)
    q, k, v = _qkv(1, 10, dtype=torch.float32)
    got, _ = sdpa_attention_forward(module, q, k, v, None, scaling=SCALE, softcap=2.0, sliding_window=6,
                                    s_aux=module.sinks)
    kk, vv = (x.repeat_interleave(HEADS // KV_HEADS, dim=1) for x in (k, v))
    scores = torch.tanh(q @ kk.transpose(-1, -2) * SCALE / 2.0) * 2.0
    scores = scores.masked_fill(~_allowed(torch.zeros(1, 10, dtype=torch.long), window=6)[:, None], float("-inf"))
    sink = module.sinks.reshape(1, -1, 1, 1).expand(1, HEADS, 10, 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    expected = (probs @ vv).transpose(1, 2)
    _compare(got, expected, (q, k, v, module.sinks), F32)
    # The sinks matter: without them the output differs.
    plain, _ = sdpa_attention_forward(module, q, k, v, None, scaling=SCALE, softcap=2.0, sliding_window=6)
    assert not torch.allclose(plain, got, atol=1e-3)


def test_sinks_must_match_the_query_heads() -> None:
    """Under tensor parallelism a rank sees its local heads: full-width sinks are a plan error."""
    module = _Attention()
    q, k, v = _qkv(1, 4)
    with pytest.raises(ValueError, match=r"one logit per query head, shape \[4\], got \[8\]"):
        sdpa_attention_forward(module, q, k, v, None, s_aux=torch.zeros(8, dtype=torch.float64))


def test_a_row_that_sees_no_key_outputs_zeros() -> None:
    """With a sink, a query row masked out entirely (a 4-D mask) puts all its
    probability on the sink: zeros, not NaN."""
    module = _Attention()
    q, k, v = _qkv(1, 5)
    mask = torch.ones(1, 1, 5, 5, dtype=torch.bool).tril()
    mask[:, :, 2] = False
    got, _ = sdpa_attention_forward(module, q, k, v, mask, s_aux=module.sinks)
    assert torch.equal(got[0, 2], torch.zeros(HEADS, DIM, dtype=got.dtype))
    assert bool(got.isfinite().all()) and bool(got[0, 3].ne(0).all())


def _te_reference(args: TEThdArgs) -> Callable[..., torch.Tensor]:
    return functools.partial(thd_attention, softmax_scale=args.softmax_scale)


GPU_BACKENDS: dict[str, Callable[..., tuple[torch.Tensor, None]]] = {
    "meshplan_flash": make_flash_attention(varlen_attention),
    "meshplan_te": make_te_attention(_te_reference),
}


@pytest.mark.parametrize("backend", sorted(GPU_BACKENDS))
def test_gpu_backends_refuse_sinks(backend: str) -> None:
    module = _Attention()
    q, k, v = _qkv(1, 6)
    attention = GPU_BACKENDS[backend]
    attention(module, q, k, v, None)  # without sinks the stand-in kernel runs
    with pytest.raises(NotImplementedError, match=f"{backend} does not implement attention sinks"):
        attention(module, q, k, v, None, s_aux=module.sinks)


# --------------------------------------------------------------------------- models


def _gpt_oss() -> nn.Module:
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, head_dim=8, num_attention_heads=4,
        num_key_value_heads=2, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=4, max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        experts_implementation="eager",  # float64: grouped_mm takes float32 and below only
    )
    torch.manual_seed(0)
    return GptOssForCausalLM(config)


def _mimo() -> nn.Module:
    from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM

    # Layer 0 full attention (no sinks), layer 1 sliding with sinks; v_head_dim != head_dim.
    config = MiMoV2FlashConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, v_head_dim=8, sliding_window=4,
        n_routed_experts=4, num_experts_per_tok=2, max_position_embeddings=64, experts_implementation="eager",
    )
    torch.manual_seed(0)
    return MiMoV2FlashForCausalLM(config)


MODELS: dict[str, Callable[[], nn.Module]] = {"gpt_oss": _gpt_oss, "mimo_v2_flash": _mimo}
# Run on a packed row instead of one sequence at a time, MiMo-V2-Flash's RMSNorm and router
# (float32 even for float64 weights) round differently: float32's tolerance there.
PACKED_TOLERANCE: dict[str, dict[str, float]] = {"gpt_oss": F64, "mimo_v2_flash": F32}


def _with_random_sinks(name: str) -> nn.Module:
    model = MODELS[name]().double().eval()
    sinks = [p for n, p in model.named_parameters() if n.endswith(".sinks")]
    assert sinks, "the model has attention sinks"
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in sinks:
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of logits [..., V] against targets (-100: no loss)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")


def _gradients(model: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert any(n.endswith(".sinks") for n in grads), "the sinks get gradients"
    return grads


def _assert_same(loss: torch.Tensor, grads: dict[str, torch.Tensor], expected_loss: torch.Tensor,
                 expected: dict[str, torch.Tensor], tol: dict[str, float] = F64) -> None:
    torch.testing.assert_close(loss, expected_loss, **tol)
    assert grads.keys() == expected.keys()
    for n, grad in grads.items():
        torch.testing.assert_close(grad, expected[n], **tol, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_tiny_model_equals_eager(name: str) -> None:
    """Two rows of 10 tokens (longer than the sliding window): eager's loss and gradients."""
    model = _with_random_sinks(name)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(4))
    results = []
    for backend in ("eager", SDPA):
        use_backend(model, backend)
        loss = _token_loss(model(input_ids=ids, use_cache=False).logits[:, :-1], ids[:, 1:]) / ids[:, 1:].numel()
        results.append((loss.detach(), _gradients(model, loss)))
    _assert_same(*results[1], *results[0])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_tiny_packed_model_equals_eager_per_sequence(name: str) -> None:
    """One packed row (position ids restarting at 0) through meshplan_sdpa: the loss and
    gradients of eager attention run on each sequence alone. (transformers 5.24's eager
    path does not isolate the sequences of this packed row itself.)"""
    model = _with_random_sinks(name)
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, 64, (n,), generator=g) for n in (5, 7, 3)]
    batch = collate(seqs, "varlen", seq_len=16)
    targets = batch["labels"][0]  # already shifted: the target of each position
    count = int((targets != -100).sum())
    use_backend(model, "eager")
    total = torch.zeros((), dtype=torch.float64)
    start = 0
    for seq in seqs:
        logits = model(input_ids=seq[None], use_cache=False).logits[0]
        total = total + _token_loss(logits, targets[start:start + seq.numel()])
        start += seq.numel()
    expected = _gradients(model, total / count)
    use_backend(model, SDPA)
    kwargs = {n: t for n, t in forward_kwargs(batch).items() if n in ("input_ids", "position_ids")}
    loss = _token_loss(model(**kwargs, use_cache=False).logits[0], targets) / count
    _assert_same(loss.detach(), _gradients(model, loss), (total / count).detach(), expected,
                 PACKED_TOLERANCE[name])


# --------------------------------------------------------------------------- context parallel

CP_WORLD = 2
pool = rank_pool_fixture(CP_WORLD, timeout=120.0)


def cp_case(rotate: str, fmt: str, window: int | None) -> dict[str, float]:
    """On each of 2 ranks: the rank's local queries through `ContextParallelAttention`
    with sinks, against `meshplan_sdpa` over the whole batch in one process; gradients
    summed over the ranks. Largest absolute differences; refusals of the GPU backends."""
    import torch.distributed as dist

    from meshplan.runtime.attention.context import CP_ATTRIBUTE, ContextParallelAttention
    from meshplan.runtime.parallel.context import ContextSplit, shard_batch

    rank = dist.get_rank()
    split = ContextSplit(CP_WORLD, "headtail")
    g = torch.Generator().manual_seed(7)
    seqs = [torch.randint(1, 64, (n,), generator=g) for n in (13, 4, 9, 1)]
    batch = collate(seqs, fmt, seq_len=48, cp_size=split.collate_cp_size)
    rows, length = batch["input_ids"].shape
    module = _Attention()
    q, k, v = _qkv(rows, length, seed=5)
    full = {n: t for n, t in forward_kwargs(batch).items() if n != "input_ids"}
    expected, _ = sdpa_attention_forward(module, q, k, v, None, scaling=SCALE, sliding_window=window,
                                         s_aux=module.sinks, **full)
    weight = torch.randn(expected.shape, generator=torch.Generator().manual_seed(8), dtype=q.dtype)
    leaves = (q, k, v, module.sinks)
    want = torch.autograd.grad((expected * weight).sum(), leaves)

    local = shard_batch(batch, split, rank)
    index = local["cp_query_index"]
    kwargs = {n: t for n, t in forward_kwargs(local).items() if n != "input_ids"}
    cp_module = _Attention()
    cp_module.sinks = module.sinks
    setattr(cp_module, CP_ATTRIBUTE, ContextParallelAttention(
        group=dist.group.WORLD, size=CP_WORLD, rank=rank, rotate=rotate, fqn="layers.0.self_attn"))
    ql, kl, vl = (x[:, :, index] for x in (q, k, v))
    got, _ = sdpa_attention_forward(cp_module, ql, kl, vl, None, scaling=SCALE, sliding_window=window,
                                    s_aux=cp_module.sinks, **kwargs)
    grads = list(torch.autograd.grad((got * weight[:, index]).sum(), leaves))
    for grad in grads:
        dist.all_reduce(grad)  # each rank's loss is its local tokens': the sum is the whole
    result = {"out": float((got - expected[:, index]).abs().max())}
    for name, a, b in zip(("query", "key", "value", "sinks"), grads, want, strict=True):
        result[name] = float((a - b).abs().max())
    for backend, attention in GPU_BACKENDS.items():
        try:
            attention(cp_module, ql, kl, vl, None, s_aux=cp_module.sinks, **kwargs)
        except NotImplementedError as e:
            assert f"{backend} does not implement attention sinks" in str(e), e
        else:
            raise AssertionError(f"{backend} applied sinks under context parallelism")
    return result


@pytest.mark.slow
@pytest.mark.parametrize(("fmt", "window"), [("varlen", None), ("segment_ids", 5)])
@pytest.mark.parametrize("rotate", ["allgather", "ring"])
def test_context_parallel_sinks_equal_one_process(pool: RankPool, rotate: str, fmt: str,
                                                   window: int | None) -> None:
    for result in pool.run(cp_case, rotate, fmt, window):
        assert max(result.values()) < 1e-10, result
