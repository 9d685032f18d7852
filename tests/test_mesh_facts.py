"""Derived mesh facts: one home for data-parallel, loss, FSDP and expert dimensions and
the sequence multiple, and the places that used to compute them on their own."""

from __future__ import annotations

import pytest

from meshplan.dsl import load
from meshplan.planner import compile_plan
from meshplan.planner.mesh_facts import (
    MeshFacts,
    plan_seq_len,
    program_sequence_multiple,
    sequence_multiple,
)
from meshplan.planner.program import MeshLayout

from .conftest import PLANS


@pytest.mark.parametrize("sp,cp,headtail,multiple", [
    (1, 1, True, 1),
    (4, 1, True, 4),       # SP alone: tp
    (1, 2, True, 4),       # CP head-tail: 2·cp
    (1, 4, False, 4),      # CP plain: cp
    (2, 2, True, 4),       # both: cp·tp = 4 and 2·cp = 4
    (4, 2, True, 8),       # cp·tp = 8 covers 2·cp = 4
    (3, 2, True, 12),      # lcm(6, 4)
    (2, 4, False, 8),
])
def test_sequence_multiple(sp: int, cp: int, headtail: bool, multiple: int) -> None:
    assert sequence_multiple(sp=sp, cp=cp, headtail=headtail) == multiple


def test_sequence_multiple_rejects_empty_dimensions() -> None:
    with pytest.raises(ValueError, match="sp and cp must be ≥ 1, got 0 and 1"):
        sequence_multiple(sp=0)


def test_dimensions_without_submeshes() -> None:
    facts = MeshFacts(MeshLayout(names=("dp_replicate", "dp_shard", "cp", "tp"), shape=(2, 2, 2, 2)))
    assert facts.world_size == 16
    assert facts.dp_dims == ("dp_replicate", "dp_shard") and facts.dp_size == 4
    assert facts.loss_dims == ("dp_replicate", "dp_shard", "cp") and facts.loss_size == 8
    assert facts.uncovered(("dp_shard",)) == ("dp_replicate", "cp")
    assert facts.uncovered(("dp_replicate", "dp_shard", "cp")) == ()
    assert facts.sequence_multiple(sp_on="tp", cp_on="cp") == 4


def test_submeshes_name_the_dimensions() -> None:
    layout = MeshLayout(names=("dp_shard", "cp", "tp"), shape=(2, 2, 2),
                        submeshes=(("dp", ("dp_shard",)), ("fsdp", ("dp_shard", "cp")),
                                   ("loss", ("dp_shard", "cp"))))
    facts = MeshFacts(layout)
    assert facts.dp_dims == ("dp_shard",)
    assert facts.loss_dims == ("dp_shard", "cp")
    assert facts.fsdp_dims(("fsdp",)) == ("dp_shard", "cp")
    assert facts.uncovered(("fsdp",)) == ()


def test_expert_and_pipeline_dimensions() -> None:
    facts = MeshFacts(MeshLayout(names=("pp", "dp_shard", "cp", "tp", "ep"), shape=(2, 4, 2, 1, 4)))
    assert facts.world_size == 16  # ep reuses ranks of dp_shard × cp
    assert facts.ep_pool == 8 and facts.ep == 4 and facts.ep_fsdp == 2
    assert facts.stages() == 2 and facts.stages(3) == 6
    with pytest.raises(ValueError, match="virtual_stages must be ≥ 1"):
        facts.stages(0)


PLAN = """\
plan p for LlamaForCausalLM
param seq_len = {value}
mesh {{
  dp_shard = auto
}}
fully_shard on dp_shard {{
  root
}}
"""


def test_plan_seq_len_is_an_integer_param_or_packing() -> None:
    spec, _ = load(PLAN.format(value=4096))
    found = plan_seq_len(spec)
    assert found is not None and found[0] == 4096 and found[1].line == 2
    spec, _ = load(PLAN.format(value="true"))
    assert plan_seq_len(spec) is None  # a boolean is not a length
    spec, _ = load(PLANS / "llama.plan")
    assert plan_seq_len(spec) is not None and spec.packing is not None
    assert plan_seq_len(spec) == (spec.packing.seq_len, spec.packing.span)


@pytest.mark.parametrize("overrides,multiple", [
    (("tp=2",), 2),                    # SP on tp
    (("tp=2", "mesh.cp=2"), 4),        # cp·tp and 2·cp
    (("tp=1", "mesh.cp=2"), 4),        # head-tail only
    (("tp=2", "mesh.cp=4"), 8),        # cp·tp = 8 covers 2·cp = 8
])
def test_program_sequence_multiple(overrides: tuple[str, ...], multiple: int) -> None:
    program = compile_plan(PLANS / "llama.plan", "tiny-llama", 8, list(overrides)).program
    assert program_sequence_multiple(program) == multiple


def test_a_plan_without_sequence_parallelism_needs_no_multiple() -> None:
    program = compile_plan(PLANS / "fsdp.plan", "tiny-llama", 4, []).program
    assert program_sequence_multiple(program) == 1
