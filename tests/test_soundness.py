"""The compiler's soundness: what `--emit python` runs is what the runtime runs.

For every shipped plan on its tiny preset, the Program applied by the runtime and the
emitted script applied by `exec` give every parameter the same placements and local
shape, on a fake process group over a meta-device model.
"""

from __future__ import annotations

import ast
from typing import Any

import pytest
from torch import nn

from meshplan.planner import compile_plan
from meshplan.planner.emit import to_python
from meshplan.planner.models import build_meta_model, resolve_model
from meshplan.planner.program import Program
from meshplan.runtime.explain.dryrun import dry_run
from meshplan.runtime.parallel.apply import StepError

from .conftest import ROOT

CASES = [
    ("llama", "tiny-llama", 8, ["tp=2"]),
    ("llama", "tiny-qwen2", 8, ["tp=2", "mesh.dp_replicate=2"]),
    ("qwen3", "tiny-qwen3", 8, ["tp=2"]),
    ("gemma2", "tiny-gemma2", 8, ["tp=2"]),
    ("phi3", "tiny-phi3", 4, ["tp=2"]),
    ("gpt2", "tiny-gpt2", 8, ["tp=2"]),
    ("fsdp", "tiny-mixtral", 4, []),
    ("fsdp", "tiny-llama", 1, []),
    ("llama", "tiny-llama", 8, ["tp=2", "mesh.cp=2"]),
]


def _script_applier(script: str) -> Any:
    def apply(program: Program, model: nn.Module) -> None:
        namespace: dict[str, Any] = {}
        exec(compile(script, f"<{program.plan}.py>", "exec"), namespace)
        namespace["apply"](model, namespace["build_mesh"]("cpu"))

    return apply


@pytest.mark.parametrize("plan,model,world,overrides", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_script_and_runtime_agree(plan: str, model: str, world: int, overrides: list[str]) -> None:
    program = compile_plan(ROOT / "plans" / f"{plan}.plan", model, world, overrides).program
    source = resolve_model(model)
    script = to_python(program)
    by_runtime = dry_run(program, lambda: build_meta_model(source))
    by_script = dry_run(program, lambda: build_meta_model(source), applier=_script_applier(script))
    assert by_runtime == by_script
    if any(s.kind == "parallelize" for s in program.steps):
        assert any("S(" in p for layout in by_runtime.values() for p in layout.placements)


def test_script_imports_only_torch_and_the_standard_library() -> None:
    program = compile_plan(ROOT / "plans" / "gpt2.plan", "tiny-gpt2", 8, ["tp=2"]).program
    tree = ast.parse(to_python(program))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add((node.module or "").split(".")[0])
    assert roots <= {"__future__", "torch", "collections", "contextlib", "functools", "typing", "warnings"}
    assert "meshplan" not in to_python(program).replace("meshplan program", "").replace("meshplan/runtime", "")


def test_a_step_failure_names_the_plan_line() -> None:
    program = compile_plan(ROOT / "plans" / "gpt2.plan", "tiny-gpt2", 8, ["tp=2"]).program
    llama = resolve_model("tiny-llama")
    with pytest.raises(StepError, match=r"plans/gpt2\.plan:\d+:\d+: the model has no module `transformer\.h\.0"):
        dry_run(program, lambda: build_meta_model(llama))


def test_fused_weights_are_stored_rank_major() -> None:
    import torch

    from meshplan.runtime.parallel.styles import fused_row_order

    # 3 parts of 4 rows over 2 ranks: rank 0 holds rows 0-1 of each part, rank 1 rows 2-3.
    assert fused_row_order(12, 3, 2).tolist() == [0, 1, 4, 5, 8, 9, 2, 3, 6, 7, 10, 11]
    with pytest.raises(ValueError, match="not 3 parts divisible by tp 3"):
        fused_row_order(12, 3, 3)
    assert torch.equal(torch.arange(12)[fused_row_order(12, 3, 1)], torch.arange(12))


def test_script_installs_context_parallel_where_the_runtime_does() -> None:
    from meshplan.runtime.attention.context import context_parallel_of

    program = compile_plan(ROOT / "plans" / "llama.plan", "tiny-llama", 8, ["tp=2", "mesh.cp=2"]).program
    source = resolve_model("tiny-llama")
    models: dict[str, nn.Module] = {}

    def build(name: str) -> Any:
        def make() -> nn.Module:
            models[name] = build_meta_model(source)
            return models[name]
        return make

    dry_run(program, build("runtime"))
    dry_run(program, build("script"), applier=_script_applier(to_python(program)))
    installed = {name: [(fqn, cp.size, cp.rotate, cp.load_balance) for fqn, module in model.named_modules()
                        if (cp := context_parallel_of(module)) is not None]
                 for name, model in models.items()}
    assert installed["runtime"] == installed["script"]
    assert [cp[0].replace("_checkpoint_wrapped_module.", "") for cp in installed["runtime"]] == [
        "model.layers.0.self_attn", "model.layers.1.self_attn"]
