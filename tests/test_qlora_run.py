"""QLoRA with torchao's NF4 bases under FSDP2 (`runtime.parallel.quantize`) is exact.

- One process: PEFT's LoRA Linear on an NF4 base computes base + adapter with the
  weight dequantised to the compute dtype; the base gets no gradient; bad shapes and
  backends are refused, naming the weight.
- The scaler-mean fact, on 4 gloo ranks: shards quantised each alone make FSDP2's
  all-gather dequantise the other ranks' rows with the local mean (the ranks disagree),
  while chunks of the whole weight's quantisation gather to it exactly (also when a
  weight is stored again after FSDP2 built its unsharded tensor).
- Loading, on 4 gloo ranks under HSDP 2 × 2: `load_sharded` and `load_broadcast` of a
  Hugging Face checkpoint leave every rank the chunk of the whole weight's quantisation.
- Training, on 4 gloo ranks: a tiny Llama (2 layers; widths such that every adapted
  weight splits into whole NF4 blocks over 4 ranks) with LoRA (rank 16) on
  q,k,v,o,gate,up,down over NF4 bases, fp32 compute, 3 AdamW steps through
  `runtime.train`'s loop: under FSDP 4 (plans/fsdp.plan; PEFT and `quantize_bases` called
  here on the meta model) and under HSDP 2 × 2 from plans/llama_qlora.plan itself (its
  Adapters step applied by the runtime, through `build_applied`). Every rank's losses and
  adapter weights equal one process's (whose bases are `to_nf4` of the full weights)
  within 1e-5, and every rank's NF4 shard is, before and after training, byte for byte
  its chunk of the one-process NF4 weight.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.distributed import RankPool, rank_pool_fixture

WORLD = 4
STEPS = 3
SEQ_LEN = 32
GLOBAL_BINS = 4
BLOCK, SCALER_BLOCK = 64, 256
RANK = 16  # plans/llama_qlora.plan's (alpha = 2 × rank there too)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PLANS = Path(__file__).resolve().parent.parent / "plans"
# name → (plan file, overrides)
# name → (plan file, overrides). The QLoRA plan's Adapters step is applied by the runtime
# (`build_applied`); the others' Programs hold FullyShard steps only, and the test injects
# and quantises before applying them.
LAYOUTS = {
    "fsdp4": ("fsdp.plan", ()),
    "hsdp2x2": ("llama.plan", ("tp=1", "mesh.dp_replicate=2")),
    "qlora-plan-hsdp2x2": ("llama_qlora.plan", ("mesh.dp_replicate=2", "dropout=0.0")),
}
INNER = ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean")

pool = rank_pool_fixture(WORLD, timeout=300.0)


def _nf4() -> Any:
    from meshplan.runtime.parallel.quantize import _nf4

    return _nf4()


def _quantize(compute: str = "fp32") -> Any:
    from meshplan.planner.program import Quantize

    return Quantize(compute=compute, block_size=BLOCK, scaler_block_size=SCALER_BLOCK)


def _step(fqns: tuple[str, ...], compute: str = "fp32") -> Any:
    from meshplan.planner.program import Adapters

    return Adapters(fqns=fqns, rank=RANK, alpha=2 * RANK, quantize=_quantize(compute))


def _inject(model: nn.Module, fqns: tuple[str, ...]) -> None:
    """PEFT's LoRA on exactly `fqns` (the Adapters step's injection)."""
    from peft import LoraConfig, inject_adapter_in_model

    on_meta = any(p.is_meta for p in model.parameters())
    config = LoraConfig(target_modules=list(fqns), r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, bias="none")
    inject_adapter_in_model(config, model, low_cpu_mem_usage=on_meta)


# --------------------------------------------------------------------------- one process


@pytest.mark.parametrize("compute", ["fp32", "bf16"])
def test_peft_lora_on_an_nf4_base(compute: str) -> None:
    from meshplan.runtime.parallel.quantize import NF4Linear, is_quantized, quantize_bases

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128, bias=False))
    plain = model[0].weight.detach().clone()
    _inject(model, ("0",))
    names = quantize_bases(model, _step(("0",), compute))
    assert names == ("0.base_layer.weight",)
    wrapper = model[0]
    base = wrapper.base_layer
    assert isinstance(base, NF4Linear) and is_quantized(base.weight) and not base.weight.requires_grad
    nn.init.normal_(wrapper.lora_B.default.weight)  # PEFT starts B at zero: make the adapter count
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[compute]
    x = torch.randn(5, 256, requires_grad=True)
    y = model(x)
    assert y.dtype == torch.float32  # the input's dtype
    dequantised = _nf4().to_nf4(plain.to(dtype), BLOCK, SCALER_BLOCK).get_original_weight()
    a, b = wrapper.lora_A.default.weight, wrapper.lora_B.default.weight
    expected = (x.detach().to(dtype) @ dequantised.t()).float() + (x.detach() @ a.t() @ b.t()) * 2.0
    torch.testing.assert_close(y.detach(), expected, rtol=0, atol=1e-5 if compute == "fp32" else 0.05)
    y.square().sum().backward()
    assert base.weight.grad is None
    assert a.grad is not None and b.grad is not None and x.grad is not None


def test_quantize_bases_refuses_what_nf4_cannot_hold() -> None:
    from meshplan.planner.program import Adapters, Quantize
    from meshplan.runtime.parallel.quantize import QuantizeError, quantize_bases

    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(96, 100), nn.Embedding(16, 1024))
    with pytest.raises(QuantizeError, match=r"0\.weight cannot be held in NF4: 100 × 96 = 9600 values"):
        quantize_bases(model, _step(("0",)))
    with pytest.raises(QuantizeError, match=r"must be an nn\.Linear, not Embedding"):
        quantize_bases(model, _step(("1",)))
    step = Adapters(fqns=("0",), rank=8, alpha=16, quantize=Quantize(backend="bitsandbytes"))
    with pytest.raises(QuantizeError, match="torchao only"):
        quantize_bases(model, step)


# --------------------------------------------------------------------------- the scaler-mean fact


def _sharded_linear() -> nn.Module:
    """A 128 × 512 NF4 Linear, FSDP2-sharded over every rank, its shards allocated."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from meshplan.runtime.parallel.quantize import quantize_bases

    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(512, 128, bias=False))
    quantize_bases(model, _step(("0",)))
    fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    model.to_empty(device="cpu")
    return model


def shards_case() -> dict[str, Any]:
    """The Linear's shards from the whole weight's quantisation (`store_quantized`), the
    same after storing a second weight once the first was all-gathered, and (a fresh
    Linear) from quantising each rank's rows alone."""
    import torch.distributed as dist

    from meshplan.runtime.parallel.quantize import store_quantized

    nf4 = _nf4()
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(128, 512, generator=g) * torch.linspace(0.5, 2.0, 128)[:, None]  # rows differ
    second = torch.randn(128, 512, generator=g) * 3.0
    x = torch.randn(3, 512, generator=g)
    model = _sharded_linear()
    store_quantized(model[0], "weight", weight)
    from_whole = model(x).detach().clone()
    model.reshard()
    store_quantized(model[0], "weight", second)  # FSDP2's unsharded tensor exists now
    from_second = model(x).detach().clone()
    rows = 128 // world
    alone = nf4.to_nf4(weight[rank * rows:(rank + 1) * rows].clone(), BLOCK, SCALER_BLOCK)
    inner = {a: torch.empty(getattr(alone, a).shape, dtype=getattr(alone, a).dtype).copy_(getattr(alone, a))
             for a in (*INNER, "nf4")}
    model = _sharded_linear()
    model[0].weight._local_tensor = nf4.NF4Tensor(*nf4.construct_nf4_args(alone, inner))
    from_alone = model(x).detach().clone()
    return {"x": x, "weight": weight, "second": second, "whole": from_whole, "again": from_second,
            "alone": from_alone, "own": alone.get_original_weight().clone(), "mean": float(alone.scaler_mean)}


def test_shards_must_come_from_the_whole_weight(pool: RankPool) -> None:
    results = pool.run(shards_case)
    x, weight = results[0]["x"], results[0]["weight"]
    whole = _nf4().to_nf4(weight, BLOCK, SCALER_BLOCK).get_original_weight()
    second = _nf4().to_nf4(results[0]["second"], BLOCK, SCALER_BLOCK).get_original_weight()
    intended = x @ torch.cat([results[r]["own"] for r in range(WORLD)]).t()  # each shard, its own mean
    rows = 128 // WORLD
    for r in range(WORLD):
        assert torch.equal(results[r]["whole"], x @ whole.t())  # exact, on every rank
        assert torch.equal(results[r]["again"], x @ second.t())
        mine = slice(r * rows, (r + 1) * rows)
        torch.testing.assert_close(results[r]["alone"][:, mine], intended[:, mine], rtol=0, atol=1e-5)
        others = torch.ones(128, dtype=torch.bool)
        others[mine] = False
        assert (results[r]["alone"][:, others] - intended[:, others]).abs().max() > 1e-3
    assert len({results[r]["mean"] for r in range(WORLD)}) == WORLD  # the means differ
    assert (results[0]["alone"] - results[1]["alone"]).abs().max() > 1e-3  # so do the ranks


# --------------------------------------------------------------------------- training


def _config() -> Any:
    from transformers import LlamaConfig

    # q/k/v/o: 256 × 256, gate/up: 512 × 256, down: 256 × 512: all multiples of
    # block_size × scaler_block_size × 4 ranks = 65536 elements, 4 | rows.
    return LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                       tie_word_embeddings=False, torch_dtype="float32", use_cache=False)


def _meta_model() -> nn.Module:
    from transformers import LlamaForCausalLM

    from meshplan.runtime.attention import select_backend, use_backend
    from meshplan.runtime.weights.loading import meta_params

    with meta_params():
        model = LlamaForCausalLM(_config())
    use_backend(model, select_backend("cpu"))
    return model


def _fqns(model: nn.Module) -> tuple[str, ...]:
    return tuple(n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in TARGETS)


@functools.cache
def _data() -> Any:
    from meshplan.runtime.train.data import PackedData, synthetic_sequences

    return PackedData.build(synthetic_sequences(64, 256, min_len=4, max_len=SEQ_LEN, seed=1), SEQ_LEN)


def _adapters(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            full = p.full_tensor() if isinstance(p, DTensor) else p
            out[name.replace("_checkpoint_wrapped_module.", "")] = full.detach().clone()
    return out


def _nf4_shards(model: nn.Module) -> dict[str, tuple[int, dict[str, torch.Tensor]]]:
    """Base name → (first global row, the local NF4 chunk's inner tensors)."""
    from torch.distributed.tensor import DTensor

    from meshplan.runtime.parallel.quantize import is_quantized
    from meshplan.runtime.weights.loading import global_indices

    out = {}
    for name, p in model.named_parameters():
        if is_quantized(p):
            local = p._local_tensor if isinstance(p, DTensor) else p
            first = int(global_indices(p)[0][0])
            out[name] = (first, {a: getattr(local, a).detach().clone() for a in INNER})
    return out


def _quantised_model(program_json: str) -> tuple[nn.Module, Any]:
    """Inject, quantise on meta, apply the Program (FSDP2), allocate: the runtime's order."""
    from meshplan.planner.program import Program
    from meshplan.runtime.parallel.apply import apply
    from meshplan.runtime.parallel.quantize import quantize_bases
    from meshplan.runtime.weights.loading import materialize

    model = _meta_model()
    fqns = _fqns(model)
    _inject(model, fqns)
    quantize_bases(model, _step(fqns))
    applied = apply(Program.from_json(program_json), model)
    materialize(applied, "cpu")
    return model, applied


def load_case(program_json: str, directory: str) -> dict[str, Any]:
    """The NF4 shards `load_sharded` and `load_broadcast` (rank 0 reads) leave."""
    import torch.distributed as dist
    from safetensors.torch import load_file

    from meshplan.runtime.weights.loading import load_broadcast, load_sharded

    model, applied = _quantised_model(program_json)
    load_sharded(applied, directory)
    sharded = _nf4_shards(model)
    model, applied = _quantised_model(program_json)
    source = load_file(str(Path(directory) / "model.safetensors")) if dist.get_rank() == 0 else None
    load_broadcast(applied, source)
    return {"sharded": sharded, "broadcast": _nf4_shards(model)}


def _train(model: nn.Module, target: Any, topology: Any, micro_batch: int) -> list[float]:
    from meshplan.runtime.train.loop import TrainConfig, make_optimizer, train

    config = TrainConfig(steps=STEPS, lr=1e-3, weight_decay=0.1, max_grad_norm=1.0)
    optimizer = make_optimizer(model, config)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    loader = _data().loader(topology.dp_rank, topology.dp_size, micro_batch=micro_batch, seed=0)
    return [s.loss for s in train(target, optimizer, loader, topology, config)]


def qlora_case(program_json: str, micro_batch: int) -> dict[str, Any]:
    """The quantised model (`_quantised_model`) with seeded weights, trained."""
    from meshplan.runtime.train.topology import Topology
    from meshplan.runtime.weights.loading import init_random

    model, applied = _quantised_model(program_json)
    init_random(applied, 0)
    before = _nf4_shards(model)
    initial = _adapters(model)
    losses = _train(model, applied, Topology.of(applied), micro_batch)
    return {"loss": losses, "adapters": _adapters(model), "initial": initial, "before": before,
            "after": _nf4_shards(model)}


def plan_case(program_json: str, micro_batch: int) -> dict[str, Any]:
    """The Program's own Adapters step (PEFT, then `quantize_bases`) through `build_applied`
    (meta model, apply, materialize, `load_weights`: seeded), trained."""
    from transformers import LlamaForCausalLM

    from meshplan.planner.program import Program
    from meshplan.runtime.train.build import build_applied
    from meshplan.runtime.train.topology import Topology

    with torch.device("meta"):
        source = LlamaForCausalLM(_config())
    applied = build_applied(Program.from_json(program_json), source, seed=0, device="cpu").applied
    model = applied.model
    before, initial = _nf4_shards(model), _adapters(model)
    losses = _train(model, applied, Topology.of(applied), micro_batch)
    return {"loss": losses, "adapters": _adapters(model), "initial": initial, "before": before,
            "after": _nf4_shards(model)}


@functools.cache
def _reference() -> dict[str, Any]:
    """One process: the same adapted model with plain weights, then each base weight
    replaced by `to_nf4` of it (a plain nn.Linear: F.linear runs torchao's linear_nf4)."""
    from meshplan.runtime.train.topology import Topology
    from meshplan.runtime.weights.loading import init_random, materialize

    model = _meta_model()
    fqns = _fqns(model)
    _inject(model, fqns)
    materialize(model, "cpu")
    init_random(model, 0)
    bases = {}
    for fqn in fqns:
        base = model.get_submodule(fqn).base_layer
        base.weight = nn.Parameter(_nf4().to_nf4(base.weight.detach(), BLOCK, SCALER_BLOCK), requires_grad=False)
        bases[f"{fqn}.base_layer.weight"] = base.weight
    initial = _adapters(model)
    losses = _train(model, model, Topology(), GLOBAL_BINS)
    return {"loss": losses, "adapters": _adapters(model), "initial": initial, "bases": bases}


def _program(layout: str) -> Any:
    from meshplan.planner.compile import compile_plan
    from meshplan.planner.graph import build_graph

    file, overrides = LAYOUTS[layout]
    text = (PLANS / file).read_text(encoding="utf-8")
    text = re.sub(r"^activation_checkpoint\b.*$", "", text, flags=re.M)
    text = re.sub(r"^\s*mixed_precision\s*\{[^}]*\}.*$", "", text, flags=re.M)  # fp32 throughout
    text = text.replace("compute = bf16", "compute = fp32")
    with torch.device("meta"):
        from transformers import LlamaForCausalLM

        source = LlamaForCausalLM(_config())
    program = compile_plan(text, build_graph(source), WORLD, [*overrides, f"seq_len={SEQ_LEN}"]).program
    adapters = [s for s in program.steps if s.kind == "adapters"]
    assert {s.kind for s in program.steps} - {"adapters"} == {"fully_shard"}
    if adapters:  # the plan's step is the one the other layouts build by hand
        assert adapters[0] == dataclasses.replace(_step(adapters[0].fqns), span=adapters[0].span)
    return program


@pytest.mark.parametrize("layout", ["fsdp4", "qlora-plan-hsdp2x2"])
def test_qlora_trains_like_one_process(pool: RankPool, layout: str) -> None:
    program = _program(layout)
    dp = math.prod(program.mesh.size(d) for d in ("dp_replicate", "dp_shard"))
    case = plan_case if layout.startswith("qlora-plan") else qlora_case
    results = pool.run(case, program.to_json(), GLOBAL_BINS // dp)
    ref = _reference()
    shards = program.mesh.size("dp_shard")
    worst = {"loss": 0.0, "adapters": 0.0}
    for rank, got in enumerate(results):
        torch.testing.assert_close(torch.tensor(got["loss"]), torch.tensor(ref["loss"]), rtol=0, atol=1e-5)
        worst["loss"] = max(worst["loss"], max(abs(a - b) for a, b in zip(got["loss"], ref["loss"], strict=True)))
        assert got["adapters"].keys() == ref["adapters"].keys() and len(ref["adapters"]) == 2 * 7 * 2
        for name, value in ref["adapters"].items():
            assert torch.equal(got["initial"][name], ref["initial"][name]), name
            torch.testing.assert_close(got["adapters"][name], value, rtol=0, atol=1e-5, msg=name)
            worst["adapters"] = max(worst["adapters"], float((got["adapters"][name] - value).abs().max()))
            if ".lora_B." in name:
                assert not torch.equal(value, ref["initial"][name]), f"{name} did not train"
        assert got["before"].keys() == ref["bases"].keys()
        for name, whole in ref["bases"].items():
            first, inner = got["before"][name]
            chunk = _chunk_of(whole, first, shards)
            for attr in INNER:
                assert torch.equal(inner[attr], getattr(chunk, attr)), (rank, name, attr)
                assert torch.equal(got["after"][name][1][attr], inner[attr]), (rank, name, attr)
    print(f"{layout}: max |loss - one process| {worst['loss']:.2e}, "
          f"max |adapter - one process| {worst['adapters']:.2e}")


def _chunk_of(whole: Any, first: int, shards: int) -> Any:
    rows = whole.shape[0] // shards
    return whole.split(rows, 0)[first // rows]


def test_loaders_keep_chunks_of_the_whole_quantisation(pool: RankPool, tmp_path: Path) -> None:
    """Checkpoint bases (Hugging Face names, no adapters) read whole, quantised, chunked."""
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    plain = LlamaForCausalLM(_config())
    weights = {n: p.detach().clone().contiguous() for n, p in plain.state_dict().items()}
    save_file(weights, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(_config().to_json_string(), encoding="utf-8")
    program = _program("hsdp2x2")
    results = pool.run(load_case, program.to_json(), str(tmp_path))
    shards = program.mesh.size("dp_shard")
    for got in results:
        for how in ("sharded", "broadcast"):
            assert len(got[how]) == 2 * 7
            for name, (first, inner) in got[how].items():
                whole = _nf4().to_nf4(weights[name.replace("base_layer.", "")], BLOCK, SCALER_BLOCK)
                chunk = _chunk_of(whole, first, shards)
                for attr in INNER:
                    assert torch.equal(inner[attr], getattr(chunk, attr)), (how, name, attr)

