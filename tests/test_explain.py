"""`plan explain`: the dry run, its scaling from one block per kind, rank classes, the CLI.

Scaling: figures measured on the reduced model (one block per (kind, steps), scaled by
layer count) equal those of the full dry run — layouts, padded storage, optimizer
states and FSDP traffic on Llama-3.2-1B at 8 ranks; activations and tensor-parallel
traffic on a 6-layer Llama. Rank classes: the shapes computed for a class equal those
obtained by applying the Program as that rank. The rendered text is golden; the JSON and
the HTML page carry every figure of the text's tables (parsed, not compared as text);
`--rank R` shows R's own class, memory and local shapes; the phases go to stderr.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
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


_PHASE = re.compile(r"^\[ *\d+\.\d s\] (.*) …$")


def _phases(err: str) -> tuple[list[str], str]:
    """The phase lines of stderr (their seconds vary) and the rest of it."""
    phases = [m.group(1) for line in err.splitlines() if (m := _PHASE.match(line))]
    rest = "".join(line for line in err.splitlines(keepends=True) if not _PHASE.match(line))
    return phases, rest


def test_golden_text(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    code, out, err = _run(["explain", "plans/llama.plan", "--model", "tiny-llama", "--world-size", "8",
                           "--set", "tp=2", "--set", "seq_len=128", "--micro-batch", "2",
                           "--gpu-memory", "1MB", "--rank", "5"], capsys)
    assert code == 0, err
    assert_golden("explain/llama_tiny-llama_w8_tp2.txt", out)
    # The phases, on stderr as they start, in order; then the dry run's warnings:
    # diagnostics on the plan lines, as `plan check` prints them.
    phases, rest = _phases(err)
    assert [p.split(" ")[0] for p in phases] == ["compiling", "dry", "dry", "dry", "report:"]
    assert phases[1].startswith("dry run: tracing one step (2 of 2 layers, 128 tokens × 2)")
    assert_golden("explain/llama_tiny-llama_w8_tp2.stderr", rest)


def test_json_svg_html(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                       tmp_path: Path) -> None:
    monkeypatch.chdir(ROOT)
    svg, page = tmp_path / "mesh.svg", tmp_path / "mesh.html"
    code, out, err = _run(["explain", "plans/fsdp.plan", "--model", "tiny-llama", "--world-size", "3",
                           "--set", "seq_len=64", "--json", "--rank", "2", "--svg", str(svg),
                           "--html", str(page)], capsys)
    assert code == 0, err
    data = json.loads(out)  # nothing but JSON on stdout: the phases went to stderr
    assert len(_phases(err)[0]) == 5
    assert data["mesh"]["names"] == ["dp_shard"] and data["mesh"]["shape"] == [3]
    memory = data["memory"]
    for key in ("parameters_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes", "peak_bytes"):
        assert isinstance(memory[key], int) and memory[key] > 0
    assert [(c["rank"], c["ranks"]) for c in memory["classes"]] == [(0, 2), (2, 1)]
    assert data["rank"]["coordinates"]["dp_shard"] == 2
    assert {r["source"] for r in data["communication"]["rows"]} == {"fsdp"}
    assert_golden("explain/fsdp_tiny-llama_w3.json", json.dumps(data, indent=2) + "\n")
    # --rank 2: the last class (smaller shards), its own memory and local shapes.
    rank = data["rank"]
    assert rank["class"] == {"rank": 2, "ranks": 1, "measured": True}
    assert {**rank["memory"], "measured": True} == memory["classes"][1]
    embed = {m["name"]: m for m in rank["modules"]}["model.embed_tokens"]["params"][0]
    assert (embed["global_shape"], embed["local_shape"]) == ([256, 64], [84, 64])
    # The picture: well-formed, rank 2 outlined, memory, activations and traffic each on a
    # scale (an axis ending at the largest bar's value) with their legends.
    text = svg.read_text(encoding="utf-8")
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg") and "rank 2 (×1)" in text and "red outline: rank 2 (--rank), in the class of rank 2" in text
    labels = ["".join(t.itertext()) for t in root.iter("{http://www.w3.org/2000/svg}text")]
    peak = human_bytes(max(c["peak_bytes"] for c in memory["classes"]))
    assert peak in labels  # the memory axis' last tick
    top_comm = human_bytes(max(r["bytes"] for r in data["communication"]["rows"]))
    assert top_comm in labels
    for part in ("parameters", "optimizer (AdamW)", "backward temporaries"):
        assert part in labels  # the memory legend
    assert human_bytes(memory["classes"][1]["optimizer_bytes"]) in labels  # rank 2's column of it
    assert "<svg" in page.read_text(encoding="utf-8") and "Memory per rank" in page.read_text(encoding="utf-8")


class _Cells(HTMLParser):
    """The rows of every table of a page (header rows too), as lists of cell texts."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "tr":
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


_NUMBER = re.compile(r"\d+(?:\.\d+)? (?:B|KiB|MiB|GiB|TiB)\b|\d+")


def _table_rows(text: str) -> list[list[str]]:
    """The rows of the text output's tables (memory, activations, communication, mesh
    groups, header rows included): lines of two or more cells, cells two spaces apart."""
    rows = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip()[0] in "┌├└│─╭╰":
            continue
        cells = [c for c in re.split(r"\s{2,}", line.strip()) if c]
        if len(cells) >= 2:
            rows.append(cells)
    return rows


def _tree_params(text: str) -> list[tuple[str, str, str, str]]:
    """(global shape, local shape, placements, dtype) of each parameter line of the tree."""
    found = re.findall(r"(\[[\d, ]*\]) → (\[[\d, ]*\])  (\[[^\]]*\])  (\w+)", text)
    return [tuple(f) for f in found]


def _json_numbers(data: Any) -> tuple[set[int], set[str]]:
    """Every integer of a JSON document, and each as a human-readable size."""
    ints: set[int] = set()

    def walk(x: Any) -> None:
        if isinstance(x, bool):
            return
        if isinstance(x, int):
            ints.add(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, str):
            ints.update(int(n) for n in re.findall(r"\d+", x))
    walk(data)
    return ints, {human_bytes(i) for i in ints}


def test_json_and_html_carry_every_figure_of_the_text(capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The text, the page and the JSON of one dry run (uneven shards: two rank classes; a
    rank of the second): every row of the text's tables is a row of the page's, every
    parameter line of the trees a row of the page's module tables, and every number of
    the text's tables and trees is in the JSON (sizes as the text rounds them)."""
    monkeypatch.chdir(ROOT)
    page = tmp_path / "explain.html"
    argv = ["explain", "plans/fsdp.plan", "--model", "tiny-llama", "--world-size", "3", "--set", "seq_len=64",
            "--micro-batch", "2", "--gpu-memory", "4MiB", "--rank", "2"]
    code, text, err = _run([*argv, "--html", str(page)], capsys)
    assert code == 0, err
    code, out, err = _run([*argv, "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    cells = _Cells()
    cells.feed(page.read_text(encoding="utf-8"))
    rows = _table_rows(text)
    assert len(rows) > 25  # the four tables, twice the memory one
    for row in rows:
        assert row in [[c for c in r if c] for r in cells.rows], row
    params = _tree_params(text)
    assert len(params) == 2 * 21  # rank 0's tree and rank 2's
    page_params = {tuple(r[2:6]) for r in cells.rows if len(r) == 6}
    assert set(params) <= page_params
    ints, sizes = _json_numbers(data)
    numbers = [n for row in rows for cell in row for n in _NUMBER.findall(cell)]
    numbers += [n for p in params for n in _NUMBER.findall(" ".join(p[:2]))]
    for n in numbers:
        assert (n in sizes) if " " in n else (int(n) in ints), n
    # The rank's own figures in both: rank 2's memory column and its local shapes.
    assert ["optimizer (AdamW)", human_bytes(data["rank"]["memory"]["optimizer_bytes"])] in rows
    assert ("[256, 64]", "[84, 64]", "[dp_shard:S(0)]", "float32") in params


def test_each_rank_shows_its_own_class(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """3 ranks FSDP-shard 256 rows as 86/86/84: --rank 0 and --rank 1 are rank 0's class,
    --rank 2 its own, with less optimizer state; each shows its own local shapes."""
    monkeypatch.chdir(ROOT)
    argv = ["explain", "plans/fsdp.plan", "--model", "tiny-llama", "--world-size", "3", "--set", "seq_len=64"]
    code, out, err = _run([*argv, "--rank", "1"], capsys)
    assert code == 0, err
    rank_part = out[out.index("\nRank 1\n"):]
    assert "class: rank 0's (×2: ranks with the same local shapes; applied)" in rank_part
    assert "rank 1 (class of rank 0, ×2)" in rank_part
    assert "weight  [256, 64] → [86, 64]  [dp_shard:S(0)]  float32" in rank_part
    code, out, err = _run([*argv, "--rank", "0", "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    zero = data["rank"]
    assert zero["class"] == {"rank": 0, "ranks": 2, "measured": True}
    classes = [{k: v for k, v in c.items() if k != "measured"} for c in data["memory"]["classes"]]
    assert zero["memory"] == classes[0] != classes[1]
    shapes = {m["name"]: m["params"][0]["local_shape"] for m in zero["modules"]}
    assert shapes["model.embed_tokens"] == [86, 64] and shapes["model.layers.0.mlp.gate_proj"] == [43, 64]
    assert zero["memory"]["optimizer_bytes"] > data["memory"]["classes"][1]["optimizer_bytes"]


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
