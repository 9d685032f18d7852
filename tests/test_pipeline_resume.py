"""Checkpoint and resume under pipeline parallelism, on 4 gloo ranks (pp 2 × dp_shard 2).

Each pipeline rank holds only its stages' parameters, under their Hugging Face names, so
a checkpoint is the union of the stages' shards. The runtime's loop trains an 8-layer
tiny Llama (1F1B, and interleaved 1F1B with two stages per rank; 2 microbatches) 2 steps,
checkpoints, and trains a third; a freshly built model resumes from that checkpoint and
trains the third step again: the same loss and the same parameters on every rank, bit
for bit. The checkpoint holds every parameter of the model once, under its own name,
whichever stage held it.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed import RankPool, rank_pool_fixture

pytestmark = pytest.mark.slow

WORLD = 4
LAYERS = 8
SEQ_LEN = 32
MICRO_BATCH = 2  # bins per data-parallel rank and step: the plan's 2 microbatches

pool = rank_pool_fixture(WORLD, timeout=300.0)

def _plan(pipeline: str) -> str:
    return f"""plan pp for LlamaForCausalLM

mesh {{
  pp = 2
  dp_shard = 2
}}

pipeline on pp {{
{pipeline}
}}

fully_shard on dp_shard {{
  unit model.layers.* {{ reshard_after_forward = false }}
  root
}}
"""


PLANS = {
    "1f1b": _plan("  schedule = 1f1b\n  microbatches = 2"),
    # Two stages per rank: the optimizer and the checkpoint see both through one holder.
    "interleaved": _plan("  schedule = interleaved_1f1b\n  microbatches = 2\n  virtual_stages = 2"),
}


def _source() -> Any:
    from meshplan.planner.models import resolve_model

    found = resolve_model("tiny-llama")
    config = copy.deepcopy(found.config)
    config.num_hidden_layers = LAYERS
    assert found.model_class is not None
    with torch.device("meta"):
        return found.model_class(config)


@functools.cache
def _data() -> Any:
    from meshplan.runtime.train.data import PackedData, synthetic_sequences

    return PackedData.build(synthetic_sequences(64, 256, min_len=4, max_len=SEQ_LEN, seed=1), SEQ_LEN)


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in model.named_parameters()}


def _build(program_json: str) -> tuple[Any, ...]:
    from meshplan.planner.program import Program
    from meshplan.runtime.train.build import build_applied
    from meshplan.runtime.train.loop import TrainConfig, make_optimizer
    from meshplan.runtime.train.topology import Topology

    applied, _, _ = build_applied(Program.from_json(program_json), _source(), seed=0)
    topology = Topology.of(applied)
    config = TrainConfig(steps=3, lr=1e-3, weight_decay=0.1, max_grad_norm=0.5, checkpoint_every=2)
    optimizer = make_optimizer(applied.model, config)
    loader = _data().loader(topology.dp_rank, topology.dp_size, micro_batch=MICRO_BATCH, seed=0)
    return applied, topology, config, optimizer, loader


def resume_case(program_json: str, root: str) -> dict[str, Any]:
    """2 steps, checkpoint, a third; then a fresh build resumes and runs the third again."""
    from dataclasses import replace

    from meshplan.runtime.train.loop import resume, train
    from meshplan.runtime.weights.checkpoint import checkpoint_dir, read_tensors

    applied, topology, config, optimizer, loader = _build(program_json)
    first = train(applied, optimizer, loader, topology, replace(config, steps=2), checkpoint_root=root)
    third = train(applied, optimizer, loader, topology, config, start_step=2)  # no checkpoint after it
    straight = _params(applied.model)

    applied, topology, config, optimizer, loader = _build(program_json)
    start = resume(root, applied, optimizer, loader)
    again = train(applied, optimizer, loader, topology, config, start_step=start)
    resumed = _params(applied.model)
    saved = sorted(read_tensors(checkpoint_dir(root, 2)))
    return {"steps": [s.step for s in first + third], "start": start, "again": [s.step for s in again],
            "loss": [third[0].loss, again[0].loss], "norm": [third[0].grad_norm, again[0].grad_norm],
            "same": sorted(n for n in straight if torch.equal(straight[n], resumed[n])),
            "held": sorted(straight), "resumed": sorted(resumed), "saved": saved}


@pytest.mark.parametrize("schedule", sorted(PLANS))
def test_a_pipelined_run_resumes_exactly(pool: RankPool, tmp_path: Path, schedule: str) -> None:
    from meshplan.planner.compile import compile_plan
    from meshplan.planner.graph import build_graph

    program = compile_plan(PLANS[schedule], build_graph(_source()), WORLD).program
    assert program.steps[0].kind == "pipeline"
    results = pool.run(resume_case, program.to_json(), str(tmp_path / "checkpoints"))
    everything = sorted(n for n, _ in _source().named_parameters())
    held: set[str] = set()
    for rank, got in enumerate(results):
        assert got["steps"] == [1, 2, 3] and got["start"] == 2 and got["again"] == [3], (rank, got)
        assert got["loss"][0] == got["loss"][1], (rank, got["loss"])  # bitwise
        assert got["norm"][0] == got["norm"][1], (rank, got["norm"])
        assert got["resumed"] == got["held"] and got["same"] == got["held"], rank
        assert len(got["held"]) < len(everything)  # only this rank's stage
        held |= set(got["held"])
        assert got["saved"] == everything, rank  # every stage's parameters, under their own names
    assert held == set(everything)
    assert results[0]["loss"] == results[3]["loss"]  # every rank reports the global loss
