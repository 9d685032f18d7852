"""The style registry: one record per ParallelStyle, read by the language, the passes,
the runtime and the emitter — and a new style is one record."""

from __future__ import annotations

import ast
import os
from pathlib import Path
from typing import Any

import pytest
import torch  # noqa: F401  (the script namespace below needs it)
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel
from torch.distributed.tensor.parallel.style import ParallelStyle

from meshplan.dsl import load, schema
from meshplan.dsl.spec import Placement
from meshplan.dsl.styles import (
    MESHPLAN_STYLES,
    STYLES,
    TORCH_TP,
    Construct,
    Contract,
    Divides,
    StyleSchema,
    placement_of,
    render,
    shards_sequence,
)
from meshplan.planner import compile_plan
from meshplan.planner.emit import style_source, to_python
from meshplan.planner.emitted_styles import SOURCE
from meshplan.planner.program import Parallelize, StyleCall
from meshplan.runtime.parallel import styles as runtime_styles
from meshplan.runtime.parallel.registry import constructor, make_style, resolve, torch_placement

from .conftest import ROOT

EMITTED = ROOT / "planner" / "emitted_styles.py"


HEADER = '''"""The bodies of the torch-only runtime modules `plan compile --emit python` writes into
the standalone script: `runtime/parallel/styles.py` (the ParallelStyles torch lacks),
`runtime/parallel/ties.py` (tied parameters put back after each step) and
`runtime/parallel/stage.py` (a pipeline stage's module).

The emitter writes these strings; it never reads a source file of the installed package.
`tests/test_registry.py` holds them equal to the runtime modules' bodies (after the module
docstring and the `__future__` import), so the script runs the runtime's very code;
`MESHPLAN_UPDATE_GOLDEN=1 pytest tests/test_registry.py` rewrites this file after an edit
there.
"""
'''
COPIES = (("SOURCE", "runtime/parallel/styles.py"), ("TIES", "runtime/parallel/ties.py"),
          ("STAGE", "runtime/parallel/stage.py"))


def _body(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    return text.split('"""', 2)[2].replace("from __future__ import annotations\n", "").strip("\n")


def _render(root: Path) -> str:
    """planner/emitted_styles.py as the runtime modules it copies make it."""
    out = HEADER
    for name, rel in COPIES:
        text = _body(root / rel)
        assert "'''" not in text and not text.endswith("\\")
        out += f"\n# {rel}\n{name} = r'''\n{text}\n'''.strip(\"\\n\")\n"
    return out


def test_the_emitted_sources_are_the_runtime_modules() -> None:
    """The script inlines checked-in copies of torch-only runtime modules: they must be
    the runtime's very code (MESHPLAN_UPDATE_GOLDEN=1 rewrites the copies)."""
    expected = _render(ROOT)
    if os.environ.get("MESHPLAN_UPDATE_GOLDEN") and EMITTED.read_text(encoding="utf-8") != expected:
        EMITTED.write_text(expected, encoding="utf-8")
        pytest.fail("planner/emitted_styles.py rewritten from the runtime modules: rerun")
    assert EMITTED.read_text(encoding="utf-8") == expected, (
        "planner/emitted_styles.py differs from the runtime modules it copies; "
        "MESHPLAN_UPDATE_GOLDEN=1 pytest tests/test_registry.py rewrites it")
    assert _body(Path(runtime_styles.__file__)) == SOURCE


def test_the_language_reads_the_registry() -> None:
    import importlib

    assert importlib.import_module("meshplan.dsl.checks").STYLES is STYLES


# One call of each style, with every argument form (fused parts, named and positional
# conversions, a side left `none`).
CALLS = [
    StyleCall(style="colwise"),
    StyleCall(style="colwise", parts=3, output="replicate"),
    StyleCall(style="colwise", input="shard(1)", output="shard(-1)", local_output=False),
    StyleCall(style="rowwise", output="shard(1)"),
    StyleCall(style="rowwise", input="replicate", output="partial"),
    StyleCall(style="conv1d_colwise", parts=3),
    StyleCall(style="conv1d_rowwise"),
    StyleCall(style="sequence_parallel", dim=1, local_output=False),
    StyleCall(style="prepare_input", local_output=False, conversions=(("hidden_states", "shard(1)", "replicate"),)),
    StyleCall(style="prepare_input", local_output=False,
              conversions=((None, "shard(1)", "replicate"), (None, None, "replicate"))),
    StyleCall(style="prepare_output", conversions=((None, "replicate", "shard(1)"),)),
    StyleCall(style="replicate", input="shard(1)", output="shard(1)"),
    StyleCall(style="tp_experts", parts=2),
    StyleCall(style="tp_experts", parts=1),
    StyleCall(style="mla_kv_a", rope=8),
    StyleCall(style="head_params"),
]


def test_every_style_has_a_call_here() -> None:
    assert {c.style for c in CALLS} == set(STYLES)


def _script_namespace() -> dict[str, Any]:
    namespace: dict[str, Any] = {}
    exec(compile("from __future__ import annotations\n" + SOURCE, "<styles>", "exec"), namespace)
    namespace.update(Partial=Partial, Replicate=Replicate, Shard=Shard)
    import torch.distributed.tensor.parallel as tp

    namespace.update({name: getattr(tp, name) for name in dir(tp) if name.endswith("Parallel")
                      or name.startswith("PrepareModule")})
    return namespace


def _state(style: ParallelStyle) -> tuple[str, dict[str, Any]]:
    return type(style).__name__, dict(vars(style))


@pytest.mark.parametrize("call", CALLS, ids=lambda c: c.style)
def test_the_script_builds_what_the_runtime_builds(call: StyleCall) -> None:
    """The emitted constructor call and `make_style` come from one record: same class,
    same placements and flags."""
    by_runtime = make_style(call)
    by_script = eval(style_source(call), _script_namespace())
    assert _state(by_script) == _state(by_runtime)


@pytest.mark.parametrize("call", CALLS, ids=lambda c: c.style)
def test_constructors_are_importable_and_the_script_defines_meshplans(call: StyleCall) -> None:
    built = STYLES[call.style].construct(call)
    cls = constructor(built.constructor)
    assert issubclass(cls, ParallelStyle)
    assert built.module in (TORCH_TP, MESHPLAN_STYLES)
    if built.module == MESHPLAN_STYLES:
        defined = {n.name for n in ast.parse(SOURCE).body if isinstance(n, ast.ClassDef)}
        assert built.name in defined


@pytest.mark.parametrize("name", sorted(n for n, r in STYLES.items() if r.after), ids=str)
def test_after_hooks_are_the_runtime_s_and_the_script_s(name: str) -> None:
    after = STYLES[name].after
    assert after is not None and after.startswith(MESHPLAN_STYLES + ".")
    assert callable(resolve(after))
    defined = {n.name for n in ast.parse(SOURCE).body if isinstance(n, ast.FunctionDef)}
    assert after.rsplit(".", 1)[-1] in defined


def test_constructor_refuses_what_is_not_a_style() -> None:
    with pytest.raises(TypeError, match="is not a ParallelStyle"):
        constructor("torch.nn.Linear")


def test_fused_colwise_and_plain_colwise_differ_by_parts() -> None:
    assert STYLES["colwise"].construct(StyleCall(style="colwise")).name == "ColwiseParallel"
    fused = STYLES["colwise"].construct(StyleCall(style="colwise", parts=2))
    assert fused.name == "FusedColwiseParallel" and fused.args == (2,)
    assert type(make_style(StyleCall(style="colwise", parts=2))).__name__ == "FusedColwiseParallel"


def test_rendering_and_placements() -> None:
    assert render(Placement("shard", -1)) == "Shard(-1)"
    assert render((Placement("shard", 1), None)) == "(Shard(1), None,)"
    assert render(()) == "()"
    assert render(True) == "True" and render(3) == "3" and render(None) == "None"
    assert placement_of("shard(-2)") == Placement("shard", -2)
    assert placement_of("partial") == Placement("partial") and placement_of(None) is None
    for bad in ("shard(1); x", "shard( 1)", "shard(+1)", "shard()", "Shard(1)", "shard(١)"):
        with pytest.raises(ValueError, match="not a placement"):
            placement_of(bad)
    assert torch_placement(Placement("shard", 2)) == Shard(2)
    assert torch_placement(Placement("partial")) == Partial()


def test_the_layout_contract_says_what_happens_to_weights() -> None:
    assert STYLES["colwise"].weight("linear") == "shard(0)" and STYLES["colwise"].weight("embedding") == "shard(1)"
    assert STYLES["rowwise"].weight("linear") == "shard(1)" and STYLES["rowwise"].weight("embedding") == "shard(0)"
    assert STYLES["conv1d_colwise"].weight("conv1d") == "shard(1)"
    assert STYLES["sequence_parallel"].weight("norm") == "replicate"
    assert STYLES["sequence_parallel"].contract.replicated_params
    assert STYLES["prepare_input"].contract.input == "conversions"
    assert STYLES["prepare_output"].contract.output == "conversions"


def test_fused_weights_are_sharded_along_the_contract_s_dimension() -> None:
    assert STYLES["colwise"].fused_weight_dim() == 0  # Linear weight [out, in]
    assert STYLES["conv1d_colwise"].fused_weight_dim() == 1  # Conv1D weight [in, out]
    assert STYLES["rowwise"].fused_weight_dim() is None  # takes no parts


def test_tensor_parallel_experts_shard_the_intermediate_features() -> None:
    record = STYLES["tp_experts"]
    # gate_up_proj [E, 2I, H] and down_proj [E, H, I]: both on I, gate_up part by part
    assert record.contract.params == {"gate_up_proj": "shard(1)", "gate_proj": "shard(1)", "up_proj": "shard(1)",
                                      "down_proj": "shard(2)"}
    assert record.fused_params == {"gate_up_proj": 1} and record.contract.whole
    assert record.fits("experts") and not record.fits("linear")
    assert record.args["parts"].default == 2
    assert record.source(StyleCall(style="tp_experts", parts=2)) == "TensorParallelExperts(2)"


def test_head_params_shard_an_attention_module_s_own_parameters() -> None:
    record = STYLES["head_params"]
    assert record.contract.head_params and not record.contract.whole and not record.args
    assert record.fits("attention") and not record.fits("linear")
    assert record.divides["attention"].attr == "num_heads"
    assert record.source(StyleCall(style="head_params")) == "HeadParamsParallel()"


def test_mla_kv_a_sums_the_shared_rotary_part_s_gradient() -> None:
    record = STYLES["mla_kv_a"]
    assert record.contract.shared_tail and not record.contract.replicated_params
    assert record.fits("linear") and not record.fits("norm")
    assert record.weight("linear") == "replicate"  # the weight stays whole, and plain
    assert record.args["rope"].required
    assert record.source(StyleCall(style="mla_kv_a", rope=8)) == "SharedTailParallel(8)"
    with pytest.raises(ValueError, match="rope must be an integer"):
        StyleCall(style="mla_kv_a", rope="8")  # type: ignore[arg-type]


def test_sequence_sharding() -> None:
    assert shards_sequence("sequence_parallel", ())
    assert shards_sequence("rowwise", (None, "shard(1)"))
    assert not shards_sequence("colwise", ("replicate", "shard(-1)"))


# ------------------------------------------------------------ a new style is one record

GATHERED = StyleSchema(
    "Colwise with a gathered (replicated) output.",
    build=lambda call: Construct(f"{TORCH_TP}.ColwiseParallel", (), (
        ("input_layouts", Placement("replicate")), ("output_layouts", Placement("replicate")),
        ("use_local_output", call.local_output))),
    args={"local_output": schema.SettingSchema(schema.BoolType(), True)},
    applies_to=("linear",),
    contract=Contract(weights={"linear": "shard(0)"}),
    divides={"linear": Divides("out_features", "{n} output features")},
)

PLAN = """\
plan gathered for LlamaForCausalLM
mesh {
  dp_shard = auto
  tp = 2
}
tensor_parallel on tp {
  lm_head : colwise_gathered
}
fully_shard on dp_shard {
  root
}
"""


def test_a_new_style_is_one_record(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(STYLES, "colwise_gathered", GATHERED)  # type: ignore[index]
    load(PLAN)  # the language accepts it
    program = compile_plan(PLAN, "tiny-llama", 4).program  # the passes accept it
    (step,) = program.steps_of(Parallelize)
    (_, call), = step.plan
    assert call.style == "colwise_gathered"
    style = make_style(call)  # the runtime builds it
    assert isinstance(style, ColwiseParallel) and style.output_layouts == (Replicate(),)
    script = to_python(program)  # the script writes it
    assert ("'lm_head': ColwiseParallel(input_layouts=Replicate(), output_layouts=Replicate(), "
            "use_local_output=True)") in script
    bad = PLAN.replace("lm_head", "model.norm")
    with pytest.raises(Exception, match="colwise_gathered` is made for a Linear"):
        compile_plan(bad, "tiny-llama", 4)
