"""Packed training is exact: one packed batch gives the loss and the parameter gradients
of its sequences run one at a time — in one process for every collate format, and at
world 4 on gloo under FSDP2 (dp 4) and under tensor parallel x FSDP2 (tp 2 x dp 2).

"Exact" is fp32 up to summation order: the loss within 1e-5 relative, and every
parameter's gradient within 1e-5 relative in norm (`_assert_grads_close`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from meshplan.planner.models import resolve_model
from meshplan.runtime.attention import SDPA, forward_kwargs, use_backend
from meshplan.runtime.packing import collate, collate_varlen
from meshplan.runtime.train.loss import (
    causal_lm_loss,
    data_parallel_loss,
    loss_sum_and_count,
    vocab_parallel,
)
from tests.distributed import RankPool, rank_pool_fixture

MODELS = ("tiny-llama", "tiny-qwen2")
# Four data-parallel batches (one per rank at dp 4); a 1-token sequence has no target.
BATCH_LENGTHS: tuple[tuple[int, ...], ...] = ((7, 3, 12), (5, 9, 1), (2, 11, 4), (6, 6, 8))
TOLERANCE = 1e-5

Grads = dict[str, torch.Tensor]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny matmuls on a shared 2-core machine: thread synchronisation costs more than it
    # saves (8x slower under load), and the ranks of the multi-rank tests need the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sequences(lengths: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    return [torch.randint(1, 256, (n,), generator=g) for n in lengths]


BATCHES = [_sequences(lengths, i) for i, lengths in enumerate(BATCH_LENGTHS)]


def _model(name: str) -> Any:  # a transformers causal LM
    """fp32 random weights, identical in every process (same seed, same init order)."""
    src = resolve_model(name)
    torch.manual_seed(0)
    model = src.model_class(src.config)
    return model.train()  # the tiny models have no dropout; train mode is what training runs


def _grads(model: nn.Module) -> Grads:
    out: Grads = {}
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        g = p.grad
        full = g.full_tensor() if hasattr(g, "full_tensor") else g
        out[name] = full.detach().clone()
    return out


def _unpacked_reference(name: str, batches: list[list[torch.Tensor]]) -> tuple[float, Grads]:
    """Every sequence alone through transformers' own `sdpa` attention; the loss is the
    token-weighted mean over all of them."""
    model = _model(name)
    use_backend(model, "sdpa")
    total = torch.zeros(())
    count = torch.zeros((), dtype=torch.long)
    for seqs in batches:
        for seq in seqs:
            batch = collate_varlen([seq])
            logits = model(input_ids=batch["input_ids"]).logits
            s, c = loss_sum_and_count(logits, batch["labels"])
            total, count = total + s, count + c
    loss = total / count
    loss.backward()
    return loss.item(), _grads(model)


_references: dict[tuple[str, int], tuple[float, Grads]] = {}


def _reference(name: str, n_batches: int) -> tuple[float, Grads]:
    key = (name, n_batches)
    if key not in _references:
        _references[key] = _unpacked_reference(name, BATCHES[:n_batches])
    return _references[key]


def _assert_loss_close(actual: float, expected: float) -> None:
    assert abs(actual - expected) <= TOLERANCE * abs(expected), (actual, expected)


def _assert_grads_close(actual: Grads, expected: Grads) -> None:
    assert actual.keys() == expected.keys()
    for name, ref in expected.items():
        err = (actual[name] - ref).norm() / ref.norm()
        assert err <= TOLERANCE, f"{name}: relative gradient error {err:.2e}"


# --------------------------------------------------------------------------- one process

FORMATS: dict[str, dict[str, Any]] = {
    "varlen": {},
    "varlen+tail": {"seq_len": 48},
    "thd+cp2": {"seq_len": 48, "cp_size": 2},
    "segment_ids": {"seq_len": 48},
    "padded": {},
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("name", MODELS)
def test_packed_batch_equals_sequences_alone(name: str, fmt: str) -> None:
    expected_loss, expected_grads = _reference(name, 1)
    model = _model(name)
    use_backend(model, SDPA)
    batch = collate(BATCHES[0], fmt.split("+")[0], **FORMATS[fmt])
    logits = model(**forward_kwargs(batch)).logits
    loss = causal_lm_loss(logits, batch["labels"])
    loss.backward()
    _assert_loss_close(loss.item(), expected_loss)
    _assert_grads_close(_grads(model), expected_grads)


@pytest.mark.parametrize("name", MODELS)
def test_position_ids_alone_are_enough(name: str) -> None:
    """Without cu_seqlens the backend finds the sequences where position ids restart."""
    expected_loss, expected_grads = _reference(name, 1)
    model = _model(name)
    use_backend(model, SDPA)
    batch = collate(BATCHES[0], "varlen")
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    loss = causal_lm_loss(logits, batch["labels"])
    loss.backward()
    _assert_loss_close(loss.item(), expected_loss)
    _assert_grads_close(_grads(model), expected_grads)


def test_packing_without_the_backend_is_not_exact() -> None:
    """Negative control: plain causal attention over the packed row mixes sequences."""
    expected_loss, _ = _reference("tiny-llama", 1)
    model = _model("tiny-llama")
    use_backend(model, SDPA)
    batch = collate(BATCHES[0], "varlen")
    logits = model(input_ids=batch["input_ids"]).logits  # no packing info at all
    loss = causal_lm_loss(logits, batch["labels"]).item()
    assert abs(loss - expected_loss) > 100 * TOLERANCE * expected_loss


# --------------------------------------------------------------------------- loss


def test_loss_sum_and_count_ignores_shifted_padding() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    labels = torch.tensor([[1, 2, 3, -100, -100], [4, -100, 5, 6, -100]])
    total, count = loss_sum_and_count(logits, labels)
    assert count.item() == 6
    expected = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), reduction="sum")
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(causal_lm_loss(logits, labels), expected / 6)


def test_loss_accumulates_in_float32() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=g).to(torch.bfloat16)
    labels = torch.randint(0, 50, (64,), generator=g)
    total, _ = loss_sum_and_count(logits, labels)
    assert total.dtype == torch.float32
    torch.testing.assert_close(
        total, F.cross_entropy(logits.double(), labels, reduction="sum").float()
    )


def test_loss_edge_cases() -> None:
    logits = torch.randn(3, 4)
    assert causal_lm_loss(logits, torch.full((3,), -100)).item() == 0.0
    with pytest.raises(ValueError, match="do not match labels"):
        loss_sum_and_count(logits, torch.zeros(4, dtype=torch.long))
    # No process group: the data-parallel loss is the local mean.
    loss, mean = data_parallel_loss(torch.tensor(6.0), torch.tensor(3))
    assert loss.item() == mean.item() == 2.0


# --------------------------------------------------------------------------- world 4

WORLD = 4
pool = rank_pool_fixture(WORLD, timeout=180.0)


def _step(model: nn.Module, seqs: list[torch.Tensor], group: Any) -> float:
    batch = collate_varlen(seqs)
    with vocab_parallel():  # needed for a vocabulary-sharded lm_head; harmless otherwise
        logits = model(**forward_kwargs(batch)).logits
        s, c = loss_sum_and_count(logits, batch["labels"])
        loss, mean = data_parallel_loss(s, c, group)
        loss.backward()
    return mean.item()


def _rank0_grads(model: nn.Module) -> Grads | None:
    grads = _grads(model)  # full_tensor() is a collective: every rank takes part
    return grads if dist.get_rank() == 0 else None


def case_fsdp(name: str, batches: list[list[torch.Tensor]]) -> tuple[float, Grads | None]:
    """dp 4: fully_shard per decoder layer, then the root; rank r trains batch r."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model(name)
    use_backend(model, SDPA)
    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("dp",))
    # Layers first, root last: the root's group then holds only the leftovers.
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    mean = _step(model, batches[dist.get_rank()], mesh.get_group())
    return mean, _rank0_grads(model)


def case_tp_fsdp(name: str, batches: list[list[torch.Tensor]]) -> tuple[float, Grads | None]:
    """tp 2 x dp 2: Colwise q/k/v/gate/up, Rowwise o/down, a vocabulary-sharded lm_head
    (loss parallel); FSDP2 over dp; both tp ranks of dp rank d train batch d."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    model = _model(name)
    use_backend(model, SDPA)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    tp, dp = mesh["tp"], mesh["dp"]
    plan = {
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(),
    }
    # Tensor parallel before FSDP: fully_shard then shards the TP DTensors over dp.
    for layer in model.model.layers:
        parallelize_module(layer, tp, plan)
    parallelize_module(
        model, tp, {"lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)}
    )
    for layer in model.model.layers:
        fully_shard(layer, mesh=dp)
    fully_shard(model, mesh=dp)
    mean = _step(model, batches[dp.get_local_rank()], dp.get_group())
    return mean, _rank0_grads(model)


def case_loss_parallel() -> list[float]:
    """Vocabulary-sharded logits on each 2-rank tp group: loss and logit gradients
    equal the unsharded ones."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    tp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))["tp"]
    g = torch.Generator().manual_seed(5)
    full = torch.randn(3, 4, 10, generator=g)
    labels = torch.randint(0, 10, (3, 4), generator=g)
    labels[0, :2] = -100
    ref = full.clone().requires_grad_()
    ref_sum, ref_count = loss_sum_and_count(ref, labels)
    (ref_sum / ref_count).backward()
    assert ref.grad is not None
    sharded: Any = distribute_tensor(full.clone(), tp, [Shard(2)]).requires_grad_()
    with vocab_parallel():
        s, c = loss_sum_and_count(sharded, labels)
        (s / c).backward()
    assert sharded.grad is not None
    grad = sharded.grad.full_tensor()
    return [
        abs(s.item() - ref_sum.item()) / ref_sum.item(),
        float(c.item() - ref_count.item()),
        ((grad - ref.grad).norm() / ref.grad.norm()).item(),
        float(sharded.to_local().shape[-1]),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_fsdp_dp4_equals_single_process(pool: RankPool, name: str) -> None:
    results = pool.run(case_fsdp, name, BATCHES)
    expected_loss, expected_grads = _reference(name, 4)
    for mean, _ in results:
        _assert_loss_close(mean, expected_loss)
    grads = results[0][1]
    assert grads is not None
    _assert_grads_close(grads, expected_grads)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_tp2_dp2_equals_single_process(pool: RankPool, name: str) -> None:
    results = pool.run(case_tp_fsdp, name, BATCHES)
    expected_loss, expected_grads = _reference(name, 2)
    for mean, _ in results:
        _assert_loss_close(mean, expected_loss)
    grads = results[0][1]
    assert grads is not None
    _assert_grads_close(grads, expected_grads)


@pytest.mark.slow
def test_vocabulary_sharded_loss(pool: RankPool) -> None:
    for loss_err, count_diff, grad_err, local_vocab in pool.run(case_loss_parallel):
        assert loss_err <= TOLERANCE and count_diff == 0 and grad_err <= TOLERANCE
        assert local_vocab == 5  # each rank really held half the vocabulary
