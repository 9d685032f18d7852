"""Selective activation checkpointing and CPU offload change memory, never the numbers.

One rank (gloo) runs a plan with `mode = selective` and `offload { pin_memory = false }`
under FSDP2; its loss and gradients after a step equal a plain single-process model's.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist

from meshplan.planner import compile_plan
from meshplan.runtime.attention import forward_kwargs, use_backend
from meshplan.runtime.packing import collate_varlen
from meshplan.runtime.train.build import build_applied, build_model
from meshplan.runtime.train.loss import loss_sum_and_count

PLAN = """\
plan options for LlamaForCausalLM
mesh {
  dp_shard = auto
}
activation_checkpoint model.layers.* { mode = selective }
fully_shard on dp_shard {
  offload { pin_memory = false }
  unit model.layers.*
  root
}
"""


@pytest.fixture(scope="module")
def one_rank() -> Iterator[None]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _loss_and_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    total, count = loss_sum_and_count(model(**forward_kwargs(batch)).logits, batch["labels"])
    (total / count).backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grads[name.replace("_checkpoint_wrapped_module.", "")] = g.detach().clone()
    return float((total / count).detach()), grads


def test_selective_checkpoint_and_offload_are_exact(one_rank: None) -> None:
    program = compile_plan(PLAN, "tiny-llama", 1).program
    kinds = [s.kind for s in program.steps]
    assert kinds.count("checkpoint") == 2 and program.steps[-1].offload is not None  # type: ignore[attr-defined]
    applied = build_applied(program, "tiny-llama", seed=3, device="cpu", backend="meshplan_sdpa").applied
    layer = applied.model.get_submodule("model.layers.0")
    assert "CheckpointWrapper" in type(layer).__name__ and layer.checkpoint_fn.keywords.get("context_fn")
    reference = build_model("tiny-llama", seed=3)
    use_backend(reference, "meshplan_sdpa")
    torch.manual_seed(0)
    batch = collate_varlen([torch.randint(0, 256, (n,)) for n in (20, 7, 33)], seq_len=64)
    loss, grads = _loss_and_grads(applied.model, batch)
    ref_loss, ref_grads = _loss_and_grads(reference, batch)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)
