"""`plan explain` under adapters: frozen bases, adapter parameters and 4-bit bytes.

The dry-run model is the adapted one (the runtime's `install_adapters` on the meta
model), so every figure reads the parameters as the Program leaves them:

- a frozen parameter costs its storage and nothing else (no gradient, no AdamW state);
  the adapters (rank · (in + out) per adapted Linear) cost all three;
- an NF4 base costs `nf4_bytes` of its FSDP2 shard (checked against what torchao
  allocates), and FSDP2 gathers only its codes, scalers and scales; the reduce-scatter
  buffer holds the trainable parameters only;
- the module tree marks frozen parameters and NF4 bases, the JSON carries them;
- `--compare-adapters` prints full fine-tuning, LoRA and QLoRA side by side (golden:
  Llama-3.1-70B on 8 ranks); a QLoRA variant under tensor parallelism says why it is not
  measured; a plan without adapters is a usage error.

The real 4-rank comparison (exact parameter, gradient and optimizer bytes for LoRA and
QLoRA) is tests/test_explain_real.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import pytest
import torch

from meshplan.cli.main import main
from meshplan.planner import Compiled, compile_plan
from meshplan.planner.program import Adapters, Quantize
from meshplan.runtime.explain.comm import compute_dtype, itemsize, reduce_dtype
from meshplan.runtime.explain.report import Explanation, adapter_variants, explain
from meshplan.runtime.explain.sizes import nf4_bytes, nf4_gathered_bytes

from .conftest import ROOT, assert_golden

FSDP = ROOT / "plans" / "fsdp.plan"
WORLD = 4
RANK = 4
# tiny-llama: hidden 64, intermediate 128, 2 layers; q/o 64×64, k/v 32×64.
TARGETS = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
ADAPTER_NUMEL = 2 * RANK * ((64 + 64) + (64 + 32) + (128 + 64))  # layers · rank · Σ (in + out)
SMALL_BLOCKS = Quantize(block_size=16, scaler_block_size=8)  # whole blocks in every shard of 4


def _nf4() -> Any:
    from meshplan.runtime.parallel.quantize import _nf4

    return _nf4()


def _inner_bytes(t: Any, names: tuple[str, ...] | None = None) -> int:
    names = names or tuple(t.__tensor_flatten__()[0])
    return sum(getattr(t, n).numel() * getattr(t, n).element_size() for n in names)


def test_nf4_bytes_are_what_torchao_allocates() -> None:
    nf4 = _nf4()
    gathered = ("quantized_data", "quantized_scalers", "quantization_factor")  # fsdp_pre_all_gather's
    for dtype in (torch.bfloat16, torch.float32):
        weight = torch.randn(64, 128, dtype=dtype)
        whole = nf4.to_nf4(weight, 16, 8)
        size = dtype.itemsize
        assert _inner_bytes(whole) == nf4_bytes(weight.numel(), 16, 8, itemsize=size)
        assert _inner_bytes(whole, gathered) == nf4_gathered_bytes(weight.numel(), 16, 8, itemsize=size)
        # A dim-0 chunk (FSDP2's shard of 4): the same formula on its numel.
        piece = whole.split(16, 0)[1]
        assert _inner_bytes(piece, gathered) == nf4_gathered_bytes(16 * 128, 16, 8, itemsize=size)
    # The defaults, on a 70B projection: 4 bits a value plus 1/64 byte of scaler.
    assert nf4_gathered_bytes(8192 * 8192) == 8192 * 8192 // 2 + 8192 * 8192 // 64 + 8192 * 8192 // 64 // 256 * 4


def _program(quantize: Quantize | None, *, adapted: bool = True) -> Compiled:
    """plans/fsdp.plan on tiny-llama at 4 ranks, with an Adapters step built by hand."""
    compiled = compile_plan(FSDP, "tiny-llama", WORLD, ["seq_len=64"])
    if not adapted:
        return compiled
    program = compiled.program
    step = Adapters(fqns=tuple(f"model.layers.{i}.{t}" for i in range(2) for t in TARGETS), rank=RANK,
                    alpha=2 * RANK, quantize=quantize)
    return dataclasses.replace(compiled, program=dataclasses.replace(program, steps=(step, *program.steps)))


@pytest.fixture(scope="module")
def explained() -> dict[str, Explanation]:
    return {name: explain(_program(q, adapted=name != "full"), seq_len=64, trace=False)
            for name, q in (("full", None), ("lora", None), ("qlora", SMALL_BLOCKS))}


def test_frozen_parameters_cost_no_gradient_or_optimizer_state(explained: dict[str, Explanation]) -> None:
    full, lora = explained["full"], explained["lora"]
    shards = lora.classes[0].shards
    assert {k for k, s in shards.items() if s.requires_grad} == {k for k in shards if ".lora_" in k}
    assert "model.layers.0.self_attn.q_proj.base_layer.weight" in shards
    assert "model.layers.0.self_attn.q_proj.weight" not in shards
    counts = lora.parameter_counts()
    assert counts.trainable == ADAPTER_NUMEL and counts.nf4 == 0
    assert counts.trainable + counts.frozen == full.parameter_counts().trainable + ADAPTER_NUMEL
    # fp32, every shard even over 4 ranks: the adapters' bytes are a quarter of 4 · numel.
    m, dense = lora.rank0, full.rank0
    assert m.parameters == dense.parameters + ADAPTER_NUMEL * 4 // WORLD
    assert m.gradients == ADAPTER_NUMEL * 4 // WORLD
    assert m.optimizer == 2 * m.gradients
    assert dense.gradients == dense.parameters and dense.optimizer == 2 * dense.parameters


def _fsdp_buffers(ex: Explanation) -> int:
    """The FSDP buffers by their rule (memory.py's docstring), parameter by parameter."""
    shards, storage = ex.classes[0].shards, ex.param_dtype
    held = largest = resharding = reducing = 0
    for unit in ex.units:
        gathered = reduced = 0
        for fqn in unit.params:
            s = shards[ex.reduction.representative(fqn)]
            if s.quantize is not None:
                gathered += nf4_gathered_bytes(s.unsharded_numel, s.quantize.block_size,
                                               s.quantize.scaler_block_size, itemsize=s.itemsize)
            else:
                gathered += s.unsharded_numel * itemsize(compute_dtype(unit.step, storage))
            if s.requires_grad:
                reduced += s.unsharded_numel * itemsize(reduce_dtype(unit.step, storage))
        if unit.step.reshard_after_forward is False:
            held += gathered
        else:
            resharding += 1
            largest = max(largest, gathered)
        reducing = max(reducing, reduced)
    return held + largest * min(resharding, 2) + reducing


def test_nf4_bases_cost_their_4_bit_bytes(explained: dict[str, Explanation]) -> None:
    lora, qlora = explained["lora"], explained["qlora"]
    bases = {k: s for k, s in qlora.classes[0].shards.items() if s.quantize is not None}
    assert sorted(bases) == sorted(f"model.layers.{i}.{t}.base_layer.weight" for i in range(2) for t in TARGETS)
    saved = 0
    for key, s in bases.items():
        assert not s.requires_grad and s.dtype_label == "nf4"
        assert s.itemsize == 2  # torchao holds its scales in the compute dtype (bf16)
        assert s.storage_numel == math.prod(s.global_shape) // WORLD  # FSDP2 splits NF4 evenly, no padding
        assert s.storage_bytes == nf4_bytes(s.storage_numel, 16, 8, itemsize=2)
        saved += lora.classes[0].shards[key].storage_bytes - s.storage_bytes
    assert qlora.rank0.parameters == lora.rank0.parameters - saved
    assert (qlora.rank0.gradients, qlora.rank0.optimizer) == (lora.rank0.gradients, lora.rank0.optimizer)
    assert qlora.parameter_counts().nf4 == sum(math.prod(s.global_shape) for s in bases.values())
    # Gathered as codes, scalers and scales; reduced: the adapters only.
    for name in ("full", "lora", "qlora"):
        assert explained[name].rank0.fsdp_buffers == _fsdp_buffers(explained[name]), name
    assert explained["qlora"].rank0.fsdp_buffers < lora.rank0.fsdp_buffers < explained["full"].rank0.fsdp_buffers


def test_variants_drop_or_alter_the_adapters_step() -> None:
    program = _program(None).program
    variants = adapter_variants(program)
    assert list(variants) == ["full", "LoRA", "QLoRA"]
    assert not variants["full"].steps_of(Adapters)
    assert variants["full"].steps == program.steps[1:]
    (lora,) = variants["LoRA"].steps_of(Adapters)
    (qlora,) = variants["QLoRA"].steps_of(Adapters)
    assert lora.quantize is None and qlora.quantize == Quantize() and qlora.fqns == lora.fqns
    with pytest.raises(ValueError, match="no adapters section"):
        adapter_variants(variants["full"])


# --------------------------------------------------------------------------- CLI


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def _section(text: str, title: str) -> str:
    start = text.index(title)
    return text[start:text.index("\n\n", start) + 1]


def test_compare_golden_llama_3_1_70b_on_8_ranks(capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    code, out, err = _run(["explain", "plans/llama_qlora.plan", "--model", "llama-3.1-70b", "--world-size", "8",
                           "--compare-adapters"], capsys)
    assert code == 0, err
    memory = _section(out, "Memory per rank")
    assert "adapters: 207 M of 70.8 B parameters train (0.29 %)" in memory
    assert_golden("explain/llama_qlora_llama-3.1-70b_w8_compare.txt",
                  _section(out, "Full fine-tuning, LoRA and QLoRA"))


def test_compare_under_tensor_parallelism_json_and_tree(capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """plans/llama_lora.plan at tp 2: LoRA is the plan, full fine-tuning is measured, and
    QLoRA is not (NF4 bases cannot be tensor-parallel), saying why; the JSON carries the
    same figures; the tree marks the frozen bases."""
    monkeypatch.chdir(ROOT)
    argv = ["explain", "plans/llama_lora.plan", "--model", "tiny-llama", "--world-size", "4", "--set", "tp=2",
            "--set", "seq_len=64", "--compare-adapters"]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    table = _section(out, "Full fine-tuning, LoRA and QLoRA")
    assert "LoRA (this plan)" in table
    assert "QLoRA: not measured: NF4 bases shard over FSDP only, and the plan's tensor parallelism (tp = 2) " \
           "places 14 adapted modules (model.layers.0.self_attn.q_proj, …)" in table
    assert "lora_A.default.weight  [16, 64] → [8, 64]  [dp_replicate:R, fsdp:S(0), tp:R]  float32\n" in out
    assert "base_layer.weight  [64, 64] → [16, 64]  [dp_replicate:R, fsdp:_S(0, 2), tp:S(0)]  float32 frozen" in out
    code, out, err = _run([*argv, "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    compare = {v["variant"]: v for v in data["adapters"]["compare"]}
    assert [v["this_plan"] for v in compare.values()] == [False, True, False]
    assert compare["LoRA"]["memory"] == {k: v for k, v in data["memory"].items() if k != "classes"}
    assert compare["LoRA"]["parameters"] == data["adapters"]["parameters"]
    assert compare["full"]["parameters"]["frozen"] == 0
    assert compare["full"]["memory"]["optimizer_bytes"] > compare["LoRA"]["memory"]["optimizer_bytes"]
    assert compare["QLoRA"]["memory"] is None and "NF4 bases shard over FSDP only" in compare["QLoRA"]["error"]
    params = {p["name"]: p for m in data["modules"] if m["name"] == "model.layers.0.self_attn.q_proj"
              for p in m["params"]}
    assert params["base_layer.weight"]["frozen"] is True and "frozen" not in params["lora_A.default.weight"]


def test_compare_needs_an_adapters_section(capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    code, out, err = _run(["explain", "plans/fsdp.plan", "--model", "tiny-llama", "--world-size", "2",
                           "--compare-adapters"], capsys)
    assert code == 2 and not out
    assert "--compare-adapters: the plan has no adapters section" in err
