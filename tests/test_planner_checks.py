"""Compiler checks added after the broken-plan corpus found them missing."""

from __future__ import annotations

import json

import pytest

from meshplan.dsl.errors import PlanRejected
from meshplan.planner import compile_plan
from meshplan.planner.graph import ModelGraph, build_graph
from meshplan.planner.program import FullyShard, MeshLayout, Program, StyleCall

HEAD = "plan p for LlamaForCausalLM\nmesh {\n  dp_shard = auto\n  tp = 2\n}\n"
ROOT_UNIT = "fully_shard on dp_shard {\n  unit model.layers.*\n  root\n}\n"


@pytest.fixture(scope="module")
def llama() -> ModelGraph:
    return build_graph("tiny-llama")


def first_error(text: str, graph: ModelGraph, world: int = 4) -> tuple[str, int, str, str | None]:
    with pytest.raises(PlanRejected) as info:
        compile_plan(text, graph, world)
    d = info.value.errors[0]
    return d.code, d.span.line, d.message, d.hint


def test_prepare_input_naming_a_missing_argument(llama: ModelGraph) -> None:
    text = HEAD + "tensor_parallel on tp {\n  model.layers.*.mlp : prepare_input(foo: shard(1) -> replicate)\n}\n" + ROOT_UNIT
    code, line, message, hint = first_error(text, llama)
    assert (code, line) == ("E504", 7)
    assert message == "`model.layers.0.mlp` (and 1 more) has no input `foo` in the trace"
    assert hint == "its inputs are `x`"


def test_parts_on_an_embedding(llama: ModelGraph) -> None:
    text = HEAD + "tensor_parallel on tp {\n  model.embed_tokens : colwise(parts = 2)\n}\n" + ROOT_UNIT
    code, line, message, _ = first_error(text, llama)
    assert (code, line) == ("E504", 7)
    assert "`parts` splits fused Linear or Conv1D projections" in message


def test_sequence_parallel_dim_out_of_range(llama: ModelGraph) -> None:
    text = HEAD + "tensor_parallel on tp {\n  model.norm : sequence_parallel(dim = 5)\n}\n" + ROOT_UNIT
    code, line, message, _ = first_error(text, llama)
    assert (code, line, message) == ("E504", 7, "`dim = 5`: the input of `model.norm` has 3 dimensions "
                                                "(traced as [2, 48, 64])")


def test_cp_without_context_parallel(llama: ModelGraph) -> None:
    text = "plan p for LlamaForCausalLM\nmesh {\n  dp_shard = auto\n  cp = 2\n}\n" + \
        "submesh fsdp = dp_shard * cp\nfully_shard on fsdp {\n  root\n}\n"
    code, line, message, _ = first_error(text, llama)
    assert (code, line, message) == ("E509", 4, "cp = 2 but the plan has no `context_parallel` section")


def test_pp_without_a_pipeline_section(llama: ModelGraph) -> None:
    text = "plan p for LlamaForCausalLM\nmesh {\n  pp = 2\n  dp_shard = auto\n}\n" + ROOT_UNIT
    code, line, message, _ = first_error(text, llama)
    assert (code, line, message) == ("E509", 3, "pp = 2 but the plan has no `pipeline` section")


def test_reshard_to_a_group_that_does_not_divide(llama: ModelGraph) -> None:
    text = "plan p for LlamaForCausalLM\nmesh {\n  dp_shard = auto\n}\n" + \
        "fully_shard on dp_shard {\n  unit model.layers.* { reshard_after_forward = 8 }\n  root\n}\n"
    code, line, message, _ = first_error(text, llama)
    assert (code, line) == ("E505", 6)
    assert message == ("`reshard_after_forward = 8` must be a divisor of the 4 ranks FSDP shards over "
                       "(`dp_shard`), smaller than it")


def test_no_follow_on_layout_errors_after_a_style_error(llama: ModelGraph) -> None:
    text = HEAD + "tensor_parallel on tp {\n  model.layers.*.self_attn.q_proj : colwise(parts = 3)\n}\n" + ROOT_UNIT
    with pytest.raises(PlanRejected) as info:
        compile_plan(text, llama, 4)
    assert [d.code for d in info.value.errors] == ["E504"]


def test_w103_points_at_the_header() -> None:
    compiled = compile_plan("# a comment\n\nplan p for GPT2LMHeadModel\nmesh {\n  dp_shard = auto\n}\n"
                            "fully_shard on dp_shard {\n  root\n}\n", build_graph("tiny-llama"), 2)
    assert [(w.code, w.span.line) for w in compiled.warnings] == [("W103", 3)]


def test_program_validation() -> None:
    mesh = MeshLayout(names=("dp_shard",), shape=(4,))
    with pytest.raises(ValueError, match="unknown style 'colwsie'"):
        StyleCall(style="colwsie")
    with pytest.raises(ValueError, match="resolved by the compiler"):
        FullyShard(fqns=(), mesh_dims=("dp_shard",), reshard_after_forward="auto")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="repeat or are out of the order"):
        MeshLayout(names=("tp", "dp_shard"), shape=(2, 2))
    with pytest.raises(ValueError, match="has the name of a mesh dimension"):
        MeshLayout(names=("dp_shard",), shape=(2,), submeshes=(("tp", ("dp_shard",)),))
    with pytest.raises(ValueError, match="uses mesh dimension 'fsdp'"):
        Program(plan="p", model="m", world_size=4, mesh=mesh,
                steps=(FullyShard(fqns=(), mesh_dims=("fsdp",), reshard_after_forward=True),))
    for text, message in (("[]", "must be an object"), ('{"schema_version": 1}', "lacks the field"),
                          ("{", "not JSON")):
        with pytest.raises(ValueError, match=message):
            Program.from_json(text)
    good = Program(plan="p", model="m", world_size=4, mesh=mesh,
                   steps=(FullyShard(fqns=(), mesh_dims=("dp_shard",), reshard_after_forward=True),))
    data = json.loads(good.to_json())
    data["steps"][0]["unknown_field"] = 1
    with pytest.raises(ValueError, match="malformed"):
        Program.from_json(json.dumps(data))
