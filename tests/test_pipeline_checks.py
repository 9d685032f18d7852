"""The pipeline pass: what it lowers, and every mistake it refuses, at the plan line.

Model: an 8-layer tiny Llama (and a tied variant), compiled at world sizes 2–8. The
verdicts of the refusals are measured: torch's schedules raise for fewer microbatches
than stages (`ValueError: Number of microbatches (1) must be greater than or equal to the
number of stages (2)`), and the other rank then hangs in its receive; the other
refusals are cuts the runtime cannot build (see tests/test_pipeline.py for the exact ones).
"""

from __future__ import annotations

import pytest

from meshplan.dsl.errors import PlanError, PlanRejected
from meshplan.planner import compile_plan
from meshplan.planner.graph import ModelGraph, build_graph
from meshplan.planner.program import Pipeline

from .conftest import tiny_llama_graph


def _graph(layers: int, tied: bool = False) -> ModelGraph:
    return tiny_llama_graph(layers, tied=tied)


@pytest.fixture(scope="module")
def eight() -> ModelGraph:
    return _graph(8)


def _plan(pipeline: str, mesh: str = "  pp = 2", extra: str = "") -> str:
    return (f"plan p for LlamaForCausalLM\nmesh {{\n{mesh}\n}}\npipeline on pp {{\n{pipeline}\n}}\n"
            + extra)


def _errors(text: str, graph: ModelGraph, world: int = 2) -> list[PlanError]:
    with pytest.raises(PlanRejected) as info:
        compile_plan(text, graph, world)
    return list(info.value.errors)


def _step(text: str, graph: ModelGraph, world: int = 2) -> Pipeline:
    program = compile_plan(text, graph, world).program
    step = program.steps[0]
    assert isinstance(step, Pipeline)
    return step


def test_even_split_gives_the_middle_stages_the_extra_layers(eight: ModelGraph) -> None:
    step = _step(_plan("  schedule = 1f1b\n  microbatches = 3", "  pp = 3"), eight, 3)
    assert step.stages == ((0, 1), (2, 3, 4, 5), (6, 7)) or [len(s) for s in step.stages] == [2, 3, 3] \
        or [len(s) for s in step.stages] == [3, 3, 2]
    assert sum(len(s) for s in step.stages) == 8
    assert len(step.stages[1]) >= max(len(step.stages[0]), len(step.stages[2]))
    assert step.ranks == ((0,), (1,), (2,))
    assert step.embed == ("model.embed_tokens",) and step.head == ("model.norm", "lm_head")


def test_looped_and_v_shaped_rank_layouts(eight: ModelGraph) -> None:
    looped = _step(_plan("  schedule = interleaved_1f1b\n  microbatches = 4\n  virtual_stages = 2",
                         "  pp = 4"), eight, 4)
    assert looped.ranks == ((0, 4), (1, 5), (2, 6), (3, 7))
    v = _step(_plan("  schedule = zbv\n  microbatches = 4\n  virtual_stages = 2", "  pp = 4"), eight, 4)
    assert v.ranks == ((0, 7), (1, 6), (2, 5), (3, 4))


def test_explicit_split_points(eight: ModelGraph) -> None:
    step = _step(_plan("  schedule = gpipe\n  microbatches = 2\n  split model.layers.3"), eight)
    assert step.stages == ((0, 1, 2), (3, 4, 5, 6, 7))


def test_the_pipeline_step_comes_first_and_round_trips(eight: ModelGraph) -> None:
    from meshplan.planner.program import Program

    text = _plan("  schedule = 1f1b\n  microbatches = 2", "  pp = 2\n  dp_shard = auto",
                 extra="fully_shard on dp_shard {\n  unit model.layers.* { reshard_after_forward = false }\n  root\n}\n")
    program = compile_plan(text, eight, 4).program
    assert program.steps[0].kind == "pipeline"
    assert Program.from_json(program.to_json()) == program


@pytest.mark.parametrize(("pipeline", "mesh", "phrase"), [
    ("  schedule = 1f1b\n  microbatches = 1", "  pp = 2",
     "microbatches = 1 is fewer than pp = 2"),
    ("  schedule = 1f1b\n  microbatches = 2\n  virtual_stages = 2", "  pp = 2",
     "1f1b runs one stage per rank"),
    ("  schedule = zbv\n  microbatches = 2\n  virtual_stages = 3", "  pp = 2",
     "zbv runs exactly two stages per rank"),
    ("  schedule = gpipe\n  microbatches = 2\n  split model.layers.0", "  pp = 2",
     "names the first layer"),
    ("  schedule = gpipe\n  microbatches = 2\n  split model.layers.{2,5}", "  pp = 2",
     "into 3 stages, but the schedule runs 2"),
    ("  schedule = gpipe\n  microbatches = 2\n  split model.layerz.3", "  pp = 2",
     "matches no layer"),
    ("  schedule = interleaved_1f1b\n  microbatches = 4\n  virtual_stages = 4", "  pp = 4",
     "16 pipeline stages (pp × virtual_stages) cannot share 8 decoder layers"),
])
def test_refusals_name_the_pipeline_line(eight: ModelGraph, pipeline: str, mesh: str, phrase: str) -> None:
    errors = _errors(_plan(pipeline, mesh), eight, 4 if "pp = 4" in mesh else 2)
    first = errors[0]
    assert first.code == "E512", first
    assert phrase in first.message, first.message
    assert first.span.line in (5, 6, 7, 8, 9)  # the section or its split line


def test_tied_embedding_and_head_cannot_be_cut_apart() -> None:
    errors = _errors(_plan("  schedule = 1f1b\n  microbatches = 2"), _graph(4, tied=True))
    assert [e.code for e in errors] == ["E508"]
    assert "one tied tensor" in errors[0].message and "first stage" in errors[0].message


def test_uneven_split_and_resharding_warn(eight: ModelGraph) -> None:
    text = _plan("  schedule = gpipe\n  microbatches = 2\n  split model.layers.1", "  pp = 2\n  dp_shard = auto",
                 extra="fully_shard on dp_shard {\n  unit model.layers.* { reshard_after_forward = true }\n"
                       "  root\n}\n")
    compiled = compile_plan(text, eight, 4)
    codes = sorted(w.code for w in compiled.warnings)
    assert "W104" in codes and "W105" in codes
    uneven = next(w for w in compiled.warnings if w.code == "W104")
    assert "stage 0: 1 layers" in uneven.message


def test_a_model_that_cannot_be_cut() -> None:
    errors = _errors(_plan("  schedule = 1f1b\n  microbatches = 2").replace("LlamaForCausalLM", "GPT2LMHeadModel"),
                     build_graph("tiny-gpt2"))
    assert errors[0].code == "E512" and "cannot be cut into pipeline stages" in errors[0].message


def test_interleaved_schedules_take_any_stage_and_microbatch_count(eight: ModelGraph) -> None:
    """Measured exact on gloo: interleaved 1F1B with one stage per rank, and with 3
    microbatches over pp = 2 (no multiple of pp needed)."""
    one = _step(_plan("  schedule = interleaved_1f1b\n  microbatches = 2"), eight)
    assert one.ranks == ((0,), (1,))
    three = _step(_plan("  schedule = interleaved_1f1b\n  microbatches = 3\n  virtual_stages = 2"), eight)
    assert three.microbatches == 3 and three.ranks == ((0, 2), (1, 3))


def test_explain_names_the_pipeline_figures_it_leaves_out(tmp_path: object) -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    plan = Path(str(tmp_path)) / "pp.plan"
    plan.write_text(_plan("  schedule = interleaved_zero_bubble\n  microbatches = 2"), encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "meshplan.cli.main", "explain", str(plan), "--model",
                          "tiny-llama", "--world-size", "2", "--seq-len", "32", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    codes = {d["code"]: d for d in json.loads(out.stdout)["diagnostics"]}
    assert codes["W205"]["line"] == 5 and "defers each microbatch's weight gradients" in codes["W205"]["message"]


def test_emit_python_writes_a_pipelined_script(tmp_path: object) -> None:
    import ast
    import subprocess
    import sys
    from pathlib import Path

    plan = Path(str(tmp_path)) / "pp.plan"
    plan.write_text(_plan("  schedule = 1f1b\n  microbatches = 2"), encoding="utf-8")
    out_file = Path(str(tmp_path)) / "x.py"
    out = subprocess.run([sys.executable, "-m", "meshplan.cli.main", "compile", str(plan), "--model",
                          "tiny-llama", "--world-size", "2", "--emit", "python", "-o", str(out_file)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    script = out_file.read_text(encoding="utf-8")
    ast.parse(script)  # tests/test_pipeline_emit.py runs such scripts on 4 ranks
    assert "PipelineStage(" in script and "def _stage_1(model, mesh):" in script


def test_plan_run_refuses_a_batch_the_microbatches_do_not_divide(tmp_path: object) -> None:
    """A user's mistake, found before any data is read: exit 2 with the fix, not an
    internal error inside the first step."""
    import subprocess
    import sys
    from pathlib import Path

    plan = Path(str(tmp_path)) / "pp.plan"
    plan.write_text(_plan("  schedule = 1f1b\n  microbatches = 2"), encoding="utf-8")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "meshplan.cli.main", "run", str(plan), "--model", "tiny-llama", "--steps", "1",
               "--micro-batch", "3", "--seq-len", "32"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert out.returncode != 0
    assert "--micro-batch 3: the plan's pipeline cuts each step into 2 microbatches (line 5)" in out.stderr
    assert "internal error" not in out.stderr
