"""The truth harness itself (`tests/truth.py`) on plans whose truth is known.

Two plans that train exactly (tensor + sequence parallel, plain FSDP), two that train
wrong in ways the compiler rejects (a norm left out of sequence parallelism: its weight
gradient is only this rank's part; a partial sum never reduced), one that crashes (a
projection left out of a tensor-parallel block), and a plan whose mesh does not fit the
world (nothing to apply).
"""

from __future__ import annotations

import pytest

from meshplan.dsl.errors import PlanRejected
from meshplan.planner.compile import compile_plan
from tests.conftest import PLANS
from tests.distributed import RankPool, rank_pool_fixture
from tests.truth import RTOL, judge

pytestmark = pytest.mark.slow

BROKEN = PLANS.parent / "tests" / "plans" / "broken"
pool = rank_pool_fixture(4, timeout=180.0)


@pytest.mark.parametrize("plan,overrides", [
    ("llama.plan", ("tp=2", "seq_len=32")),
    ("fsdp.plan", ("seq_len=32",)),
])
def test_exact_plans(pool: RankPool, plan: str, overrides: tuple[str, ...]) -> None:
    compiled, truth = judge(pool, PLANS / plan, "tiny-llama", 4, overrides)
    assert compiled.accepted
    assert truth.truth == "exact", truth
    assert truth.error <= RTOL


@pytest.mark.parametrize("case,tensor", [
    ("norm_left_out_of_sp", "post_attention_layernorm.weight"),
    ("partial_never_reduced", "self_attn."),
])
def test_wrong_plans(pool: RankPool, case: str, tensor: str) -> None:
    compiled, truth = judge(pool, BROKEN / f"{case}.plan", "tiny-llama", 4)
    assert not compiled.accepted and compiled.program is not None  # judged despite the rejection
    assert truth.truth == "wrong", truth
    assert truth.error > 1e-2
    assert tensor in truth.detail and "rank " in truth.detail


def test_crash(pool: RankPool) -> None:
    _, truth = judge(pool, BROKEN / "o_proj_forgotten.plan", "tiny-llama", 4)
    assert truth.truth == "crash", truth
    assert "shapes cannot be multiplied" in truth.detail
    # The pool restarts after a crash: the next case runs.
    _, again = judge(pool, PLANS / "fsdp.plan", "tiny-llama", 4, ("seq_len=32",))
    assert again.truth == "exact", again


EXPERTS_TP = """\
plan experts_tp for MixtralForCausalLM
mesh {
  dp_shard = auto
  tp = 2
}
tensor_parallel on tp {
  model.layers.*.self_attn.{q,k,v}_proj : colwise
  model.layers.*.self_attn.o_proj       : rowwise
  model.layers.*.mlp.experts            : tp_experts(parts = PARTS)
}
fully_shard on dp_shard {
  unit model.layers.*
  root
}
"""


def test_tensor_parallel_experts(pool: RankPool) -> None:
    """Every expert split on its intermediate features over tp (under FSDP over dp_shard):
    exact with gate and up each sharded; one block of 2I rows (transformers' Inkling-2
    plan) gives rank 0 only gate rows and rank 1 only up rows — wrong, and rejected."""
    compiled, truth = judge(pool, EXPERTS_TP.replace("PARTS", "2"), "tiny-mixtral", 4)
    assert compiled.accepted and truth.truth == "exact", truth
    compiled, truth = judge(pool, EXPERTS_TP.replace("PARTS", "1"), "tiny-mixtral", 4)
    assert compiled.codes == ("E504",) and compiled.program is not None
    assert truth.truth == "wrong" and truth.error > 1e-2, truth
    assert "experts" in truth.detail or "layers" in truth.detail


def test_nothing_to_apply_when_the_mesh_does_not_fit(pool: RankPool) -> None:
    compiled, truth = judge(pool, BROKEN / "mesh_product_wrong.plan", "tiny-llama", 4)
    assert compiled.program is None and truth.truth == "n/a"
    assert "E501" in truth.detail


def test_check_false_lowers_a_rejected_plan() -> None:
    with pytest.raises(PlanRejected):
        compile_plan(BROKEN / "partial_never_reduced.plan", "tiny-llama", 4)
    compiled = compile_plan(BROKEN / "partial_never_reduced.plan", "tiny-llama", 4, check=False)
    assert any(d.code == "E507" and d.severity == "error" for d in compiled.warnings)
    assert compiled.program.steps[0].kind == "parallelize"
