"""The Program IR: JSON round trip, self-validating steps, the mesh layout, and
`plan compile` end to end (golden stdout and stderr, error exits, `-o`)."""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

import pytest

from meshplan.cli.main import main
from meshplan.dsl.errors import NOWHERE, Span
from meshplan.planner import compile_plan
from meshplan.planner.graph import ModelGraph, build_graph
from meshplan.planner.program import (
    SCHEMA_VERSION,
    Checkpoint,
    ContextParallel,
    FullyShard,
    MeshLayout,
    MixedPrecision,
    Offload,
    Parallelize,
    Program,
    StyleCall,
)

from .conftest import PLANS, ROOT, assert_golden


@cache
def graph(model: str) -> ModelGraph:
    return build_graph(model)


# Programs that between them use every step kind and every field: HSDP + TP + CP + AC
# (llama), fused parts (phi3, gpt2), per-block kinds (gemma2), AC every 2, an integer
# reshard_after_forward, offload and no mixed precision (hand-written).
EVERY_2 = """\
plan every2 for LlamaForCausalLM
mesh {
  dp_shard = auto
}
activation_checkpoint model.layers.* { mode = selective, every = 2 }
fully_shard on dp_shard {
  offload { pin_memory = false }
  unit model.layers.* { reshard_after_forward = 2 }
  root
}
"""
PROGRAMS = {
    "llama-hsdp-cp": ("llama.plan", "tiny-llama", 16, ("tp=2", "mesh.cp=2", "mesh.dp_replicate=2")),
    "phi3": ("phi3.plan", "tiny-phi3", 8, ("tp=2",)),
    "gpt2": ("gpt2.plan", "tiny-gpt2", 8, ("tp=2",)),
    "gemma2": ("gemma2.plan", "tiny-gemma2", 8, ("tp=2",)),
    "fsdp-1-rank": ("fsdp.plan", "tiny-qwen3", 1, ()),
    "every2": (EVERY_2, "tiny-llama", 4, ()),
}


@cache
def program(name: str) -> Program:
    plan, model, world, overrides = PROGRAMS[name]
    source = plan if "\n" in plan else PLANS / plan
    return compile_plan(source, graph(model), world, overrides).program


# ------------------------------------------------------------------ JSON round trip


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_json_round_trip(name: str) -> None:
    p = program(name)
    text = p.to_json()
    back = Program.from_json(text)
    assert back == p
    # Spans are compare=False on steps: check them one by one.
    assert [s.span for s in back.steps] == [s.span for s in p.steps]
    assert all(s.span.line >= 1 for s in p.steps)
    assert back.to_json() == text  # stable text: programs diff cleanly
    assert json.loads(text)["schema_version"] == SCHEMA_VERSION


def test_round_trip_keeps_every_kind_and_field() -> None:
    kinds = {s.kind for name in PROGRAMS for s in program(name).steps}
    assert kinds == {"parallelize", "context_parallel", "checkpoint", "fully_shard"}
    every2 = program("every2")
    assert [s.fqn for s in every2.steps if isinstance(s, Checkpoint)] == ["model.layers.0"]
    assert [s.mode for s in every2.steps if isinstance(s, Checkpoint)] == ["selective"]
    shards = [s for s in Program.from_json(every2.to_json()).steps if isinstance(s, FullyShard)]
    assert [s.reshard_after_forward for s in shards] == [2, 2, False]  # root: auto → false
    assert all(s.offload == Offload(pin_memory=False) and s.mixed_precision is None for s in shards)
    phi3 = Program.from_json(program("phi3").to_json())
    calls = dict(next(s for s in phi3.steps if isinstance(s, Parallelize)).plan)
    assert calls["self_attn.qkv_proj"] == StyleCall(style="colwise", input="replicate", output="replicate",
                                                    parts=3)
    assert calls["mlp.gate_up_proj"].parts == 2
    llama = Program.from_json(program("llama-hsdp-cp").to_json())
    top = llama.steps[0]
    assert isinstance(top, Parallelize) and top.fqn == ""
    assert dict(top.plan)["lm_head"] == StyleCall(style="colwise", input="shard(1)", output="shard(-1)",
                                                  local_output=False)
    block = llama.steps[1]
    assert isinstance(block, Parallelize) and block.fqn == "model.layers.0"
    attn = dict(block.plan)["self_attn"]
    assert attn.conversions == (("hidden_states", "shard(1)", "replicate"),)
    assert llama.mesh.submeshes == (("dp", ("dp_replicate", "dp_shard")), ("fsdp", ("dp_shard", "cp")),
                                    ("loss", ("dp_replicate", "dp_shard", "cp")))
    shard = next(s for s in llama.steps if isinstance(s, FullyShard))
    assert shard.mixed_precision == MixedPrecision(param="bf16", reduce="fp32")


def test_spans_survive_json_with_their_file() -> None:
    p = program("llama-hsdp-cp")
    data = json.loads(p.to_json())
    first = data["steps"][0]["span"]
    assert first == {"file": str(PLANS / "llama.plan"), "line": p.steps[0].span.line,
                     "column": 3, "end_line": p.steps[0].span.line,
                     "end_column": p.steps[0].span.end_column}


def test_step_without_span_round_trips_as_nowhere() -> None:
    step = Checkpoint(fqn="model.layers.0", mode="full")
    p = Program(plan="p", model="m", world_size=1, mesh=MeshLayout(names=("dp_shard",), shape=(1,)),
                steps=(step,))
    data = json.loads(p.to_json())
    assert data["steps"][0]["span"] is None
    assert Program.from_json(p.to_json()).steps[0].span == NOWHERE


def _data() -> dict[str, object]:
    data: dict[str, object] = json.loads(program("gpt2").to_json())
    return data


@pytest.mark.parametrize(("version", "shown"), [(2, "2"), (0, "0"), ("1", "'1'"), (None, "None")])
def test_schema_version_mismatch(version: object, shown: str) -> None:
    data = _data()
    if version is None:
        del data["schema_version"]
    else:
        data["schema_version"] = version
    with pytest.raises(ValueError, match=re.escape(
            f"Program JSON has schema_version {shown}; this meshplan reads {SCHEMA_VERSION}")):
        Program.from_json(json.dumps(data))


@pytest.mark.parametrize(("kind", "shown"), [("adapter", "'adapter'"), ("Parallelize", "'Parallelize'"),
                                             (None, "None")])
def test_unknown_step_kind(kind: str | None, shown: str) -> None:
    data = _data()
    steps = data["steps"]
    assert isinstance(steps, list)
    if kind is None:
        del steps[1]["kind"]
    else:
        steps[1]["kind"] = kind
    with pytest.raises(ValueError, match=re.escape(f"Program JSON: unknown step kind {shown}")):
        Program.from_json(json.dumps(data))


def test_decoding_validates_steps() -> None:
    """Steps decoded from JSON go through the same __post_init__ checks."""
    data = _data()
    steps = data["steps"]
    assert isinstance(steps, list)
    steps[-1]["reshard_after_forward"] = 1
    with pytest.raises(ValueError, match=re.escape("reshard_after_forward=1 (an int must be ≥ 2)")):
        Program.from_json(json.dumps(data))
    data = _data()
    data["world_size"] = 16
    with pytest.raises(ValueError, match=re.escape("has 8 ranks, world_size is 16")):
        Program.from_json(json.dumps(data))


# ------------------------------------------------------------------ step validation

STYLE = StyleCall(style="colwise")


@pytest.mark.parametrize(("make", "message"), [
    (lambda: Parallelize(fqn="model.layers.0", mesh_dim="tp", plan=()), "Parallelize 'model.layers.0': empty plan"),
    (lambda: Parallelize(fqn="model.layers.0", mesh_dim="", plan=(("mlp", STYLE),)),
     "Parallelize 'model.layers.0': no mesh dimension"),
    (lambda: Checkpoint(fqn="model.layers.3", mode="partial"),
     "Checkpoint 'model.layers.3': mode 'partial' is not full or selective"),
    (lambda: ContextParallel(fqns=(), mesh_dim="cp", load_balance="headtail", rotate="ring"),
     "ContextParallel: no attention modules"),
    (lambda: ContextParallel(fqns=("a",), mesh_dim="cp", load_balance="zigzag", rotate="ring"),
     "ContextParallel: bad load_balance/rotate 'zigzag'/'ring'"),
    (lambda: ContextParallel(fqns=("a",), mesh_dim="cp", load_balance="none", rotate="p2p"),
     "ContextParallel: bad load_balance/rotate 'none'/'p2p'"),
    (lambda: FullyShard(fqns=("a",), mesh_dims=(), reshard_after_forward=True),
     "FullyShard ('a',): 1 or 2 mesh dims (FSDP / HSDP), got ()"),
    (lambda: FullyShard(fqns=(), mesh_dims=("dp_replicate", "dp_shard", "cp"), reshard_after_forward=True),
     "FullyShard (): 1 or 2 mesh dims (FSDP / HSDP), got ('dp_replicate', 'dp_shard', 'cp')"),
    (lambda: FullyShard(fqns=("a",), mesh_dims=("dp_shard",), reshard_after_forward=1),
     "FullyShard ('a',): reshard_after_forward=1 (an int must be ≥ 2)"),
    (lambda: FullyShard(fqns=("a",), mesh_dims=("dp_shard",), reshard_after_forward=-4),
     "reshard_after_forward=-4 (an int must be ≥ 2)"),
    (lambda: StyleCall(style="colwise", input="shard"), "StyleCall colwise: input placement 'shard' is not a placement"),
    (lambda: StyleCall(style="rowwise", output="shard(x)"),
     "StyleCall rowwise: output placement 'shard(x)' is not a placement"),
    (lambda: StyleCall(style="colwise", parts=0), "StyleCall colwise: parts must be ≥ 1, got 0"),
    (lambda: StyleCall(style="prepare_input", conversions=(("x", "shard(1)", "replicat"),)),
     "StyleCall prepare_input: conversion 'x' has bad placement 'replicat'"),
    (lambda: MixedPrecision(param="bf61"), "MixedPrecision: param dtype 'bf61' is not one of"),
    (lambda: MixedPrecision(reduce="int8"), "MixedPrecision: reduce dtype 'int8' is not one of"),
    (lambda: MeshLayout(names=("tp",), shape=(1, 2)), "MeshLayout: names ('tp',) and shape (1, 2) differ in length"),
    (lambda: MeshLayout(names=("xp",), shape=(2,)), "MeshLayout: unknown dimension in ('xp',)"),
    (lambda: MeshLayout(names=("tp",), shape=(0,)), "MeshLayout: sizes must be ≥ 1, got (0,)"),
    (lambda: MeshLayout(names=("tp",), shape=(2,), submeshes=(("s", ("cp",)),)),
     "MeshLayout: submesh 's' uses undeclared dimensions ('cp',)"),
    (lambda: Program(plan="p", model="m", world_size=0, mesh=MeshLayout(names=(), shape=()), steps=()),
     "Program: world_size must be ≥ 1, got 0"),
    (lambda: Program(plan="p", model="m", world_size=4, mesh=MeshLayout(names=("dp_shard", "tp"), shape=(4, 2)),
                     steps=()),
     "Program: mesh {'dp_shard': 4, 'tp': 2} has 8 ranks, world_size is 4"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_post_init_rejects_bad_values(make: object, message: str) -> None:
    assert callable(make)
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


def test_good_steps_are_accepted_and_frozen() -> None:
    step = FullyShard(fqns=("model.layers.0",), mesh_dims=("dp_replicate", "fsdp"), reshard_after_forward=8,
                      mixed_precision=MixedPrecision(param="bf16", reduce="fp32"), span=Span.point("x.plan", 3))
    assert step.kind == "fully_shard"
    with pytest.raises(AttributeError):
        step.fqns = ()
    with pytest.raises(TypeError):
        Checkpoint("model.layers.0", "full")  # keyword-only
    assert StyleCall(style="prepare_input", conversions=((None, None, "replicate"),)).conversions[0][1] is None
    # Spans do not take part in equality.
    assert Checkpoint(fqn="a", mode="full", span=Span.point("x", 1)) == Checkpoint(fqn="a", mode="full")


# ------------------------------------------------------------------ MeshLayout

MESH = MeshLayout(names=("pp", "dp_replicate", "dp_shard", "cp", "tp", "ep"), shape=(2, 2, 8, 2, 4, 4),
                  submeshes=(("fsdp", ("dp_shard", "cp")), ("loss", ("dp_replicate", "dp_shard", "cp")),
                             ("dp", ("dp_replicate", "dp_shard"))))


def test_mesh_layout_size() -> None:
    assert MESH.world_size == 2 * 2 * 8 * 2 * 4  # ep is carved out of the others
    assert [MESH.size(d) for d in ("pp", "dp_replicate", "dp_shard", "cp", "tp", "ep")] == [2, 2, 8, 2, 4, 4]
    assert (MESH.size("fsdp"), MESH.size("loss"), MESH.size("dp")) == (16, 32, 16)
    small = MeshLayout(names=("dp_shard",), shape=(8,))
    assert (small.size("tp"), small.size("cp"), small.size("dp_shard")) == (1, 1, 8)  # undeclared: 1
    assert small.world_size == 8
    assert MeshLayout(names=(), shape=()).world_size == 1


def test_mesh_layout_expand() -> None:
    assert MESH.expand("fsdp") == ("dp_shard", "cp")
    assert MESH.expand("loss") == ("dp_replicate", "dp_shard", "cp")
    assert MESH.expand("tp") == ("tp",)
    assert MESH.expand("pp") == ("pp",)


def test_compiled_mesh_layout() -> None:
    p = program("llama-hsdp-cp")
    assert dict(zip(p.mesh.names, p.mesh.shape, strict=True)) == {
        "pp": 1, "dp_replicate": 2, "dp_shard": 2, "cp": 2, "tp": 2}
    assert (p.mesh.size("fsdp"), p.mesh.size("dp"), p.mesh.size("loss")) == (4, 4, 8)
    assert p.mesh.world_size == p.world_size == 16


# ------------------------------------------------------------------ plan compile (CLI)

COMPILE = ["compile", "plans/llama.plan", "--model", "tiny-llama", "--world-size", "8", "--set", "tp=2"]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def at_root(monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(ROOT)
    return ROOT


def test_compile_golden(at_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(COMPILE, capsys)
    assert code == 0, err
    assert_golden("compile/llama_tiny-llama_w8_tp2.json", out)
    assert_golden("compile/llama_tiny-llama_w8_tp2.stderr.txt", err)
    assert Program.from_json(out).to_json() + "\n" == out


def test_compile_summary(at_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, _, err = run(COMPILE, capsys)
    assert err.splitlines() == [
        "compiled plans/llama.plan for tiny-llama on 8 ranks",
        "  mesh: pp 1 × dp_replicate 1 × dp_shard 4 × cp 1 × tp 2; dp = dp_replicate × dp_shard; "
        "fsdp = dp_shard × cp; loss = dp_replicate × dp_shard × cp",
        "  steps: 3 parallelize, 2 checkpoint, 4 fully_shard",
    ]


def test_compile_unknown_model(at_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["compile", "plans/llama.plan", "--model", "tiny-lama", "--world-size", "8"], capsys)
    assert (code, out) == (2, "")
    assert err.count("\n") == 1, err
    assert err.startswith("plan compile: error: --model tiny-lama: unknown model 'tiny-lama'")
    assert "did you mean tiny-llama" in err


def test_compile_rejected_plan(at_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = "tests/plans/broken/kv_heads_tp16.plan"
    code, out, err = run(["compile", plan, "--model", "llama-3.1-8b", "--world-size", "32"], capsys)
    assert (code, out) == (1, "")
    assert err == (
        f"{plan}:12:43: error[E505]: 8 key/value heads cannot be split 16 ways "
        "(`model.layers.*.self_attn.k_proj`)\n"
        "  12 |   model.layers.*.self_attn.{q,k,v}_proj : colwise\n"
        "     |                                           ^^^^^^^\n"
        "  hint: use a tp size that divides both head counts\n"
        "plan rejected (1 error)\n"
    )


def test_compile_rejected_plan_json(at_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = "tests/plans/broken/tied_split_units.plan"
    code, out, err = run(["compile", plan, "--model", "llama-3.2-1b", "--world-size", "8", "--json"], capsys)
    assert (code, err) == (1, "")
    [d] = json.loads(out)
    assert (d["file"], d["line"], d["column"], d["code"], d["severity"]) == (plan, 13, 3, "E508", "error")
    assert d["related"] == [{"file": plan, "line": 11, "column": 3, "message": "the other unit"}]


def test_compile_world_size_usage_error(at_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["compile", "plans/llama.plan", "--model", "tiny-llama", "--world-size", "0"], capsys)
    assert (code, out) == (2, "")
    assert "argument --world-size: 0 is out of range: expected 1 to 1,048,576 (ranks)" in err
    code, out, err = run(["compile", "nope.plan", "--model", "tiny-llama", "--world-size", "8"], capsys)
    assert (code, out, err) == (2, "", "plan compile: error: no such file: nope.plan\n")


def test_compile_output_file(at_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, expected, _ = run(COMPILE, capsys)
    target = tmp_path / "program.json"
    target.write_text("old")
    target.chmod(0o640)
    code, out, err = run([*COMPILE, "-o", str(target)], capsys)
    assert (code, out) == (0, "")
    assert err.splitlines()[-1] == f"  steps: 3 parallelize, 2 checkpoint, 4 fully_shard → {target}"
    assert target.read_text() == expected
    assert target.stat().st_mode & 0o777 == 0o640  # replaced in place, mode kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["program.json"]  # no temp file left


def test_compile_output_untouched_when_rejected(at_root: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["compile", "tests/plans/broken/kv_heads_tp16.plan", "--model", "llama-3.1-8b", "--world-size", "32"]
    fresh = tmp_path / "new.json"
    code, out, _ = run([*argv, "-o", str(fresh)], capsys)
    assert (code, out) == (1, "")
    assert list(tmp_path.iterdir()) == []
    kept = tmp_path / "kept.json"
    kept.write_text("previous program\n")
    code, _, _ = run([*argv, "-o", str(kept)], capsys)
    assert code == 1
    assert kept.read_text() == "previous program\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.json"]
