"""The expert-parallel checks that need a model fact no preset has, and the step's data.

- A router drawing jitter noise (Mixtral's `router_jitter_noise`) inside an activation
  checkpoint: the recompute would route differently (E503 at the checkpoint's line).
- A float32 router (DeepSeek-V3's weight and score-correction bias) in an FSDP unit with
  a bf16 model's parameters: FSDP2 gathers one dtype per unit (E508 at the unit's line);
  a unit of its own for the routers is accepted.
- The ExpertParallel step round-trips through JSON and validates its values.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from meshplan.dsl.errors import PlanRejected
from meshplan.planner.compile import compile_plan
from meshplan.planner.program import ExpertParallel, Program

JITTER_PLAN = """\
plan jitter for MixtralForCausalLM
mesh {
  dp_shard = auto
  ep = 2
}
activation_checkpoint model.layers.* { mode = full }
fully_shard on dp_shard {
  unit model.layers.*
  root
}
expert_parallel on ep {
  experts model.layers.*.mlp.experts
}
"""

DEEPSEEK_PLAN = """\
plan routers for DeepseekV3ForCausalLM
mesh {
  dp_shard = auto
  ep = 2
}
fully_shard on dp_shard {
  mixed_precision { param = bf16, reduce = fp32 }
%s  unit model.layers.*
  root
}
expert_parallel on ep {
  experts model.layers.*.mlp.experts
}
"""


def _meta_model(preset: str, **changes: Any) -> torch.nn.Module:
    from meshplan.planner.models import resolve_model

    source = resolve_model(preset)
    config = source.config
    for key, value in changes.items():
        setattr(config, key, value)
    assert source.model_class is not None
    with torch.device("meta"):
        return source.model_class(config)


def test_checkpoint_that_recomputes_random_routing_is_rejected() -> None:
    model = _meta_model("tiny-mixtral", router_jitter_noise=0.1)
    with pytest.raises(PlanRejected) as info:
        compile_plan(JITTER_PLAN, model, 4)
    (error,) = [d for d in info.value.errors if d.code == "E503"]
    assert (error.span.line, error.span.column) == (6, 1)
    assert "recomputes the routing of `model.layers.*.mlp`, which draws router jitter noise (0.1)" in error.message
    assert error.hint is not None and "router_jitter_noise = 0" in error.hint
    # Without the noise the same plan is fine: recomputed routing is the same routing.
    compile_plan(JITTER_PLAN, _meta_model("tiny-mixtral"), 4)


def test_float32_router_in_a_bf16_unit_is_rejected() -> None:
    model = _meta_model("tiny-deepseek-v3", dtype=torch.bfloat16)
    with pytest.raises(PlanRejected) as info:
        compile_plan(DEEPSEEK_PLAN % "", model, 4)
    (error,) = info.value.errors
    assert (error.code, error.span.line, error.span.column) == ("E508", 8, 3)
    assert "the float32 router `model.layers.*.mlp.gate` (weight and e_score_correction_bias)" in error.message
    assert "FSDP2 needs one dtype per unit" in error.message
    assert error.hint is not None and "unit model.layers.*.mlp.gate" in error.hint
    program = compile_plan(DEEPSEEK_PLAN % "  unit model.layers.*.mlp.gate\n", model, 4).program
    units = [s.fqns for s in program.steps if s.kind == "fully_shard"]
    assert ("model.layers.1.mlp.gate",) in units


def test_the_step_round_trips_and_validates() -> None:
    program = compile_plan(JITTER_PLAN, _meta_model("tiny-mixtral"), 4).program
    assert Program.from_json(program.to_json()) == program
    (step,) = program.steps_of(ExpertParallel)
    assert (step.size, step.dispatch, step.fsdp, step.gradient_divide_factor) == (2, "alltoall", True, 4)
    with pytest.raises(ValueError, match="size \\(ep\\) must be ≥ 2"):
        dataclasses.replace(step, size=1)
    with pytest.raises(ValueError, match="dispatch 'ring'"):
        dataclasses.replace(step, dispatch="ring")  # type: ignore[arg-type]


# ------------------------------------------------- tensor-parallel experts (tp_experts)

TP_EXPERTS_PLAN = """\
plan tp_experts for MixtralForCausalLM
mesh {
  dp_shard = auto
  tp = TP
%s}
tensor_parallel on tp {
  model.layers.*.self_attn.{q,k,v}_proj : colwise
  model.layers.*.self_attn.o_proj       : rowwise
  STYLED : tp_experts
}
fully_shard on dp_shard {
  unit model.layers.*
  root
}
%s"""
EP_SECTION = """expert_parallel on ep {
  experts model.layers.*.mlp.experts
}
"""


def _tp_experts(tp: int = 2, styled: str = "model.layers.*.mlp.experts", ep: bool = False) -> str:
    return (TP_EXPERTS_PLAN % ("  ep = 2\n" if ep else "", EP_SECTION if ep else "")).replace(
        "TP", str(tp)).replace("STYLED", styled)


def _rejected(plan: str, model: Any, world: int = 4) -> list[Any]:
    with pytest.raises(PlanRejected) as info:
        compile_plan(plan, model, world)
    return info.value.errors


def test_tensor_parallel_experts_compile() -> None:
    program = compile_plan(_tp_experts(), "tiny-mixtral", 4).program
    calls = {rel: call for step in program.steps if step.kind == "parallelize" for rel, call in step.plan}
    assert next(c for r, c in calls.items() if r.endswith("mlp.experts")).parts == 2
    # gate_up_proj is stored rank-major along its 2I rows (gate and up shards of a rank
    # together); loading, export and the truth map it back by the registry's fused_params.
    from meshplan.runtime.weights.loading import FusedRows, fused_rows

    rows = fused_rows(_meta_model("tiny-mixtral"), program)
    assert rows["model.layers.0.mlp.experts.gate_up_proj"] == FusedRows(1, 2, 2)
    assert "model.layers.0.mlp.experts.down_proj" not in rows


def test_tensor_parallel_experts_that_are_expert_parallel_too_are_rejected() -> None:
    (error,) = _rejected(_tp_experts(ep=True), "tiny-mixtral")
    assert error.code == "E504" and error.span.line == 10 and "expert-parallel too" in error.message
    assert "choose one" in (error.hint or "")


def test_tensor_parallel_experts_on_another_module_are_rejected() -> None:
    (error,) = _rejected(_tp_experts(styled="model.layers.*.mlp.gate"), "tiny-mixtral")
    assert error.code == "E504" and error.span.line == 9 and "`tp_experts` is made for experts" in error.message


def test_tensor_parallel_experts_intermediate_must_divide() -> None:
    errors = _rejected(_tp_experts(), _meta_model("tiny-mixtral", intermediate_size=65))
    assert [e.code for e in errors] == ["E505"]
    assert errors[0].span.line == 9 and "65 intermediate features per expert cannot be split 2 ways" in errors[0].message


def test_tensor_parallel_experts_behind_a_random_router_are_rejected() -> None:
    """Jitter noise in training: each tp rank draws its own routes, and the partial
    outputs summed over tp belong to different routes (PhiMoE's sampling router,
    measured wrong in tests/test_hf_audit.py)."""
    (error,) = _rejected(_tp_experts(), _meta_model("tiny-mixtral", router_jitter_noise=0.1))
    assert error.code == "E504" and error.span.line == 9
    assert "draws random numbers in training" in error.message and "different routes" in error.message
