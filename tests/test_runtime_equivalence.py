"""A Program applied by the runtime trains exactly like one process.

Every layout trains the same model (same seed) on the same global batches (4 packed bins
of 32 tokens per step) for 5 AdamW steps with gradient clipping active, through the same
loop (`meshplan.runtime.train`), and is compared with a single process running that loop
with the whole global batch as 4 micro-batches:

- fp32: per-step losses and gradient norms within 1e-5 relative, and every final
  parameter within 1e-5 relative (‖distributed − single‖ / ‖single‖ per tensor). Only
  the order of floating-point sums differs (sharded matmuls, reduce-scatters), which in
  fp32 is ~1e-7 relative per operation.
- bf16 mixed precision (the plans as shipped: bf16 parameters and compute, fp32 gradient
  reduction) against the fp32 single process, with the tolerances stated at the test.

Layouts on 4 ranks: FSDP 4 (`plans/fsdp.plan`), HSDP 2 × 2 (`plans/llama.plan` with
tp=1, dp_replicate=2), dp 2 × tp 2 with sequence parallel (`--set tp=2`) and tp 4 with
sequence parallel and loss parallel (`--set tp=4`, on variants of the tiny models with 4
key/value heads so that they split 4 ways), each with the plans' activation
checkpointing and without it (the plan text minus its `activation_checkpoint` section).
"""

from __future__ import annotations

import copy
import functools
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed import RankPool, rank_pool_fixture

pytestmark = pytest.mark.slow

WORLD = 4
STEPS = 5
SEQ_LEN = 32
GLOBAL_BINS = 4  # bins per step over all data-parallel ranks
MAX_NORM = 0.5  # below the models' gradient norms: every step clips
PLANS = Path(__file__).resolve().parent.parent / "plans"

pool = rank_pool_fixture(WORLD, timeout=300.0)

# name → (plan file, overrides, kv heads of the model variant or None)
LAYOUTS: dict[str, tuple[str, tuple[str, ...], int | None]] = {
    "fsdp4": ("fsdp.plan", (), None),
    "hsdp2x2": ("llama.plan", ("tp=1", "mesh.dp_replicate=2"), None),
    "dp2-tp2-sp": ("llama.plan", ("tp=2",), None),
    "tp4-sp-loss-parallel": ("llama.plan", ("tp=4",), 4),
}
MODELS = ("tiny-llama", "tiny-qwen2")

ModelKey = tuple[str, int | None]  # (preset, key/value heads override)


# --------------------------------------------------------------------------- shared by both sides


def _config(key: ModelKey) -> Any:
    from meshplan.planner.models import resolve_model

    preset, kv_heads = key
    config = copy.deepcopy(resolve_model(preset).config)
    if kv_heads is not None:
        config.num_key_value_heads = kv_heads
    return config


def _model(key: ModelKey, device: str = "cpu") -> torch.nn.Module:
    from meshplan.planner.models import resolve_model
    from meshplan.runtime import build_model

    model_class = resolve_model(key[0]).model_class
    assert model_class is not None
    with torch.device("meta"):
        meta = model_class(_config(key))
    return meta if device == "meta" else build_model(meta, seed=0, device=device)


@functools.cache
def _data() -> Any:
    from meshplan.runtime.data import PackedData, synthetic_sequences

    sequences = synthetic_sequences(64, 256, min_len=4, max_len=SEQ_LEN, seed=1)
    return PackedData.build(sequences, SEQ_LEN)


def _plain_name(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "")


def train_case(key: ModelKey, program_json: str | None, micro_batch: int) -> dict[str, Any] | None:
    """Train with the runtime's loop; the single-process reference when program_json is None.

    Returns (on rank 0) the per-step losses and gradient norms and the full final
    parameters; every rank takes part in gathering them.
    """
    from torch.distributed.tensor import DTensor

    from meshplan.planner.program import Program
    from meshplan.runtime import Topology, TrainConfig, apply, make_optimizer, prepare, train

    model = _model(key)
    initial = {_plain_name(n): p.detach().clone() for n, p in model.named_parameters()}
    prepare(model)
    topology = Topology()
    if program_json is not None:
        topology = Topology.of(apply(Program.from_json(program_json), model))
    config = TrainConfig(steps=STEPS, lr=1e-3, weight_decay=0.1, max_grad_norm=MAX_NORM)
    optimizer = make_optimizer(model, config)
    loader = _data().loader(topology.dp_rank, topology.dp_size, micro_batch=micro_batch, seed=0)
    history = train(model, optimizer, loader, topology, config)
    params = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if isinstance(p, DTensor) else p
        params[_plain_name(name)] = full.detach().float().clone()
    if topology.rank != 0:
        return None
    return {"loss": [s.loss for s in history], "norm": [s.grad_norm for s in history],
            "tokens": [s.targets for s in history], "params": params, "initial": initial}


# --------------------------------------------------------------------------- pytest side


@functools.cache
def _graph(key: ModelKey) -> Any:
    from meshplan.planner.graph import build_graph

    return build_graph(key[0] if key[1] is None else _model(key, "meta"))


def _plan_text(file: str, *, checkpoint: bool, mixed_precision: bool) -> str:
    text = (PLANS / file).read_text(encoding="utf-8")
    if not checkpoint:
        text = re.sub(r"^activation_checkpoint\b.*$", "", text, flags=re.M)
    if not mixed_precision:
        text = re.sub(r"^\s*mixed_precision\s*\{[^}]*\}.*$", "", text, flags=re.M)
    return text


def _program(model: str, layout: str, *, checkpoint: bool, mixed_precision: bool = False) -> Any:
    from meshplan.planner.compile import compile_plan

    file, overrides, kv_heads = LAYOUTS[layout]
    text = _plan_text(file, checkpoint=checkpoint, mixed_precision=mixed_precision)
    program = compile_plan(text, _graph((model, kv_heads)), WORLD,
                           [*overrides, f"seq_len={SEQ_LEN}"]).program
    assert any(s.kind == "checkpoint" for s in program.steps) == checkpoint
    assert any(s.kind == "parallelize" for s in program.steps) == ("tp" in layout)
    return program


@functools.cache
def _reference(key: ModelKey) -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks share the two cores
    try:
        result = train_case(key, None, GLOBAL_BINS)
    finally:
        torch.set_num_threads(threads)
    assert result is not None
    return result


def _micro_batch(program: Any) -> int:
    dp = math.prod(program.mesh.size(d) for d in ("dp_replicate", "dp_shard"))
    return GLOBAL_BINS // dp


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def _run(pool: RankPool, model: str, layout: str, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    key = (model, LAYOUTS[layout][2])
    program = _program(model, layout, **kwargs)
    got = pool.run(train_case, key, program.to_json(), _micro_batch(program))[0]
    return got, _reference(key)


@pytest.mark.parametrize("checkpoint", [True, False], ids=["ac", "no-ac"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("model", MODELS)
def test_fp32_matches_single_process(pool: RankPool, model: str, layout: str, checkpoint: bool) -> None:
    got, ref = _run(pool, model, layout, checkpoint=checkpoint)
    assert got["tokens"] == ref["tokens"]  # the same global batches
    assert all(n > MAX_NORM for n in ref["norm"])  # clipping is exercised
    torch.testing.assert_close(torch.tensor(got["loss"]), torch.tensor(ref["loss"]), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(got["norm"]), torch.tensor(ref["norm"]), rtol=1e-5, atol=0)
    assert got["params"].keys() == ref["params"].keys()
    moved = 0
    for name, p in ref["params"].items():
        assert _relative(got["params"][name], p) <= 1e-5, name
        moved += not torch.equal(p, ref["initial"][name])
    assert moved == len(ref["params"])  # every parameter trained


# bf16 mixed precision (the plans as shipped) against the fp32 single process.
# bf16 keeps 8 significant bits (rounding error 2^-9 ≈ 2e-3 per value); the logits of the
# 2-layer models come out of ~6 roundings in a row, so the loss (≈ 5.5, a mean over ~110
# tokens of log-softmax values) is expected within ~1e-2 relative; we allow 2e-2. AdamW's
# update is m / sqrt(v): roughly lr per element whatever the gradient's size, so gradient
# errors of a few 1e-3 move the 5 updates by a few % of their size; we compare what training
# changed (final − initial) and allow 0.1 relative (in norm, per tensor), which still fails
# for a wrong reduction (e.g. a missing gradient average moves updates by ~100 %).
BF16_LOSS_RTOL = 2e-2
BF16_UPDATE_RTOL = 0.1


@pytest.mark.parametrize("layout", ["fsdp4", "dp2-tp2-sp"])
def test_bf16_mixed_precision_within_tolerance(pool: RankPool, layout: str) -> None:
    got, ref = _run(pool, "tiny-llama", layout, checkpoint=True, mixed_precision=True)
    torch.testing.assert_close(torch.tensor(got["loss"]), torch.tensor(ref["loss"]),
                               rtol=BF16_LOSS_RTOL, atol=0)
    for name, p in ref["params"].items():
        update, expected = got["params"][name] - ref["initial"][name], p - ref["initial"][name]
        assert _relative(update, expected) <= BF16_UPDATE_RTOL, name


# --------------------------------------------------------------------------- gradient norm


def grad_norm_case() -> tuple[float, float]:
    """Gradients on a 1-D mesh, on a 2-D mesh (sharded × replicated, and _StridedShard
    from FSDP over TP), and a plain tensor: grad_norm is the norm of the full gradient."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from meshplan.runtime import clip_grad_norm

    flat = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("a",))
    grid = init_device_mesh("cpu", (2, 2), mesh_dim_names=("x", "y"))
    torch.manual_seed(3)
    fulls = [torch.randn(8, 4), torch.randn(6, 4), torch.randn(4, 8), torch.randn(5)]
    params = [
        distribute_tensor(fulls[0], flat, [Shard(0)]),
        distribute_tensor(fulls[1], grid, [Shard(0), Replicate()]),
        distribute_tensor(fulls[2], grid, [Shard(0), Shard(1)]),
        fulls[3].clone(),
    ]
    for p, full in zip(params, fulls, strict=True):
        p.grad = p.detach().clone()
        assert p.grad is not None and full.shape == p.shape
    norm = float(clip_grad_norm(params, 1.0))
    expected = float(torch.cat([f.flatten() for f in fulls]).norm())
    after = math.sqrt(sum(float(p.grad.full_tensor().pow(2).sum()) if hasattr(p.grad, "full_tensor")
                          else float(p.grad.pow(2).sum()) for p in params if p.grad is not None))
    dist.barrier()
    return norm / expected, after


def test_grad_norm_spans_meshes(pool: RankPool) -> None:
    for ratio, after in pool.run(grad_norm_case):
        assert ratio == pytest.approx(1.0, rel=1e-6)
        assert after == pytest.approx(1.0, rel=1e-5)


def unsynchronised_case(program_json: str) -> str:
    from meshplan.planner.program import Program
    from meshplan.runtime import TrainError, apply

    try:
        from meshplan.runtime import Topology

        Topology.of(apply(Program.from_json(program_json), _model(("tiny-llama", None))))
    except TrainError as e:
        return str(e)
    return "no error"


def test_refuses_data_parallel_without_gradient_sync(pool: RankPool) -> None:
    from meshplan.planner.compile import compile_plan

    text = "plan bare for LlamaForCausalLM\n\nmesh {\n  dp_shard = auto\n}\n"
    program = compile_plan(text, _graph(("tiny-llama", None)), WORLD).program
    messages = pool.run(unsynchronised_case, program.to_json())
    assert all("no fully_shard synchronises their gradients" in m for m in messages), messages[0]
