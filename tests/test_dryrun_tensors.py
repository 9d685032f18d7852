"""Where the dry run's steps run: the net on meta tensors first, fake CPU tensors where the
model needs them; explain's figures on fake CPU tensors.

On a Llama the meta step follows the fake one exactly (activations per block, live memory,
every collective); SDPA on meta takes the kernel CPU takes (flash, not the math kernel
meta takes by itself); a step that cannot run on meta runs on fake tensors, and only a
failure there is the model's. Grouped experts run in fp32 too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from meshplan.planner import compile_plan
from meshplan.runtime.explain import trace
from meshplan.runtime.explain.reduction import reduce_program
from meshplan.runtime.explain.world import fake_world

from .conftest import ROOT

LLAMA = ROOT / "plans" / "llama.plan"


@pytest.mark.parametrize(("overrides", "selective"), [(["tp=2"], False), (["tp=2", "mesh.cp=2"], False),
                                                      (["tp=2"], True)], ids=["tp", "tp-cp", "selective"])
def test_the_step_on_meta_equals_the_step_on_fake_tensors(overrides: list[str], selective: bool,
                                                          tmp_path: Path) -> None:
    plan = LLAMA
    if selective:
        text = LLAMA.read_text(encoding="utf-8").replace("{ mode = full }", "{ mode = selective }")
        assert "mode = selective" in text
        plan = tmp_path / "selective.plan"
        plan.write_text(text, encoding="utf-8")
    compiled = compile_plan(plan, "tiny-llama", 16, overrides)
    reduction = reduce_program(compiled.program, compiled.graph)
    steps = {}
    with fake_world(compiled.program.mesh, 0) as mesh:
        for meta in (True, False):
            steps[meta] = trace._trace_step(compiled.program, compiled.graph.source, reduction, seq_len=256,
                                            micro_batch=2, dtype="bf16", mesh=mesh, meta=meta)
    assert steps[True] == steps[False]
    assert steps[True].events and all(b.saved > 0 for b in steps[True].blocks.values())
    # Identical blocks measure alike (a freed storage's address once marked a later one).
    assert len({b.selective for b in steps[True].blocks.values()}) == 1


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kv_heads", [8, 2], ids=["mha", "gqa"])
def test_sdpa_on_meta_takes_the_kernel_cpu_takes(kv_heads: int) -> None:
    def run(device: str, mode: bool) -> tuple[list[str], torch.Size]:
        q = torch.empty(1, 8, 128, 64, dtype=torch.bfloat16, device=device, requires_grad=True)
        k = torch.empty(1, kv_heads, 128, 64, dtype=torch.bfloat16, device=device, requires_grad=True)
        ops = _Ops()
        with ops:
            if mode:
                with trace._CpuAttentionKernel():
                    out = torch.nn.functional.scaled_dot_product_attention(q, k, k, is_causal=True,
                                                                           enable_gqa=kv_heads != 8)
            else:
                out = torch.nn.functional.scaled_dot_product_attention(q, k, k, is_causal=True,
                                                                       enable_gqa=kv_heads != 8)
        return ops.seen, out.shape

    cpu_ops, cpu_shape = run("cpu", False)
    meta_ops, meta_shape = run("meta", True)
    plain_meta_ops, _ = run("meta", False)
    fused = [op for op in cpu_ops if "scaled_dot_product" in op]
    assert fused and [op for op in meta_ops if "scaled_dot_product" in op] == fused
    assert meta_shape == cpu_shape
    assert not any("scaled_dot_product" in op for op in plain_meta_ops)  # meta alone: the math kernel


def test_a_step_that_fails_on_meta_runs_on_fake_tensors() -> None:
    tried: list[bool] = []

    def fails(meta: bool) -> str:
        tried.append(meta)
        with trace.step_tensors(meta=meta):
            torch.zeros(4) @ torch.zeros(3)  # wrong shapes on any tensors
        return "ran"

    with pytest.raises(RuntimeError):
        trace.meta_first(fails)  # failing on fake tensors too: the model's failure, raised
    assert tried == [True, False]

    def needs_fake(meta: bool) -> str:
        tried.append(meta)
        with trace.step_tensors(meta=meta):
            x = torch.zeros(4)
            if x.device.type == "meta":
                x.sum().item()  # meta tensors have no data
            return type(x).__name__

    tried.clear()
    assert trace.meta_first(needs_fake) == "FakeTensor"
    assert tried == [True, False]


FP32_MIXTRAL = """\
plan mixtral_fp32 for MixtralForCausalLM

mesh {
  dp_shard = auto
  tp = 2
}

tensor_parallel on tp {
  model.layers.*.self_attn.{q,k,v}_proj : colwise
  model.layers.*.self_attn.o_proj       : rowwise
}

fully_shard on dp_shard {
  unit model.layers.*
  root
}
"""


def test_grouped_experts_in_fp32_run_in_the_dry_run() -> None:
    """torch's grouped matmul has a bf16-only fake/meta kernel (its CPU kernel takes fp32):
    an fp32 MoE plan — exact on real ranks — must pass the net and be explained."""
    from meshplan.runtime.explain.net import check_runs
    from meshplan.runtime.explain.report import explain

    compiled = compile_plan(FP32_MIXTRAL, "tiny-mixtral", 4)
    assert check_runs(compiled, seq_len=64) == []
    ex = explain(compiled, seq_len=64)
    assert ex.compute_dtype == "fp32" and ex.memory[0].activations > 0
