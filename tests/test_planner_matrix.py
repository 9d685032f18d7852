"""No false rejections: every shipped plan compiles for every preset of its family.

Each plan is compiled for each model of the family it is written for, at world sizes
1, 8, 64, 512 and 16384. Where the mesh's fixed dimensions do not divide the world
size, or ep does not divide the pool it is carved from (dp_shard × cp × tp), the
compiler must say so (E501, nothing else); everywhere else it must accept
the plan, and the Program must have the structure the compiler promises: steps in the
order parallelize → context_parallel → expert_parallel → checkpoint → fully_shard, FSDP units children
first with the root last, one Parallelize per block (plus one for the modules outside
the blocks), and every step's span on the plan line it came from.

Graphs are traced once per model (module-level cache) and reused at every world size.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest

from meshplan.dsl import load
from meshplan.dsl.errors import PlanRejected
from meshplan.dsl.patterns import select
from meshplan.dsl.spec import PRODUCT_DIMS, PlanSpec
from meshplan.planner import compile_plan
from meshplan.planner.graph import ModelGraph, build_graph
from meshplan.planner.program import (
    Adapters,
    Checkpoint,
    ContextParallel,
    FullyShard,
    Parallelize,
    Program,
)

from .conftest import PLANS

WORLDS = (1, 8, 64, 512, 16384)
KIND_ORDER = ("adapters", "parallelize", "context_parallel", "expert_parallel", "checkpoint", "fully_shard")
PRESETS = sorted(p.stem for p in (PLANS / "models").glob("*.json"))

# (plan, model, overrides): the published models at the plan's own sizes, the tiny
# ones at tp = 2 (their 2 key/value heads do not split 4 ways).
FAMILIES: dict[str, list[str]] = {
    "llama": ["llama-3.2-1b", "llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b", "mistral-7b",
              "qwen2.5-7b", "qwen2.5-72b"],
    "llama_lora": ["llama-3.2-1b", "llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b", "mistral-7b",
                   "qwen2.5-7b", "qwen2.5-72b"],
    "qwen3": ["qwen3-8b"],
    "gemma2": ["gemma-2-9b"],
    "phi3": ["phi-3-mini"],
    "gpt2": ["gpt2"],
    "mixtral": ["mixtral-8x7b"],
    "qwen3_moe": ["qwen3-30b-a3b"],
    "deepseek_v3": ["deepseek-v3"],
}
TINY_FAMILIES: dict[str, list[str]] = {
    "llama": ["tiny-llama", "tiny-mistral", "tiny-qwen2"],
    "qwen3": ["tiny-qwen3"],
    "gemma2": ["tiny-gemma2"],
    "phi3": ["tiny-phi3"],
    "gpt2": ["tiny-gpt2"],
}


def _architecture(preset: str) -> str:
    data = json.loads((PLANS / "models" / f"{preset}.json").read_text(encoding="utf-8"))
    return str(data["architectures"][0])


def _combos() -> list[tuple[str, str, tuple[str, ...]]]:
    out: list[tuple[str, str, tuple[str, ...]]] = []
    for plan, models in FAMILIES.items():
        out += [(plan, m, ()) for m in models]
    for plan, models in TINY_FAMILIES.items():
        out += [(plan, m, ("tp=2",)) for m in models]
    # The tiny MoE models have 4 or 8 experts: ep = 2.
    out += [("mixtral", "tiny-mixtral", ("tp=2", "ep=2")), ("qwen3_moe", "tiny-qwen3-moe", ("tp=2", "ep=2")),
            ("deepseek_v3", "tiny-deepseek-v3", ("ep=2",))]
    fsdp_archs = set(_spec("fsdp", ()).archs)
    out += [("fsdp", m, ()) for m in PRESETS if _architecture(m) in fsdp_archs]
    return out


@cache
def graph(model: str) -> ModelGraph:
    return build_graph(model)


@cache
def _spec(plan: str, overrides: tuple[str, ...]) -> PlanSpec:
    spec, _ = load(PLANS / f"{plan}.plan", overrides)
    return spec


@cache
def _source(plan: str) -> list[str]:
    return (PLANS / f"{plan}.plan").read_text(encoding="utf-8").splitlines()


def _fixed_product(spec: PlanSpec) -> int:
    product = 1
    for dim in spec.mesh.dims:
        if dim.name in PRODUCT_DIMS and dim.size is not None:
            product *= dim.size
    return product


def _expert_pool_fits(spec: PlanSpec, world: int, fixed: int) -> bool:
    """ep divides dp_shard × cp × tp at this world size (dp_shard = auto takes the rest)."""
    sizes = {d.name: d.size for d in spec.mesh.dims}
    ep = sizes.get("ep") or 1
    pool = 1
    for name in ("dp_shard", "cp", "tp"):
        size = sizes.get(name, 1)
        pool *= world // fixed if size is None else size
    return pool % ep == 0


def _inside(fqn: str, ancestor: str) -> bool:
    return fqn != ancestor and fqn.startswith(ancestor + ".")


def _line(plan: str, line: int) -> str:
    return _source(plan)[line - 1].strip()


def check_structure(program: Program, plan: str, model: str, spec: PlanSpec) -> None:
    g = graph(model)
    steps = program.steps
    kinds = [s.kind for s in steps]
    # parallelize → context_parallel → checkpoint → fully_shard
    assert kinds == sorted(kinds, key=KIND_ORDER.index), kinds

    # Tensor parallel: one call per block, one for the rest; every styled module once.
    tp = spec.tensor_parallel
    parallelize = [s for s in steps if isinstance(s, Parallelize)]
    if tp is None or program.mesh.size(tp.on) == 1:
        assert parallelize == []
    else:
        all_fqns = g.fqns()
        styled = {f for rule in tp.rules for f in select(rule.pattern.text, all_fqns)}
        blocks = sum(stack.length for stack in g.stacks)
        outside = any(g.stack_of(f) is None for f in styled)
        assert len(parallelize) == blocks + outside
        seen: list[str] = []
        for step in parallelize:
            assert step.mesh_dim == tp.on
            full = [f"{step.fqn}.{rel}" if step.fqn and rel else (rel or step.fqn) for rel, _ in step.plan]
            seen += full
            # The span is the line of the rule that styles the first module of the call.
            rule = next(r for r in tp.rules if select(r.pattern.text, [full[0]]))
            assert step.span.line == rule.span.line
            assert _line(plan, step.span.line).startswith(rule.pattern.text + " ")
            assert step.span.file == str(PLANS / f"{plan}.plan")
        assert sorted(seen) == sorted(styled)

    for step in steps:
        if isinstance(step, Adapters):
            assert _line(plan, step.span.line).startswith("adapters {")
            assert all(g.module(f).kind == "linear" for f in step.fqns)
        elif isinstance(step, ContextParallel):
            assert _line(plan, step.span.line).startswith("context_parallel on ")
            assert all(g.module(f).kind == "attention" for f in step.fqns)
        elif isinstance(step, Checkpoint):
            assert _line(plan, step.span.line).startswith("activation_checkpoint ")

    # FSDP: children before parents, the root last, each span on its unit's line.
    shards = [s for s in steps if isinstance(s, FullyShard)]
    fsdp = spec.fully_shard
    assert fsdp is not None
    assert shards, "a plan with fully_shard lowers to at least the root"
    assert shards[-1].fqns == ()
    assert _line(plan, shards[-1].span.line).startswith("root")
    position = {id(s): i for i, s in enumerate(shards)}
    for outer in shards:
        assert outer.mesh_dims == fsdp.on
        for inner in shards:
            if inner is outer or not inner.fqns:
                continue
            nested = all(any(_inside(f, a) for a in outer.fqns) for f in inner.fqns) if outer.fqns else True
            if nested:
                assert position[id(inner)] < position[id(outer)], (inner.fqns, outer.fqns)
    for step in shards[:-1]:
        text = _line(plan, step.span.line)
        assert text.startswith("unit ")
        unit = next(u for u in fsdp.units if u.span.line == step.span.line)
        assert all(any(select(p.text, [f]) for p in unit.patterns) for f in step.fqns)


def _worlds_ids(combos: list[tuple[str, str, tuple[str, ...]]]) -> list[tuple[str, str, tuple[str, ...], int]]:
    return [(p, m, o, w) for p, m, o in combos for w in WORLDS]


MATRIX = _worlds_ids(_combos())


@pytest.mark.parametrize(("plan", "model", "overrides", "world"), MATRIX,
                         ids=[f"{p}-{m}-w{w}" for p, m, _, w in MATRIX])
def test_shipped_plan_compiles(plan: str, model: str, overrides: tuple[str, ...], world: int) -> None:
    spec = _spec(plan, overrides)
    fixed = _fixed_product(spec)
    if world % fixed:
        with pytest.raises(PlanRejected) as info:
            compile_plan(PLANS / f"{plan}.plan", graph(model), world, overrides)
        assert [d.code for d in info.value.errors] == ["E501"]
        assert f"{world} ranks are not divisible by the other dimensions' product {fixed}" in (
            info.value.errors[0].message)
        return
    if not _expert_pool_fits(spec, world, fixed):
        with pytest.raises(PlanRejected) as info:
            compile_plan(PLANS / f"{plan}.plan", graph(model), world, overrides)
        assert [d.code for d in info.value.errors] == ["E501"]
        assert "must divide dp_shard × cp × tp" in info.value.errors[0].message
        return
    compiled = compile_plan(PLANS / f"{plan}.plan", graph(model), world, overrides)
    assert compiled.warnings == ()
    program = compiled.program
    assert program.world_size == world
    assert program.mesh.world_size == world
    assert (program.plan, program.model) == (spec.name, model)
    check_structure(program, plan, model, spec)


def test_matrix_covers_every_preset() -> None:
    """Every preset is compiled by at least one shipped plan."""
    covered = {m for _, m, _ in _combos()}
    assert set(PRESETS) - covered == set()


@pytest.mark.parametrize("plan", sorted(TINY_FAMILIES))
def test_tp_1_lowers_no_parallelize(plan: str) -> None:
    """--set tp=1: tensor_parallel on a dimension of size 1 lowers to nothing."""
    model = TINY_FAMILIES[plan][0]
    for world in (1, 8):
        program = compile_plan(PLANS / f"{plan}.plan", graph(model), world, ["tp=1"]).program
        assert [s for s in program.steps if isinstance(s, Parallelize)] == []
        check_structure(program, plan, model, _spec(plan, ("tp=1",)))


@pytest.mark.parametrize("overrides", [
    ("tp=2", "mesh.cp=2"),
    ("tp=2", "mesh.dp_replicate=2"),
    ("tp=2", "mesh.dp_replicate=2", "mesh.cp=2"),
], ids=lambda o: ",".join(o))
def test_llama_hsdp_and_cp_variants(overrides: tuple[str, ...]) -> None:
    program = compile_plan(PLANS / "llama.plan", graph("tiny-llama"), 16, overrides).program
    check_structure(program, "llama", "tiny-llama", _spec("llama", overrides))
    cp = [s for s in program.steps if isinstance(s, ContextParallel)]
    assert len(cp) == ("mesh.cp=2" in overrides)
    if cp:
        assert cp[0].fqns == ("model.layers.0.self_attn", "model.layers.1.self_attn")
        assert (cp[0].mesh_dim, cp[0].load_balance) == ("cp", "headtail")
    shards = [s for s in program.steps if isinstance(s, FullyShard)]
    assert all(s.mesh_dims == ("dp_replicate", "fsdp") for s in shards)


def test_llama_405b_program_shape() -> None:
    """The biggest preset: 126 blocks, tp = 8, on 16384 ranks."""
    program = compile_plan(PLANS / "llama.plan", graph("llama-3.1-405b"), 16384, ["tp=8"]).program
    assert dict(zip(program.mesh.names, program.mesh.shape, strict=True)) == {
        "pp": 1, "dp_replicate": 1, "dp_shard": 2048, "cp": 1, "tp": 8}
    kinds = [s.kind for s in program.steps]
    assert (kinds.count("parallelize"), kinds.count("checkpoint"), kinds.count("fully_shard")) == (127, 126, 128)
    shards = [s for s in program.steps if isinstance(s, FullyShard)]
    # reshard_after_forward = auto: true except the last block (and explicit false).
    assert [s.reshard_after_forward for s in shards[:126]] == [True] * 125 + [False]
    assert shards[126].fqns == ("model.embed_tokens", "model.norm", "lm_head")
    assert shards[126].reshard_after_forward is False
    first = program.steps[0]
    assert isinstance(first, Parallelize) and first.fqn == ""


def test_fsdp_plan_rejects_gpt2_blocks() -> None:
    """fsdp.plan names `model.layers.*`; GPT-2's blocks are `transformer.h.*` (not its family)."""
    with pytest.raises(PlanRejected) as info:
        compile_plan(PLANS / "fsdp.plan", graph("gpt2"), 8)
    codes = [(d.code, d.severity) for d in info.value.diagnostics]
    assert ("W103", "warning") in codes
    assert {d.code for d in info.value.errors} == {"E502"}
    assert all("`model.layers.*` matches no module of gpt2" in d.message for d in info.value.errors)


def test_paths_are_the_plans_shipped() -> None:
    shipped = {p.stem for p in Path(PLANS).glob("*.plan")}
    # llama_qlora's NF4 bases split into whole blocks only where FSDP's size divides them
    # (E514 elsewhere, on purpose): tests/test_adapters_checks.py compiles it.
    assert shipped == set(FAMILIES) | {"fsdp", "llama_qlora"}
