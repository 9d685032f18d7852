"""LoRA adapters (a Program's Adapters step) train exactly like one process on 4 gloo ranks.

- One process: `install_adapters` on the meta model (PEFT's names, only adapters
  trainable, the adapters' dtype); Hugging Face names for the base weights; seeded,
  layout-independent adapter init (lora_A kaiming-uniform, lora_B zeros); a base loaded
  from safetensors leaves the adapters initialised.
- 4 ranks, a toy block: colwise with a sequence-sharded input (`input = shard(1)`) and
  rowwise with a sequence-sharded output (`output = shard(1)`) on adapted Linears give
  the output, the input's gradient and every lora_A / lora_B gradient of one process,
  on every rank (DTensor: `full_tensor()` of each gradient).
- 4 ranks, the tiny Llama with LoRA on q, k, v, o, gate, up, down (rank 4, fp32, dropout
  0): FSDP 4, HSDP 2 × 2, and dp 2 × tp 2 with sequence parallelism (`plans/llama.plan`'s
  layout at tp = 2, its activation checkpointing included), 3 AdamW steps with gradient
  clipping active. lora_B starts non-zero, so lora_A learns from the first step. On every
  rank: the losses and gradient norms, and the adapters' full tensors, equal the one-process
  PEFT model's (`ADAPTER_ATOL`); the optimizer holds only the adapters, no base parameter
  gets a gradient, and every base weight is bit-identical after training.
- Errors a plan can cause (a target PEFT cannot adapt, a style that cannot lay out an
  adapter) are `StepError`s naming the plan line.

The Programs are written by hand (the steps `plans/fsdp.plan` and `plans/llama.plan`
lower to, with the Adapters step first), so the module traces no model graph.
"""

from __future__ import annotations

import functools
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from meshplan.dsl.errors import Span
from meshplan.planner.program import (
    Adapters,
    Checkpoint,
    FullyShard,
    MeshLayout,
    Parallelize,
    Program,
    StyleCall,
)
from tests.distributed import RankPool, rank_pool_fixture

WORLD = 4
STEPS = 3
SEQ_LEN = 32
GLOBAL_BINS = 4  # bins per step over all data-parallel ranks
MAX_NORM = 0.01  # below the adapters' gradient norms: every step clips
SEED = 0
RANK, ALPHA = 4, 8
LORA_B_STD = 0.05  # lora_B starts non-zero (PEFT's zeros would give lora_A no gradient at step 1)
LAYERS = 2
TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ADAPTERS_SPAN = Span("lora.plan", 30, 1, 38, 2)
PARALLEL_SPAN = Span("lora.plan", 21, 3, 21, 40)

# Adapter weights after 3 steps against one process, absolute (values ~0.1; AdamW moves
# each by ~lr = 1e-3 per step). Only the order of floating-point sums differs.
ADAPTER_ATOL = 1e-5
LOSS_RTOL = 1e-5
# The toy block's outputs and gradients, relative to the largest magnitude (fp32 sums in
# another order: ~1e-7).
TP_RTOL = 1e-6

pool = rank_pool_fixture(WORLD, timeout=300.0)


# --------------------------------------------------------------------------- the Programs


def _adapters_step(layers: int = LAYERS) -> Adapters:
    fqns = tuple(f"model.layers.{i}.{t}" for i in range(layers) for t in TARGETS)
    return Adapters(fqns=fqns, rank=RANK, alpha=ALPHA, dropout=0.0, span=ADAPTERS_SPAN)


def _units(dims: tuple[str, ...], *, outer: tuple[str, ...] = ()) -> tuple[FullyShard, ...]:
    layers = tuple(FullyShard(fqns=(f"model.layers.{i}",), mesh_dims=dims, reshard_after_forward=i < LAYERS - 1)
                   for i in range(LAYERS))
    rest = (FullyShard(fqns=outer, mesh_dims=dims, reshard_after_forward=False),) if outer else ()
    return (*layers, *rest, FullyShard(fqns=(), mesh_dims=dims, reshard_after_forward=False))


def _checkpoints() -> tuple[Checkpoint, ...]:
    return tuple(Checkpoint(fqn=f"model.layers.{i}", mode="full") for i in range(LAYERS))


LLAMA_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
LLAMA_SUBMESHES = (("dp", ("dp_replicate", "dp_shard")), ("fsdp", ("dp_shard", "cp")),
                   ("loss", ("dp_replicate", "dp_shard", "cp")))
OUTER = ("model.embed_tokens", "model.norm", "lm_head")


def _sp_layer_plan() -> tuple[tuple[str, StyleCall], ...]:
    """plans/llama.plan's layer plan: colwise q/k/v/gate/up behind prepare_input(shard(1) ->
    replicate), rowwise o/down with a sequence-sharded output, sequence-parallel norms."""
    colwise = StyleCall(style="colwise", input="replicate", output="shard(-1)")
    rowwise = StyleCall(style="rowwise", input="shard(-1)", output="shard(1)")
    norm = StyleCall(style="sequence_parallel", local_output=False)
    return (
        ("self_attn", StyleCall(style="prepare_input", local_output=False,
                                conversions=(("hidden_states", "shard(1)", "replicate"),))),
        ("self_attn.q_proj", colwise), ("self_attn.k_proj", colwise), ("self_attn.v_proj", colwise),
        ("self_attn.o_proj", rowwise),
        ("mlp", StyleCall(style="prepare_input", local_output=False, conversions=((None, "shard(1)", "replicate"),))),
        ("mlp.gate_proj", colwise), ("mlp.up_proj", colwise), ("mlp.down_proj", rowwise),
        ("input_layernorm", norm), ("post_attention_layernorm", norm),
    )


def _program(layout: str) -> Program:
    """The Program of a layout, the Adapters step first."""
    adapters = _adapters_step()
    if layout == "fsdp4":
        mesh = MeshLayout(names=("dp_shard",), shape=(WORLD,))
        return Program(plan="fsdp", model="tiny-llama", world_size=WORLD, mesh=mesh,
                       steps=(adapters, *_checkpoints(), *_units(("dp_shard",))))
    fsdp = ("dp_replicate", "fsdp")
    if layout == "hsdp2x2":
        mesh = MeshLayout(names=LLAMA_DIMS, shape=(1, 2, 2, 1, 1), submeshes=LLAMA_SUBMESHES)
        return Program(plan="llama", model="tiny-llama", world_size=WORLD, mesh=mesh,
                       steps=(adapters, *_checkpoints(), *_units(fsdp, outer=OUTER)))
    assert layout == "dp2-tp2-sp"
    mesh = MeshLayout(names=LLAMA_DIMS, shape=(1, 1, 2, 1, 2), submeshes=LLAMA_SUBMESHES)
    outer = Parallelize(fqn="", mesh_dim="tp", span=PARALLEL_SPAN, plan=(
        ("model.embed_tokens", StyleCall(style="rowwise", input="replicate", output="shard(1)")),
        ("model.norm", StyleCall(style="sequence_parallel", local_output=False)),
        ("lm_head", StyleCall(style="colwise", input="shard(1)", output="shard(-1)", local_output=False)),
    ))
    layers = tuple(Parallelize(fqn=f"model.layers.{i}", mesh_dim="tp", plan=_sp_layer_plan(), span=PARALLEL_SPAN)
                   for i in range(LAYERS))
    return Program(plan="llama", model="tiny-llama", world_size=WORLD, mesh=mesh,
                   steps=(adapters, outer, *layers, *_checkpoints(), *_units(fsdp, outer=OUTER)))


LAYOUTS = ("fsdp4", "hsdp2x2", "dp2-tp2-sp")


# --------------------------------------------------------------------------- shared by both sides


def _rule(name: str, module: nn.Module, tensor: torch.Tensor, std: float) -> tuple[Any, float]:
    """The runtime's init rule, but lora_B drawn (seeded by its name, as every weight) instead of zeros."""
    from meshplan.runtime.parallel.adapters import adapter_side
    from meshplan.runtime.weights.loading import init_rule

    if adapter_side(name) == "B":
        return "normal", LORA_B_STD
    return init_rule(name, module, tensor, std)


@functools.cache
def _data() -> Any:
    from meshplan.runtime.train.data import PackedData, synthetic_sequences

    sequences = synthetic_sequences(64, 256, min_len=4, max_len=SEQ_LEN, seed=1)
    return PackedData.build(sequences, SEQ_LEN)


def _full(p: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    full = p.full_tensor() if isinstance(p, DTensor) else p
    return full.detach().clone()


def _split(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(adapters, base) full tensors by Hugging Face name (a collective under a Program)."""
    from meshplan.runtime.parallel.adapters import adapter_side
    from meshplan.runtime.weights.loading import canonical_name

    adapters, base = {}, {}
    for name, p in model.named_parameters():
        (adapters if adapter_side(name) else base)[canonical_name(name)] = _full(p)
    return adapters, base


def train_case(program_json: str | None, micro_batch: int) -> dict[str, Any]:
    """3 steps of the runtime's loop; one process (PEFT on the plain model) when program_json is None."""
    import torch.distributed as dist

    from meshplan.planner.program import Program
    from meshplan.runtime.parallel.adapters import install_adapters
    from meshplan.runtime.train.build import build_applied, prepare
    from meshplan.runtime.train.loop import TrainConfig, make_optimizer, train
    from meshplan.runtime.train.topology import Topology
    from meshplan.runtime.weights.loading import (
        canonical_name,
        init_random,
        materialize,
        meta_model,
    )

    if program_json is None:
        model = meta_model("tiny-llama")
        install_adapters(model, _adapters_step())
        materialize(model, "cpu")
        init_random(model, SEED, rule=_rule)
        prepare(model)
        target: Any = model
        topology = Topology()
    else:
        applied = build_applied(Program.from_json(program_json), "tiny-llama", seed=SEED).applied
        init_random(applied, SEED, rule=_rule)  # the runtime's seeded values, lora_B drawn too
        model, target, topology = applied.model, applied, Topology.of(applied)
    config = TrainConfig(steps=STEPS, lr=1e-3, weight_decay=0.1, max_grad_norm=MAX_NORM)
    optimizer = make_optimizer(model, config)
    names = {id(p): canonical_name(n) for n, p in model.named_parameters()}
    optimized = sorted(names[id(p)] for g in optimizer.param_groups for p in g["params"])
    initial_adapters, initial_base = _split(model)
    loader = _data().loader(topology.dp_rank, topology.dp_size, micro_batch=micro_batch, seed=SEED)
    history = train(target, optimizer, loader, topology, config)
    adapters, base = _split(model)
    return {
        "rank": dist.get_rank() if dist.is_initialized() else 0,
        "loss": [s.loss for s in history], "norm": [s.grad_norm for s in history],
        "tokens": [s.targets for s in history],
        "optimized": optimized, "adapters": adapters, "initial_adapters": initial_adapters,
        "base_changed": sorted(n for n, t in base.items() if not torch.equal(t, initial_base[n])),
        "base_grads": sorted(canonical_name(n) for n, p in model.named_parameters()
                             if not p.requires_grad and p.grad is not None),
        "base_names": sorted(base),
    }


@functools.cache
def _reference() -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks share the two cores
    try:
        return train_case(None, GLOBAL_BINS)
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- one process


def test_install_on_meta_freezes_all_but_the_adapters() -> None:
    from meshplan.runtime.parallel.adapters import adapted_modules, install_adapters
    from meshplan.runtime.weights.loading import canonical_name, meta_model

    plain = {n for n, _ in meta_model("tiny-llama").named_parameters()}
    model = meta_model("tiny-llama")
    step = replace(_adapters_step(), dtype="bf16")
    install_adapters(model, step)
    assert sorted(adapted_modules(model)) == sorted(step.fqns)
    params = dict(model.named_parameters())
    assert all(p.is_meta for p in params.values())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable == {f"{f}.lora_{s}.default.weight" for f in step.fqns for s in "AB"}
    assert all(params[n].dtype == torch.bfloat16 for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in params.items() if n not in trainable)
    # The base keeps its Hugging Face names; the adapters' are new.
    assert {canonical_name(n) for n in params if n not in trainable} == plain
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert tuple(params["model.layers.0.self_attn.q_proj.lora_A.default.weight"].shape) == (RANK, 64)
    assert tuple(params["model.layers.0.self_attn.q_proj.lora_B.default.weight"].shape) == (64, RANK)
    assert q.scaling == {"default": step.scaling}


def test_an_embedding_carries_peft_embedding_adapter() -> None:
    from meshplan.runtime.parallel.adapters import install_adapters
    from meshplan.runtime.weights.loading import init_random, materialize, meta_model

    model = meta_model("tiny-llama")
    install_adapters(model, Adapters(fqns=("model.embed_tokens", "lm_head"), rank=RANK, alpha=ALPHA, dtype="fp64"))
    materialize(model, "cpu")
    init_random(model, SEED)
    params = dict(model.named_parameters())
    trainable = sorted(n for n, p in params.items() if p.requires_grad)
    assert trainable == ["lm_head.lora_A.default.weight", "lm_head.lora_B.default.weight",
                         "model.embed_tokens.lora_embedding_A.default", "model.embed_tokens.lora_embedding_B.default"]
    a, b = params["model.embed_tokens.lora_embedding_A.default"], params["model.embed_tokens.lora_embedding_B.default"]
    assert a.dtype == b.dtype == torch.float64 and tuple(a.shape) == (RANK, 256) and tuple(b.shape) == (64, RANK)
    # PEFT's embedding rule: A zeros, B normal(0, 1), so the adapter adds nothing yet.
    assert not a.any() and 0.5 < float(b.detach().std()) < 1.5
    out = model(input_ids=torch.arange(8).view(1, 8)).logits
    assert out.shape == (1, 8, 256)


def test_targets_peft_cannot_adapt_are_refused() -> None:
    from meshplan.runtime.parallel.adapters import AdapterError, install_adapters
    from meshplan.runtime.weights.loading import meta_model

    model = meta_model("tiny-llama")
    with pytest.raises(AdapterError, match=r"`model\.norm` is a LlamaRMSNorm: LoRA adapts Linear"):
        install_adapters(model, Adapters(fqns=("model.norm",), rank=2, alpha=2))
    with pytest.raises(AdapterError, match=r"no module `model\.layers\.7\.mlp`"):
        install_adapters(model, Adapters(fqns=("model.layers.7.mlp",), rank=2, alpha=2))
    install_adapters(model, Adapters(fqns=("lm_head",), rank=2, alpha=2))
    with pytest.raises(AdapterError, match=r"`lm_head` already carries a LoRA adapter"):
        install_adapters(model, Adapters(fqns=("lm_head",), rank=2, alpha=2))


def _adapted(seed: int | None) -> nn.Module:
    from meshplan.runtime.parallel.adapters import install_adapters
    from meshplan.runtime.weights.loading import init_random, materialize, meta_model

    model = meta_model("tiny-llama")
    install_adapters(model, _adapters_step())
    materialize(model, "cpu")
    if seed is not None:
        init_random(model, seed)
    return model


def test_init_is_peft_rule_and_a_loaded_base_leaves_adapters_initialised() -> None:
    from safetensors.torch import save_file

    from meshplan.runtime.parallel.adapters import adapter_side
    from meshplan.runtime.weights.loading import (
        canonical_name,
        init_random,
        load_broadcast,
        load_sharded,
        materialize,
        meta_model,
    )

    plain = meta_model("tiny-llama")
    materialize(plain, "cpu")
    init_random(plain, 3)
    seeded = {canonical_name(n): p.detach().clone() for n, p in _adapted(5).named_parameters()}
    for name, value in seeded.items():
        if adapter_side(name) == "A":  # kaiming_uniform_(a=sqrt(5)), as PEFT: bound 1/sqrt(in)
            bound = 1 / value.shape[1] ** 0.5
            assert 0.9 * bound < float(value.abs().max()) <= bound, name
        elif adapter_side(name) == "B":
            assert not value.any(), name
    with tempfile.TemporaryDirectory() as tmp:
        save_file({n: p.detach().contiguous() for n, p in plain.named_parameters()}, str(Path(tmp) / "model.safetensors"))
        for load in ("sharded", "broadcast"):
            model = _adapted(None)
            if load == "sharded":
                report = load_sharded(model, tmp, seed=5)
            else:
                report = load_broadcast(model, str(Path(tmp) / "model.safetensors"), seed=5)
            got = {canonical_name(n): p.detach() for n, p in model.named_parameters()}
            assert sorted(report.initialised) == sorted(n for n in got if adapter_side(n))
            assert len(report.initialised) == 2 * len(TARGETS) * LAYERS
            for name, value in got.items():
                expected = seeded[name] if adapter_side(name) else plain.get_parameter(name).detach()
                assert torch.equal(value, expected), (load, name)


# --------------------------------------------------------------------------- 4 ranks: the toy block


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 16, bias=False)
        self.down = nn.Linear(16, 8, bias=True)
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def _block_adapters() -> Adapters:
    return Adapters(fqns=("up", "down"), rank=RANK, alpha=ALPHA, span=ADAPTERS_SPAN)


def _block(seed: int) -> nn.Module:
    """The block with seeded base and adapter values (lora_B non-zero)."""
    from meshplan.runtime.parallel.adapters import install_adapters

    torch.manual_seed(seed)
    block = _Block()
    install_adapters(block, _block_adapters())
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return block


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest difference, relative to the largest magnitude expected."""
    return float((got - expected).abs().max() / expected.abs().max())


def tp_gradients_case() -> dict[str, Any]:
    """colwise(input = shard(1)) → relu → rowwise(output = shard(1)) on adapted Linears at tp 4:
    output, input gradient and adapter gradients against the same block in one process."""
    import torch.distributed as dist

    from meshplan.runtime.parallel.apply import apply
    from meshplan.runtime.parallel.mesh import build_mesh

    mesh_layout = MeshLayout(names=("tp",), shape=(WORLD,))
    parallel = Parallelize(fqn="", mesh_dim="tp", span=PARALLEL_SPAN, plan=(
        ("up", StyleCall(style="colwise", input="shard(1)", output="shard(-1)")),
        ("down", StyleCall(style="rowwise", input="shard(-1)", output="shard(1)")),
    ))
    program = Program(plan="toy", model="toy", world_size=WORLD, mesh=mesh_layout, steps=(parallel,))
    reference, block = _block(7), _block(7)
    mesh = build_mesh(program.mesh, "cpu")
    apply(program, block, mesh=mesh)  # the Adapters step already ran in `_block`
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(11)
    x, w = torch.randn(2, 8, 8, generator=g), torch.randn(2, 8, 8, generator=g)
    x_ref = x.clone().requires_grad_(True)
    (reference(x_ref) * w).sum().backward()
    x_local = x.chunk(WORLD, dim=1)[rank].clone().requires_grad_(True)
    out = block(x_local)
    (out * w.chunk(WORLD, dim=1)[rank]).sum().backward()  # the ranks' sums add up to the loss
    assert x_local.grad is not None and x_ref.grad is not None
    diffs = {"output": _relative(out.detach(), reference(x).detach().chunk(WORLD, dim=1)[rank]),
             "input grad": _relative(x_local.grad, x_ref.grad.chunk(WORLD, dim=1)[rank])}
    ref_params = dict(reference.named_parameters())
    placements = {}
    for name, p in block.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
            continue
        grad = p.grad.full_tensor()  # Partial (pending sums over tp) or Replicate
        expected = ref_params[name].grad
        assert expected is not None and float(expected.abs().max()) > 1e-3, name
        diffs[name] = _relative(grad, expected)
        placements[name] = str(p.placements)
    return {"diffs": diffs, "placements": placements}


def test_tensor_parallel_adapter_gradients_are_exact(pool: RankPool) -> None:
    results = pool.run(tp_gradients_case)
    names = {"up.lora_A.default.weight", "up.lora_B.default.weight", "down.lora_A.default.weight",
             "down.lora_B.default.weight"}
    for r in results:
        assert names <= set(r["diffs"]), r["diffs"]
        assert max(r["diffs"].values()) < TP_RTOL, r["diffs"]
    # PEFT's convention: colwise base → lora_A replicated, lora_B colwise; rowwise base →
    # lora_A rowwise, lora_B replicated.
    placements = results[0]["placements"]
    assert placements["up.lora_A.default.weight"] == "(Replicate(),)"
    assert placements["up.lora_B.default.weight"] == "(Shard(dim=0),)"
    assert placements["down.lora_A.default.weight"] == "(Shard(dim=1),)"
    assert placements["down.lora_B.default.weight"] == "(Replicate(),)"


def errors_case() -> list[str]:
    from meshplan.runtime.parallel.apply import StepError, apply
    from meshplan.runtime.parallel.mesh import build_mesh

    mesh_layout = MeshLayout(names=("tp",), shape=(WORLD,))
    mesh = build_mesh(mesh_layout, "cpu")
    messages = []
    bad_target = Adapters(fqns=("norm",), rank=2, alpha=2, span=ADAPTERS_SPAN)
    bad_style = Parallelize(fqn="", mesh_dim="tp", span=PARALLEL_SPAN,
                            plan=(("up", StyleCall(style="sequence_parallel")),))
    for steps in ((bad_target,), (_block_adapters(), bad_style)):
        program = Program(plan="toy", model="toy", world_size=WORLD, mesh=mesh_layout, steps=steps)
        try:
            apply(program, _Block(), mesh=mesh)
            messages.append("no error")
        except StepError as e:
            messages.append(str(e))
    return messages


def test_plan_errors_name_the_plan_line(pool: RankPool) -> None:
    for target, style in pool.run(errors_case):
        assert target == "lora.plan:30:1: `norm` is a LayerNorm: LoRA adapts Linear, Embedding and Conv1D modules"
        assert style.startswith("lora.plan:21:3: `up` carries a LoRA adapter, which style sequence_parallel "
                                "cannot lay out beside its Linear base (styles that can: colwise, rowwise, replicate)"), style


# --------------------------------------------------------------------------- 4 ranks: training


@pytest.mark.parametrize("layout", LAYOUTS)
def test_lora_trains_like_one_process(pool: RankPool, layout: str) -> None:
    program = _program(layout)
    dp = program.mesh.size("dp_replicate") * program.mesh.size("dp_shard") if layout != "fsdp4" else WORLD
    results = pool.run(train_case, program.to_json(), GLOBAL_BINS // dp)
    ref = _reference()
    assert all(n > MAX_NORM for n in ref["norm"])  # clipping is exercised
    adapters = sorted(ref["adapters"])
    assert ref["optimized"] == adapters and len(adapters) == 2 * len(TARGETS) * LAYERS
    for name in adapters:  # every adapter trained, lora_A included (lora_B starts non-zero)
        assert not torch.equal(ref["adapters"][name], ref["initial_adapters"][name]), name
    for got in results:
        where = f"rank {got['rank']}"
        assert got["tokens"] == ref["tokens"], where
        torch.testing.assert_close(torch.tensor(got["loss"]), torch.tensor(ref["loss"]), rtol=LOSS_RTOL, atol=0)
        torch.testing.assert_close(torch.tensor(got["norm"]), torch.tensor(ref["norm"]), rtol=LOSS_RTOL, atol=0)
        assert got["optimized"] == adapters, where
        assert got["base_names"] == ref["base_names"], where
        assert got["base_changed"] == [] and got["base_grads"] == [], where
        for name in adapters:
            assert torch.equal(got["initial_adapters"][name], ref["initial_adapters"][name]), (where, name)
            diff = float((got["adapters"][name] - ref["adapters"][name]).abs().max())
            assert diff <= ADAPTER_ATOL, (where, name, diff)
