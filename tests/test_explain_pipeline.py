"""`plan explain` per pipeline stage: against a real 4-rank gloo run, the schedules' counts, golden.

Real run: an 8-layer tiny Llama, pp 2 × dp_shard 2 (FSDP units per layer and the root,
which wraps each stage module), trained through the runtime's pipeline step. After a
first step (torch's stages infer their shapes and set up their buffers then), the second
step is measured on every rank: its parameter, gradient and optimizer-state bytes (the
distinct storages it holds, FSDP2's padded shards included) must equal explain's figures
for that rank's pipeline rank, and the bytes of the tensors each stage hands to its
send ops (`get_fwd_send_ops`, `get_bwd_send_ops`: the hidden state and position ids
forward, the hidden state's gradient backward) must equal explain's point-to-point
figures for that stage, the bytes FSDP2 all-gathers and reduce-scatters
(`all_gather_single`'s output, `reduce_scatter_single`'s input) must equal explain's FSDP
traffic for that pipeline rank's units, and the functional collectives DTensor issues
inside the schedule (tensor/sequence and loss parallel, every microbatch) must equal
explain's count for the rank's stages — with 1F1B (one stage per rank), interleaved 1F1B
(two), and pp 2 × tp 2 with sequence parallelism (no FSDP: there the rowwise embedding's
gradient keeps a whole-vocabulary storage, a gap of the dense figures).

Schedules: the microbatches in flight are those torch's schedules keep (GPipe all of
them, 1F1B pp − s on stage s, ZBV's V), and the bubble follows (pp − 1) / (v·m + pp − 1).
Golden: Llama-3.1-405B on 16,384 ranks with tp 8 and pp 4, `--rank 5000`.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from meshplan.cli.main import main
from meshplan.planner.compile import compile_plan
from meshplan.planner.graph import build_graph
from meshplan.runtime.explain.report import explain
from meshplan.runtime.explain.stages import bubble_fraction, in_flight_peak
from meshplan.runtime.explain.world import coordinates
from tests.distributed import RankPool, rank_pool_fixture

from .conftest import ROOT, assert_golden

WORLD = 4
LAYERS = 8
SEQ_LEN = 32
MICROBATCHES = 2

pool = rank_pool_fixture(WORLD, timeout=300.0)

_PLAN = """plan pp for LlamaForCausalLM

mesh {{
  pp = 2
  dp_shard = 2
}}

pipeline on pp {{
  schedule = {schedule}
  microbatches = 2{extra}
}}

fully_shard on dp_shard {{
  unit model.layers.* {{ reshard_after_forward = false }}
  root
}}
"""
LAYOUTS = {"1f1b": "", "interleaved_1f1b": "\n  virtual_stages = 2"}
CASES = [*LAYOUTS, "pp2-tp2-sp"]  # the last: tests.test_pipeline's pp 2 × tp 2, sequence parallel


def _source() -> Any:
    from tests.test_pipeline import _source as source

    return source(LAYERS)


def _compiled(case: str) -> Any:
    from tests.test_pipeline import PLANS

    text = PLANS[case] if case in PLANS else _PLAN.format(schedule=case, extra=LAYOUTS[case])
    return compile_plan(text, build_graph(_source()), WORLD)


_FUNCTIONAL = {"all_gather_into_tensor": "all_gather", "reduce_scatter_tensor": "reduce_scatter",
               "all_reduce": "all_reduce"}


def _real_step(program_json: str, micro_batch: int) -> dict[str, Any]:
    """Two training steps through the schedule; the second one measured (see the docstring)."""
    import torch.distributed as dist
    from torch.distributed.pipelining.stage import _PipelineStageBase
    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import TorchDispatchMode

    from meshplan.planner.program import Program
    from meshplan.runtime.train.build import build_applied
    from meshplan.runtime.train.loop import (
        TrainConfig,
        grad_norm,
        make_optimizer,
        pipeline_train_step,
    )
    from meshplan.runtime.train.pipeline import pipeline_backward, stages_norm
    from meshplan.runtime.train.topology import Topology
    from tests.test_explain_real import _storage_bytes
    from tests.test_pipeline import _data

    applied, _, _ = build_applied(Program.from_json(program_json), _source(), seed=0)
    model, topology = applied.model, Topology.of(applied)
    optimizer = make_optimizer(model, TrainConfig(steps=2, lr=1e-3))
    batches = iter(_data().loader(topology.dp_rank, topology.dp_size, micro_batch=micro_batch, seed=0))
    pipeline_train_step(applied, optimizer, next(batches), topology)
    sent: dict[int, list[int]] = {}
    collectives = [0, 0]  # FSDP2's all-gather output and reduce-scatter input bytes
    originals = {name: getattr(_PipelineStageBase, name) for name in ("get_fwd_send_ops", "get_bwd_send_ops")}
    gather, scatter = dist.all_gather_single, dist.reduce_scatter_single

    def gathering(output: torch.Tensor, input: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        collectives[0] += output.numel() * output.element_size()
        return gather(output, input, *args, **kwargs)

    def scattering(output: torch.Tensor, input: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        collectives[1] += input.numel() * input.element_size()
        return scatter(output, input, *args, **kwargs)

    def recording(name: str, slot: int) -> Any:
        def wrapper(self: Any, chunk: int) -> Any:
            ops = originals[name](self, chunk)
            counts = sent.setdefault(self.stage_index, [0, 0])
            counts[slot] += sum(op.tensor.numel() * op.tensor.element_size() for op in ops)
            return ops
        return wrapper

    try:
        _PipelineStageBase.get_fwd_send_ops = recording("get_fwd_send_ops", 0)  # type: ignore[method-assign]
        _PipelineStageBase.get_bwd_send_ops = recording("get_bwd_send_ops", 1)  # type: ignore[method-assign]
        dist.all_gather_single, dist.reduce_scatter_single = gathering, scattering
        # DTensor's functional collectives inside the schedule's forwards and backwards,
        # apart from the step's reductions of the loss around it.
        schedule = applied.pipeline.schedule() if applied.pipeline is not None else None
        functional: dict[str, int] = {}

        class Counting(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                if any(t is DTensor for t in types):
                    return NotImplemented  # DTensor turns it into local ops and collectives
                name = func._overloadpacket.__name__
                if func.namespace.startswith("_c10d_functional") and name in _FUNCTIONAL:
                    functional[_FUNCTIONAL[name]] = functional.get(_FUNCTIONAL[name], 0) + 1
                return func(*args, **(kwargs or {}))

        counter = Counting()

        class Counted:
            def step(self, *args: Any, **kwargs: Any) -> Any:
                with counter:
                    return schedule.step(*args, **kwargs)

        assert applied.pipeline is not None
        applied.pipeline._schedule = Counted()
        pipeline_backward(applied, next(batches), topology)
        applied.pipeline._schedule = schedule
    finally:
        for name, fn in originals.items():
            setattr(_PipelineStageBase, name, fn)
        dist.all_gather_single, dist.reduce_scatter_single = gather, scatter
    gradients = _storage_bytes(p.grad for p in model.parameters())
    params = [p for group in optimizer.param_groups for p in group["params"]]
    stages_norm(applied, grad_norm(params))  # a collective over pp, as the step runs it
    optimizer.step()
    pipe = applied.pipeline
    assert pipe is not None
    return {"pp_rank": pipe.rank, "stages": list(pipe.indices), "sent": sent, "fsdp": collectives,
            "functional": functional,
            "parameters": _storage_bytes(model.parameters()), "gradients": gradients,
            "optimizer": _storage_bytes(v for state in optimizer.state.values() for k, v in state.items()
                                        if k != "step")}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_stage_figures_match_a_real_run(pool: RankPool, case: str) -> None:
    compiled = _compiled(case)
    ex = explain(compiled, seq_len=SEQ_LEN, micro_batch=1)
    assert ex.pipeline is not None and [c.count for c in ex.classes] == [WORLD]
    # The per-rank batch of a step: `microbatches` microbatches of explain's --micro-batch.
    microbatches = ex.pipeline.microbatches
    results = pool.run(_real_step, compiled.program.to_json(), microbatches)
    layout = compiled.program.mesh
    for rank, real in enumerate(results):
        index = ex.class_of(rank)
        assert index is not None
        pipe = ex.pipeline_of(index)
        assert pipe is not None
        pp_rank = coordinates(layout, rank)["pp"]
        held, stages = pipe.of_rank(pp_rank)
        assert real["pp_rank"] == pp_rank and real["stages"] == list(held.stages), rank
        assert (real["parameters"], real["optimizer"]) == (held.parameters, held.optimizer), rank
        if case != "pp2-tp2-sp" or pp_rank != 0:
            assert real["gradients"] == held.gradients, rank
        else:
            # Without FSDP, the rowwise embedding's gradient (a DTensor over tp) keeps a
            # storage of the whole vocabulary: a gap of the dense figures, not the stages'.
            embed = 256 * 64 * 4 // 2
            assert real["gradients"] == held.gradients + embed, rank
        assert real["fsdp"] == [held.fsdp_gathered, held.fsdp_reduced], rank
        # Tensor/sequence-parallel and loss-parallel collectives of the rank's stages, all
        # microbatches (the all-reduce of partial gradients comes after the schedule).
        counted: dict[str, int] = {}
        for row in held.collectives:
            if row.kind in ("tp", "loss"):
                counted[row.op] = counted.get(row.op, 0) + row.count
        assert real["functional"] == counted, rank
        assert {s: tuple(v) for s, v in real["sent"].items()} == \
            {s.index: (s.sends_forward, s.sends_backward) for s in stages}, rank
    # Each stage holds its share: the stages' parameters add up to the whole model's.
    assert sum(s.parameters for s in ex.pipeline.stages) == ex.rank0.parameters
    # One sequence in fp32; under sequence parallelism a boundary carries the rank's piece.
    hidden = SEQ_LEN // layout.size("tp") * compiled.graph.source.config.hidden_size * 4
    assert ex.pipeline.hidden_bytes == hidden and ex.pipeline.position_bytes == SEQ_LEN * 8


# --------------------------------------------------------------------------- schedules


def _in_flight(schedule: str, pp: int, v: int, m: int) -> list[dict[int, int]]:
    n = pp * v
    held = [(r, n - 1 - r) if schedule == "zbv" else tuple(range(r, n, pp)) for r in range(pp)]
    return [in_flight_peak(schedule, pp, v, m, r, held[r], dict.fromkeys(range(n), 1))[1] for r in range(pp)]


def test_microbatches_in_flight_follow_the_schedule() -> None:
    assert _in_flight("gpipe", 4, 1, 8) == [{0: 8}, {1: 8}, {2: 8}, {3: 8}]
    assert _in_flight("1f1b", 4, 1, 8) == [{0: 4}, {1: 3}, {2: 2}, {3: 1}]
    assert _in_flight("1f1b", 4, 1, 2) == [{0: 2}, {1: 2}, {2: 2}, {3: 1}]
    # Interleaved 1F1B, pp 2 × 2 stages, 4 microbatches in rounds of 2: rank 0 warms up
    # (v − 1)·2 + 2·(pp − 1) = 4 forwards (2 on stage 0, then 2 on stage 2) and runs one
    # more (stage 0) before its first backward (stage 2); rank 1 warms up 2.
    assert _in_flight("interleaved_1f1b", 2, 2, 4) == [{0: 3, 2: 2}, {1: 2, 3: 1}]
    # ZBV: rank r holds stages r and 2·pp − 1 − r; rank 0 runs 2·pp − 1 forwards of its
    # first stage and one of its last before the first backward: 2·pp chunks at most.
    assert _in_flight("zbv", 2, 2, 4) == [{0: 3, 3: 1}, {1: 2, 2: 2}]
    assert _in_flight("zbv", 4, 2, 8)[0] == {0: 7, 7: 1}
    assert bubble_fraction("1f1b", 4, 8, 1) == pytest.approx(3 / 11)
    assert bubble_fraction("interleaved_1f1b", 4, 8, 2) == pytest.approx(3 / 19)


# --------------------------------------------------------------------------- the CLI


def test_golden_405b_pp4(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    code = main(["explain", "plans/llama.plan", "--model", "llama-3.1-405b", "--world-size", "16384",
                 "--set", "tp=8", "--set", "mesh.pp=4", "--rank", "5000"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert_golden("explain/llama_llama-3.1-405b_w16384_tp8_pp4.txt", out)
    # 1F1B without context parallelism: nothing of the pipeline left unmodelled.
    assert "W205" not in err


def test_json_carries_the_stages_and_rank_r_its_own(capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    code = main(["explain", "plans/llama.plan", "--model", "tiny-llama", "--world-size", "8", "--set", "tp=2",
                 "--set", "mesh.pp=2", "--set", "seq_len=64", "--set", "microbatches=4", "--json", "--rank", "5"])
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(out)
    pipe = data["pipeline"]
    assert (pipe["schedule"], pipe["pp"], pipe["microbatches"]) == ("1f1b", 2, 4)
    assert pipe["bubble"] == pytest.approx(1 / 5)
    assert [s["microbatches_in_flight"] for s in pipe["stages"]] == [2, 1]
    assert sum(s["parameters_bytes"] for s in pipe["stages"]) == data["memory"]["parameters_bytes"]
    boundary = pipe["hidden_bytes_per_microbatch"] + pipe["position_bytes_per_microbatch"]
    assert [s["p2p_forward_bytes"] for s in pipe["stages"]] == [4 * boundary, 0]
    assert [s["p2p_backward_bytes"] for s in pipe["stages"]] == [0, 4 * pipe["hidden_bytes_per_microbatch"]]
    # Under sequence parallelism a boundary carries the rank's piece of the sequence:
    # 64 / tp 2 tokens × hidden 64, bf16; the position ids are whole (int64).
    assert pipe["hidden_bytes_per_microbatch"] == 32 * 64 * 2 and pipe["position_bytes_per_microbatch"] == 64 * 8
    # Rank 5 = pp 1 (4 ranks per pp coordinate, dp_shard 2 × tp 2): stage 1.
    rank = data["rank"]["pipeline"]
    assert rank["pp_rank"] == 1 and [s["stage"] for s in rank["stages"]] == [1]
    assert rank["parameters_bytes"] == pipe["ranks"][1]["parameters_bytes"]
    # Rank 5's communication: its stage's collectives, every microbatch; the last stage
    # computes the loss (three all-reduces of vocabulary-parallel cross-entropy each).
    kinds = {(r["source"], r["op"]): r["count"] for r in rank["communication"]}
    assert kinds[("loss", "all_reduce")] == 3 * 4
    assert ("loss", "all_reduce") not in {(r["source"], r["op"]) for r in pipe["ranks"][0]["communication"]}
    assert "W205" not in {d["code"] for d in data["diagnostics"]}
