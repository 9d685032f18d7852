"""`plan explain`: the dry run, its scaling from one block per kind, rank classes, the CLI.

Scaling: figures measured on the reduced model (one block per (kind, steps), scaled by
layer count) equal those of the full dry run — layouts, padded storage, optimizer
states and FSDP traffic on Llama-3.2-1B at 8 ranks; activations and tensor-parallel
traffic on a 6-layer Llama. Rank classes: the shapes computed for a class equal those
obtained by applying the Program as that rank. The rendered text is golden.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from meshplan.cli.main import main
from meshplan.planner import compile_plan
from meshplan.planner.models import build_meta_model, load_preset, resolve_model
from meshplan.runtime.explain.dryrun import dry_run
from meshplan.runtime.explain.reduction import reduce_program
from meshplan.runtime.explain.report import explain, mesh_groups
from meshplan.runtime.explain.shards import ParamShard, measure_shards, rank_classes
from meshplan.runtime.explain.sizes import human_bytes, parse_bytes
from meshplan.runtime.explain.world import coordinates, rank_at

from .conftest import ROOT, assert_golden

LLAMA = ROOT / "plans" / "llama.plan"
FSDP = ROOT / "plans" / "fsdp.plan"


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-llama with 6 layers, as a Hugging Face config directory."""
    values = {k: v for k, v in load_preset("tiny-llama").items() if not k.startswith("_")}
    values["num_hidden_layers"] = 6
    path = tmp_path_factory.mktemp("six") / "tiny-llama-6"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(values), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- scaling


def test_reduced_dry_run_equals_the_full_one_on_llama_3_2_1b() -> None:
    compiled = compile_plan(LLAMA, "llama-3.2-1b", 8, ["tp=2"])
    program, graph = compiled.program, compiled.graph
    reduction = reduce_program(program, graph)
    assert reduction.kept == (0, 15)  # the last layer keeps its parameters after forward
    assert reduction.count(0) == 15 and reduction.count(15) == 1
    reduced = explain(compiled, seq_len=64, trace=False)
    full = explain(compiled, seq_len=64, trace=False, reduce=False)
    assert reduced.to_json()["memory"] == full.to_json()["memory"]
    assert reduced.comm == full.comm
    # And every parameter's layout is what applying the whole Program gives.
    source = resolve_model("llama-3.2-1b")
    layouts = dry_run(program, lambda: build_meta_model(source))
    shards = reduced.classes[0].shards
    for fqn, layout in layouts.items():
        assert shards[reduction.representative(fqn)].layout == layout, fqn


def test_scaled_activations_and_tensor_parallel_traffic_equal_the_full_trace(six_layers: Path) -> None:
    compiled = compile_plan(LLAMA, str(six_layers), 8, ["tp=2"])
    reduced = explain(compiled, seq_len=64, micro_batch=2)
    full = explain(compiled, seq_len=64, micro_batch=2, reduce=False)
    assert reduced.reduction.kept == (0, 5) and full.reduction.kept == tuple(range(6))
    assert reduced.to_json()["memory"] == full.to_json()["memory"]
    assert reduced.comm == full.comm
    tp = {(r.op, r.kind): r.count for r in reduced.comm if r.dim == "tp"}
    # Per layer, sequence parallel: 2 all-gathers and 2 reduce-scatters forward, their
    # mirror images backward, and the recomputed forward (stopping before down_proj).
    assert tp[("all_gather", "tp")] == 6 * 6 + 1 + 1
    assert tp[("reduce_scatter", "tp")] == 6 * 5 + 1 + 1
    assert tp[("all_reduce", "loss")] == 3


# --------------------------------------------------------------------------- rank classes


def test_uneven_shards_form_rank_classes_that_match_applying_as_those_ranks() -> None:
    compiled = compile_plan(FSDP, "tiny-llama", 3, [])
    program = compiled.program
    reduction = reduce_program(program, compiled.graph)
    classes = measure_shards(program, compiled.graph.source, reduction)
    assert [(c.rank, c.count) for c in classes] == [(0, 2), (2, 1)]
    source = resolve_model("tiny-llama")
    by_rank = dry_run(program, lambda: build_meta_model(source), rank=2)
    last = classes[1].shards
    for fqn, layout in by_rank.items():
        assert last[reduction.representative(fqn)].layout == layout, fqn
    # FSDP pads: rank 2 stores as much as rank 0 but its optimizer states are smaller.
    ex = explain(compiled, seq_len=64, trace=False)
    first, second = ex.memory
    assert first.parameters == second.parameters and first.optimizer > second.optimizer
    uneven = [d for d in ex.diagnostics if d.code == "W201"]
    assert uneven and all(d.severity == "warning" for d in uneven)
    # On the unit lines whose shard group splits them: embed_tokens is in the root unit.
    assert [(d.span.line, d.span.column) for d in uneven] == [(16, 3), (17, 3)]
    assert uneven[1].message.startswith("uneven shards: model.embed_tokens.weight [256, 64] is [86, 64] on "
                                        "2 ranks, [84, 64] on 1 rank")
    # Computed from the placements (not applied) gives the same shapes.
    computed = measure_shards(program, compiled.graph.source, reduction, measure_limit=1)
    assert not computed[1].measured
    assert {k: s.layout for k, s in computed[1].shards.items()} == {k: s.layout for k, s in last.items()}


def test_idle_ranks_are_reported() -> None:
    compiled = compile_plan(FSDP, "tiny-llama", 48, [])
    ex = explain(compiled, seq_len=64, trace=False)
    assert sum(c.count for c in ex.classes) == 48
    idle = [d for d in ex.diagnostics if d.code == "W202"]
    assert idle and "model.layers.*.self_attn.q_proj.weight (16 ranks)" in idle[0].message
    assert idle[0].span.line == 16 and idle[0].hint


def test_classes_of_a_two_dimensional_mesh() -> None:
    shard = ParamShard(fqn="w", global_shape=(10, 4), local_shape=(), placements=(), mesh_dims=("fsdp", "tp"),
                       dtype="torch.float32", itemsize=4, storage_numel=0, placement_objects=_fsdp_tp())
    program = compile_plan(LLAMA, "tiny-llama", 8, ["tp=2"]).program
    classes = rank_classes(program.mesh, {"w": shard})
    # tp splits 10 rows 5/5; fsdp (4) splits 5 as 2/2/1/0 on every tp rank.
    assert sorted((r, n) for r, n, _ in classes) == [(0, 4), (4, 2), (6, 2)]


def _fsdp_tp() -> tuple[Any, ...]:
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    return (_StridedShard(0, split_factor=2), Shard(0))


# --------------------------------------------------------------------------- mesh helpers


def test_coordinates_and_groups() -> None:
    program = compile_plan(LLAMA, "tiny-llama", 16, ["tp=2", "mesh.dp_replicate=2"]).program
    layout = program.mesh
    coords = coordinates(layout, 13)
    assert (coords["dp_replicate"], coords["dp_shard"], coords["tp"]) == (1, 2, 1)
    assert coords["fsdp"] == 2 and coords["dp"] == 1 * 4 + 2
    assert rank_at(layout, coords) == 13
    groups = {g.name: g for g in mesh_groups(layout)}
    assert groups["tp"].first[:2] == ((0, 1), (2, 3))
    assert groups["dp"].group_of(layout, 13) == (1, 3, 5, 7, 9, 11, 13, 15)
    assert groups["dp_shard"].pattern(layout) == "r + 2·dp_shard"


def test_sizes() -> None:
    assert parse_bytes("80GB") == 80 * 2**30 and parse_bytes("1.5 KiB") == 1536
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes("eighty")
    assert human_bytes(1023) == "1023 B" and human_bytes(1536) == "1.5 KiB"


# --------------------------------------------------------------------------- CLI


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_golden_text(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    code, out, err = _run(["explain", "plans/llama.plan", "--model", "tiny-llama", "--world-size", "8",
                           "--set", "tp=2", "--set", "seq_len=128", "--micro-batch", "2",
                           "--gpu-memory", "1MB", "--rank", "5"], capsys)
    assert code == 0, err
    assert_golden("explain/llama_tiny-llama_w8_tp2.txt", out)
    # The dry run's warnings: diagnostics on the plan lines, on stderr, as `plan check` prints them.
    assert_golden("explain/llama_tiny-llama_w8_tp2.stderr", err)


def test_json_svg_html(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                       tmp_path: Path) -> None:
    monkeypatch.chdir(ROOT)
    svg, page = tmp_path / "mesh.svg", tmp_path / "mesh.html"
    code, out, err = _run(["explain", "plans/fsdp.plan", "--model", "tiny-llama", "--world-size", "3",
                           "--set", "seq_len=64", "--json", "--rank", "2", "--svg", str(svg),
                           "--html", str(page)], capsys)
    assert code == 0, err
    data = json.loads(out)  # nothing but JSON on stdout
    assert data["mesh"]["names"] == ["dp_shard"] and data["mesh"]["shape"] == [3]
    memory = data["memory"]
    for key in ("parameters_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes", "peak_bytes"):
        assert isinstance(memory[key], int) and memory[key] > 0
    assert [(c["rank"], c["ranks"]) for c in memory["classes"]] == [(0, 2), (2, 1)]
    assert data["rank"]["coordinates"]["dp_shard"] == 2
    assert {r["source"] for r in data["communication"]["rows"]} == {"fsdp"}
    assert_golden("explain/fsdp_tiny-llama_w3.json", json.dumps(data, indent=2) + "\n")
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg") and "rank 2 (×1)" in svg.read_text(encoding="utf-8")
    assert "<svg" in page.read_text(encoding="utf-8") and "Memory per rank" in page.read_text(encoding="utf-8")


def test_cli_errors(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    code, _, err = _run(["explain", "plans/llama.plan", "--model", "no-such-model", "--world-size", "8"], capsys)
    assert code == 2 and "plan explain: error: --model no-such-model" in err
    code, _, err = _run(["explain", "plans/llama.plan", "--model", "tiny-llama", "--world-size", "6",
                         "--set", "tp=4"], capsys)
    assert code == 1 and "error[E5" in err
    code, _, err = _run(["explain", "plans/fsdp.plan", "--model", "tiny-llama", "--world-size", "2",
                         "--rank", "2"], capsys)
    assert code == 2 and "--rank 2: the mesh has ranks 0..1" in err
    with pytest.raises(SystemExit) as info:
        main(["explain", "plans/fsdp.plan", "--model", "tiny-llama", "--world-size", "2", "--gpu-memory", "lots"])
    assert info.value.code == 2


# --------------------------------------------------------------------------- a model that fails


BROKEN = """plan broken for LlamaForCausalLM

mesh {
  dp_shard = auto
  tp = 2
}

tensor_parallel on tp {
  model.layers.*.self_attn.q_proj : rowwise
}

fully_shard on dp_shard {
  unit model.layers.*
  root
}
"""


def test_a_model_that_fails_in_the_dry_run_is_an_error_on_the_plan_line(tmp_path: Path) -> None:
    """q_proj rowwise without its input sharded: the compiler rejects it (E506); lowered
    anyway, the traced step fails in q_proj's matmul. That is E601 on the tensor-parallel
    line, naming the module and the line of modeling_llama.py that called it."""
    import linecache
    from io import StringIO

    from meshplan.cli.console import Terminal
    from meshplan.dsl.errors import PlanRejected

    plan = tmp_path / "broken.plan"
    plan.write_text(BROKEN, encoding="utf-8")
    compiled = compile_plan(plan, "tiny-llama", 4, [], check=False)
    assert [d.code for d in compiled.warnings] == ["E506"]
    with pytest.raises(PlanRejected) as info:
        explain(compiled, seq_len=64)
    (d,) = info.value.diagnostics
    assert (d.code, d.severity, d.span.line, d.span.column) == ("E601", "error", 9, 3)
    assert d.message.startswith("the dry run failed in `model.layers.0.self_attn.q_proj` (forward, "
                                "modeling_llama.py:")
    assert "RuntimeError: a and b must have same reduction dim" in d.message
    (source, note), = d.related
    assert source.file.endswith("modeling_llama.py")
    assert "self.q_proj(hidden_states)" in linecache.getline(source.file, source.line)
    assert note.startswith("raised in `") and d.hint
    # Rendered as every diagnostic is: location, code, the plan line and a caret.
    err = StringIO()
    term = Terminal(stdout=StringIO(), stderr=err)
    term.remember(str(plan), BROKEN)
    term.diagnostics(info.value.diagnostics)
    lines = err.getvalue().splitlines()
    assert lines[0].startswith(f"{plan}:9:3: error[E601]: the dry run failed in `model.layers.0.self_attn.q_proj`")
    assert lines[1:3] == ["  9 |   model.layers.*.self_attn.q_proj : rowwise",
                          "    |   ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^"]
