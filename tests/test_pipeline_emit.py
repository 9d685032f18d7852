"""`plan compile --emit python` on a pipelined Program: the script cuts the model as the
runtime does and trains like one process.

On 4 gloo ranks (pp 2 × dp_shard 2), each rank executes the emitted script on a plain
transformers `LlamaForCausalLM` (8 layers, seeded): its `apply(model, mesh, loss_fn)`
returns this rank's stage modules and torch's schedule, and one `schedule.step` over a
global batch of 8 rows gives, on every rank, the loss one process computes on the whole
batch and every held parameter's gradient within 1e-5 relative of one process's; the
stages hold the same parameters, with the same placements and local shapes, as the
runtime's own pipeline (`meshplan.runtime.parallel.apply`) builds from the Program.
With 1F1B (one stage per rank), interleaved 1F1B (two per rank), and GPipe over
pp 2 × tp 2 (sequence parallel, vocabulary-parallel loss) with activation checkpointing
and an uneven split.

In one process: the script imports only torch and the standard library, names each
schedule as torch's class the runtime uses, and gives each stage the steps the runtime
applies to it (also for the shipped `plans/llama.plan` at pp 2 with tp, cp and HSDP units
that span both stages).
"""

from __future__ import annotations

import ast
import contextlib
import copy
from dataclasses import replace
from typing import Any

import pytest
import torch

from tests.conftest import ROOT
from tests.distributed import RankPool, rank_pool_fixture
from tests.test_pipeline import _FSDP, _TP, _plan

WORLD = 4
LAYERS = 8
ROWS, SEQ_LEN = 8, 16  # the global batch

pool = rank_pool_fixture(WORLD, timeout=300.0)

PLANS = {
    "pp2-dp2-1f1b": _plan("  pp = 2\n  dp_shard = 2", "  schedule = 1f1b\n  microbatches = 2", _FSDP),
    "pp2-dp2-interleaved": _plan("  pp = 2\n  dp_shard = 2",
                                 "  schedule = interleaved_1f1b\n  microbatches = 2\n  virtual_stages = 2", _FSDP),
    "pp2-tp2-split-ac": _plan("  pp = 2\n  tp = 2", "  schedule = gpipe\n  microbatches = 2\n  split model.layers.3",
                              _TP, "\nactivation_checkpoint model.layers.* { mode = full }\n"),
}


# The shipped Llama plan at pp 2 (compiled only: a world of 16).
SHIPPED = "shipped-llama-pp2"


def _config() -> Any:
    from meshplan.planner.models import resolve_model

    config = copy.deepcopy(resolve_model("tiny-llama").config)
    config.num_hidden_layers = LAYERS
    return config


def _program(layout: str) -> Any:
    from transformers import LlamaForCausalLM

    from meshplan.planner.compile import compile_plan
    from meshplan.planner.graph import build_graph

    with torch.device("meta"):
        meta = LlamaForCausalLM(_config())
    if layout == SHIPPED:  # TP/SP, context parallel, AC, HSDP units spanning both stages
        return compile_plan(ROOT / "plans" / "llama.plan", build_graph(meta), 16, ["tp=2", "mesh.pp=2",
                                                                                  "mesh.cp=2"]).program
    return compile_plan(PLANS[layout], build_graph(meta), WORLD).program


def _script(layout: str) -> str:
    from meshplan.planner.emit import to_python

    return to_python(_program(layout))


def _model() -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(_config())


def _layouts(stages: list[torch.nn.Module]) -> dict[str, tuple[str, tuple[int, ...]]]:
    from torch.distributed.tensor import DTensor

    return {n.replace("_checkpoint_wrapped_module.", ""): (
        str(tuple(p.placements)) if isinstance(p, DTensor) else "plain",
        tuple((p.to_local() if isinstance(p, DTensor) else p).shape))
        for stage in stages for n, p in stage.named_parameters()}


def script_case(script: str, program_json: str) -> dict[str, Any]:
    """Execute the script on this rank; one schedule step against one process."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import loss_parallel

    from meshplan.planner.program import Program
    from meshplan.runtime.parallel.apply import apply as runtime_apply

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (ROWS, SEQ_LEN), generator=generator)
    labels = torch.cat([ids[:, 1:], torch.full((ROWS, 1), -100)], dim=1)  # shifted: the model's targets
    labels[0, :5] = -100  # rows of unequal target counts: the global token-weighted mean
    targets = int((labels != -100).sum())

    reference = _model()
    want = F.cross_entropy(reference(input_ids=ids).logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    want.backward()

    namespace: dict[str, Any] = {}
    exec(compile(script, "<pp.py>", "exec"), namespace)
    mesh = namespace["build_mesh"]("cpu")
    names = mesh.mesh_dim_names or ()
    dp = mesh["dp_shard"].size() if "dp_shard" in names else 1
    row = mesh["dp_shard"].get_local_rank() if "dp_shard" in names else 0

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # Summed over the microbatch, over the global batch's targets, times FSDP's
        # divisor: the gradients are those of the global mean (`scale_grads=False`).
        total = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100,
                                reduction="sum")
        return total * dp / targets

    stages, schedule = namespace["apply"](_model(), mesh, loss_fn, device="cpu", scale_grads=False)
    mine = slice(row * ROWS // dp, (row + 1) * ROWS // dp)
    positions = torch.arange(SEQ_LEN).repeat(ROWS // dp, 1)
    first, last = any(s.first for s in stages), any(s.last for s in stages)
    losses: list[torch.Tensor] = []
    # Vocabulary-sharded logits (tensor parallel): the loss and its backward inside it.
    with loss_parallel() if "tp" in names else contextlib.nullcontext():
        schedule.step(*((ids[mine], positions) if first else ()),
                      **({"target": labels[mine], "losses": losses} if last else {}))
    # The last stage's ranks hold the loss of their rows (each tensor-parallel rank all of
    # it): summed over every rank, every rank gets the global loss.
    tp = mesh["tp"].size() if "tp" in names else 1
    loss = torch.tensor(sum(float(x.detach()) for x in losses) / (dp * tp) if last else 0.0, dtype=torch.float64)
    dist.all_reduce(loss)

    ref_grads = dict(reference.named_parameters())
    worst = 0.0
    for stage in stages:
        for name, p in stage.named_parameters():
            assert p.grad is not None, name
            grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            want_grad = ref_grads[name.replace("_checkpoint_wrapped_module.", "")].grad
            assert want_grad is not None
            worst = max(worst, float((grad - want_grad).norm() / want_grad.norm().clamp(min=1e-12)))

    runtime = runtime_apply(Program.from_json(program_json), _model(), mesh=mesh)
    assert runtime.pipeline is not None
    return {"loss": float(loss), "want": float(want), "worst": worst, "schedule": type(schedule).__name__,
            "runtime_schedule": type(runtime.pipeline.schedule()).__name__,
            "layouts": _layouts(stages), "runtime_layouts": _layouts(list(runtime.pipeline.stages))}


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(PLANS))
def test_the_script_trains_like_one_process(pool: RankPool, layout: str) -> None:
    program = _program(layout)
    results = pool.run(script_case, _script(layout), program.to_json())
    held: set[str] = set()
    for rank, got in enumerate(results):
        assert got["loss"] == pytest.approx(got["want"], rel=1e-6), (rank, got["loss"], got["want"])
        assert got["worst"] < 1e-5, (rank, got["worst"])
        assert got["schedule"] == got["runtime_schedule"]
        assert got["layouts"] == got["runtime_layouts"], rank
        assert any("Shard(dim=0)" in placement for placement, _ in got["layouts"].values())  # sharded
        held |= set(got["layouts"])
    assert held == {n for n, _ in _model().named_parameters()}  # every parameter is on some stage
    assert results[0]["layouts"].keys().isdisjoint(results[2]["layouts"])  # pp ranks hold other stages


def test_the_script_names_the_runtime_schedules() -> None:
    from torch.distributed import pipelining
    from torch.distributed.pipelining.schedules import get_schedule_class

    from meshplan.planner.emit import SCHEDULE_NAMES
    from meshplan.runtime.parallel.pipeline import SCHEDULES

    assert set(SCHEDULE_NAMES) == set(SCHEDULES)
    for name, torch_name in SCHEDULE_NAMES.items():
        assert get_schedule_class(torch_name) is getattr(pipelining, SCHEDULES[name]), name


@pytest.mark.parametrize("layout", [*sorted(PLANS), SHIPPED])
def test_each_stage_gets_the_steps_the_runtime_applies_to_it(layout: str) -> None:
    from meshplan.planner.emit import stage_holds, stage_program
    from meshplan.planner.program import Parallelize, Pipeline
    from meshplan.runtime.parallel.pipeline import stage_module, stage_steps

    program = _program(layout)
    cut = program.steps[0]
    assert isinstance(cut, Pipeline)
    with torch.device("meta"):
        model = _model()
    for index, layers in enumerate(cut.stages):
        stage = stage_module(model, layers, first=index == 0, last=index == len(cut.stages) - 1)
        present = {name for name, _ in stage.named_modules()}
        mine = stage_program(program.steps, stage_holds(cut, index))
        theirs = stage_steps(program, stage)
        # The runtime hands torch's parallelize_module every entry of a plan (it warns of
        # those the stage lacks and skips them); the script writes only the others.
        kept = [s if not isinstance(s, Parallelize) else replace(s, plan=tuple(
            (r, c) for r, c in s.plan if ".".join(p for p in (s.fqn, r) if p) in present)) for s in theirs]
        assert mine == [s for s in kept if not isinstance(s, Parallelize) or s.plan], (layout, index)
        assert len(mine) > 1


@pytest.mark.parametrize("layout", sorted(PLANS))  # (context parallelism imports meshplan's attention)
def test_the_script_imports_only_torch_and_the_standard_library(layout: str) -> None:
    script = _script(layout)
    roots = set()
    for node in ast.walk(ast.parse(script)):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add((node.module or "").split(".")[0])
    assert roots <= {"__future__", "torch", "collections", "contextlib", "functools", "typing", "warnings"}  # stdlib
    assert "PipelineStage(" in script and "get_schedule_class(SCHEDULE)" in script
    assert script.count("\ndef _stage_") == len(_program(layout).steps[0].stages)
