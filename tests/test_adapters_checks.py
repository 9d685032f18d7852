"""Adapters (LoRA, QLoRA) in the language and the compiler: the FLOAT value, the
`adapters` section, every refusal at its plan line (code, line, column), the plans that
must compile, the `Adapters` step and its JSON round trip, and `--emit python`.

Models: the tiny Llama (fp32: 2 layers, hidden 64, 4/2 heads of 16, MLP 128, vocab 256)
and a tied variant (`tie_word_embeddings = true`).
"""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest
import torch

from meshplan.cli.main import main
from meshplan.dsl import ast as syntax
from meshplan.dsl import check, format_plan, parse
from meshplan.dsl.errors import PlanError, PlanRejected
from meshplan.dsl.styles import STYLES, AdapterCall, AdapterLayout
from meshplan.planner import compile_plan
from meshplan.planner.emit import to_python
from meshplan.planner.graph import ModelGraph, build_graph
from meshplan.planner.program import Adapters, Parallelize, Program, Quantize

from .conftest import LLAMA_TP, PLANS, ROOT, assert_golden, tiny_llama_graph

TP_RULES = LLAMA_TP
FSDP = "fully_shard on dp_shard {\n  unit model.layers.*\n  root\n}\n"
TARGETS = ("  targets model.layers.*.self_attn.{q,k,v,o}_proj\n"
           "  targets model.layers.*.mlp.{gate,up,down}_proj\n")


def plan(adapters: str, mesh: str = "  dp_shard = auto", extra: str = "") -> str:
    """Line 1 header, 3–5 mesh (one or two dimensions), then `adapters {` and its body."""
    return f"plan p for LlamaForCausalLM\n\nmesh {{\n{mesh}\n}}\n\nadapters {{\n{adapters}}}\n\n{extra}"


def _tiny(tied: bool = False) -> ModelGraph:
    return tiny_llama_graph(tied=tied)


@pytest.fixture(scope="module")
def tiny() -> ModelGraph:
    return build_graph("tiny-llama")


def errors(text: str, graph: ModelGraph, world: int) -> list[PlanError]:
    with pytest.raises(PlanRejected) as info:
        compile_plan(text, graph, world)
    return list(info.value.errors)


def adapters_step(text: str, graph: ModelGraph, world: int) -> tuple[Program, Adapters]:
    program = compile_plan(text, graph, world).program
    steps = program.steps_of(Adapters)
    assert len(steps) == 1
    return program, steps[0]


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.split("\n"), start=1) if needle in line)


# ------------------------------------------------------------------ FLOAT


def test_float_values_parse_format_and_round_trip() -> None:
    text = "plan a for X\n\nparam d = 0.05\nparam e = 1.0e-20\nparam f = -16.50\nparam g = 3\n"
    tree = parse(text)
    values = [p.value for p in tree.params]
    assert [type(v) for v in values] == [syntax.Float, syntax.Float, syntax.Float, syntax.Int]
    assert [v.value for v in values] == [0.05, 1e-20, -16.5, 3]
    canonical = format_plan(tree)
    assert canonical == "plan a for X\n\nparam d = 0.05\nparam e = 1.0e-20\nparam f = -16.5\nparam g = 3\n"
    assert parse(canonical) == tree and format_plan(parse(canonical)) == canonical


def test_words_with_digits_are_still_words() -> None:
    tree = parse("plan a for X\n\nparam s = 1f1b\nparam n = 12\n")
    assert tree.params[0].value == syntax.Name(name="1f1b") and tree.params[1].value == syntax.Int(value=12)


def test_a_number_setting_takes_ints_and_floats_and_checks_its_range() -> None:
    ok = check(parse(plan("  rank = 8\n  alpha = 16\n  dropout = 0.1\n" + TARGETS), "a.plan"))
    assert ok.errors == [] and ok.spec is not None and ok.spec.adapters is not None
    assert (ok.spec.adapters.alpha, ok.spec.adapters.dropout) == (16.0, 0.1)
    bad = check(parse(plan("  rank = 8\n  alpha = 0\n  dropout = 1.0\n" + TARGETS), "a.plan")).errors
    assert [(e.code, e.span.line, e.span.column) for e in bad] == [("E303", 9, 11), ("E303", 10, 13)]
    assert "expected a number > 0, found 0" in bad[0].message
    assert "expected a number in [0, 1), found 1.0" in bad[1].message
    wrong = check(parse(plan("  rank = 8.5\n" + TARGETS), "a.plan")).errors
    assert [(e.code, e.span.line, e.span.column) for e in wrong] == [("E301", 8, 10)]
    assert "expected a positive integer, found `8.5`" in wrong[0].message


def test_a_float_param_takes_an_integer_override() -> None:
    text = "plan a for X\n\nparam d = 0.05\n\nmesh {\n  dp_shard = auto\n}\n\nadapters {\n  rank = 4\n" \
           "  dropout = d\n  targets lm_head\n}\n"
    result = check(parse(text), ["d=0"])
    assert result.errors == [] and result.spec is not None and result.spec.adapters is not None
    assert result.spec.adapters.dropout == 0.0
    assert [e.code for e in check(parse(text), ["d=x"]).errors] == ["E302"]


# ------------------------------------------------------------------ the section (model-free)


def test_defaults_and_spans() -> None:
    result = check(parse(plan("  rank = 8\n" + TARGETS), "a.plan"))
    assert result.spec is not None
    spec = result.spec.adapters
    assert spec is not None
    assert (spec.method, spec.rank, spec.alpha, spec.dropout, spec.dtype, spec.quantize) == \
        ("lora", 8, 8.0, 0.0, None, None)  # alpha: PEFT's default
    assert [t.text for t in spec.targets] == ["model.layers.*.self_attn.{q,k,v,o}_proj",
                                              "model.layers.*.mlp.{gate,up,down}_proj"]
    assert spec.setting_spans["rank"].line == 8


@pytest.mark.parametrize(("body", "code", "line", "column", "phrase"), [
    (TARGETS, "E412", 7, 1, "`adapters` needs `rank = …`"),
    ("  rank = 8\n", "E412", 7, 1, "`adapters` names no target modules"),
    ("  rank = 0\n" + TARGETS, "E303", 8, 10, "expected a positive integer, found 0"),
    ("  rank = 8\n  method = dora\n" + TARGETS, "E208", 9, 12, "`dora` is not one of `lora`"),
    ("  rank = 8\n  dtype = bf61\n" + TARGETS, "E204", 9, 11, "unknown dtype `bf61`"),
    ("  rank = 8\n  targets\n", "E412", 9, 3, "`targets` needs module patterns"),
    ("  rank = 8\n  targets lm_head\n  targets lm_head\n", "E404", 10, 11, "`lm_head` is already a target"),
    ("  rank = 8\n  targets lm_head\n  quantize { format = nf3 }\n", "E208", 10, 23, "`nf3` is not one of `nf4`"),
    ("  rank = 8\n  targets lm_head\n  quantize { storage = int8 }\n", "E204", 10, 24, "unknown storage dtype"),
    ("  rank = 8\n  targets lm_head\n  quantize { backend = torchao, storage = bf16 }\n", "E414", 10, 33,
     "torchao packs NF4 into uint8"),
])
def test_model_free_errors(body: str, code: str, line: int, column: int, phrase: str) -> None:
    found = check(parse(plan(body), "a.plan")).errors
    assert found, body
    first = found[0]
    assert (first.code, first.span.line, first.span.column) == (code, line, column), first
    assert phrase in first.message, first.message


def test_bitsandbytes_uint8_storage_under_fully_shard_is_refused() -> None:
    body = "  rank = 8\n  targets lm_head\n  quantize { backend = bitsandbytes }\n"
    found = check(parse(plan(body, extra=FSDP), "a.plan")).errors
    assert [(e.code, e.span.line, e.span.column) for e in found] == [("E414", 10, 3)]
    assert "loss of 0 or NaN" in found[0].message and "storage = bf16" in (found[0].hint or "")
    # Without FSDP nothing shards the packed bytes.
    assert check(parse(plan(body), "a.plan")).errors == []


# ------------------------------------------------------------------ the compiler


def test_adapters_alone_compile_to_the_first_step_in_model_order(tiny: ModelGraph) -> None:
    text = plan("  rank = 16\n  alpha = 32\n  dropout = 0.05\n"
                "  targets model.layers.*.mlp.{gate,up,down}_proj\n  targets model.layers.*.self_attn.{q,k,v,o}_proj\n",
                mesh="  dp_shard = 1")
    program, step = adapters_step(text, tiny, 1)
    assert program.steps[0] is step
    assert step.fqns[:4] == ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                             "model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.o_proj")
    assert len(step.fqns) == 14 and step.fqns[-1] == "model.layers.1.mlp.down_proj"
    assert (step.rank, step.alpha, step.dropout, step.dtype, step.quantize) == (16, 32.0, 0.05, None, None)
    assert step.scaling == 2.0 and step.span.line == 7


@pytest.mark.parametrize(("mesh", "world", "extra"), [
    ("  dp_shard = auto", 4, FSDP),
    ("  dp_replicate = 2\n  dp_shard = auto", 4, FSDP.replace("on dp_shard", "on (dp_replicate, dp_shard)")),
    ("  dp_shard = auto\n  tp = 2", 4, TP_RULES + "\n" + FSDP),
    ("  tp = 2", 2, TP_RULES),
], ids=["fsdp", "hsdp", "tp-sp-fsdp", "tp-sp"])
def test_correct_plans_compile(tiny: ModelGraph, mesh: str, world: int, extra: str) -> None:
    text = plan("  rank = 16\n  alpha = 32\n" + TARGETS, mesh=mesh, extra=extra)
    program, step = adapters_step(text, tiny, world)
    assert program.steps[0] is step and len(step.fqns) == 14
    if "tp" in mesh:
        assert program.steps_of(Parallelize)


def test_the_program_round_trips_through_json(tiny: ModelGraph) -> None:
    body = ("  rank = 4\n  alpha = 8.5\n  dropout = 0.1\n  dtype = fp32\n" + TARGETS
            + "  quantize { backend = torchao, compute = fp32, block_size = 16, scaler_block_size = 16 }\n")
    text = plan(body, extra=FSDP)
    program, step = adapters_step(text, tiny, 4)
    assert step.quantize == Quantize(format="nf4", backend="torchao", compute="fp32", storage="uint8",
                                     block_size=16, scaler_block_size=16)
    again = Program.from_json(program.to_json())
    assert again == program and again.steps[0] == step


def test_a_target_that_matches_nothing(tiny: ModelGraph) -> None:
    text = plan("  rank = 8\n  targets model.layers.*.attn.q_proj\n")
    [error] = errors(text, tiny, 1)
    assert (error.code, error.span.line, error.span.column) == ("E502", 9, 11)
    assert (error.hint or "").startswith("did you mean `model.layers.*.self_attn.q_proj`")


def test_two_targets_lines_on_one_module(tiny: ModelGraph) -> None:
    text = plan("  rank = 8\n  targets model.layers.*.mlp.down_proj\n  targets model.layers.1.mlp.down_proj\n")
    [error] = errors(text, tiny, 1)
    assert (error.code, error.span.line, error.span.column) == ("E503", 10, 11)


@pytest.mark.parametrize(("target", "phrase", "hint"), [
    ("model.layers.*.self_attn", "is LlamaAttention (attention): LoRA adapts Linear, Embedding and Conv1D",
     "`model.layers.*.self_attn.{q_proj,k_proj,v_proj,o_proj}`"),
    ("model.layers.*.mlp.*", "is SiLUActivation (activation)", "leave this one out"),
    ("model.norm", "is LlamaRMSNorm (norm)", "leave this one out"),
])
def test_a_module_lora_cannot_adapt(tiny: ModelGraph, target: str, phrase: str, hint: str) -> None:
    [error] = errors(plan(f"  rank = 8\n  targets {target}\n"), tiny, 1)
    assert (error.code, error.span.line, error.span.column) == ("E513", 9, 11)
    assert phrase in error.message, error.message
    assert hint in (error.hint or ""), error.hint


def test_an_embedding_can_carry_an_adapter_without_tensor_parallelism(tiny: ModelGraph) -> None:
    _, step = adapters_step(plan("  rank = 8\n  targets model.embed_tokens, lm_head\n", mesh="  dp_shard = 1"), tiny, 1)
    assert step.fqns == ("model.embed_tokens", "lm_head")


def test_adapters_on_a_tied_weight_are_a_warning() -> None:
    """An adapter on a tied head trains exactly (measured: broken/adapters_tied_lm_head in
    tests/plans/truth.json); only merging it would change the embedding too."""
    text = plan("  rank = 8\n  targets lm_head\n")
    compiled = compile_plan(text, _tiny(tied=True), 1)
    [warning] = [w for w in compiled.warnings if w.code == "W108"]
    assert (warning.span.line, warning.span.column) == (9, 11)
    assert "`lm_head.weight` is one tensor with `model.embed_tokens.weight` (tied weights)" in warning.message
    assert compiled.program.steps_of(Adapters)[0].fqns == ("lm_head",)


def test_a_style_without_an_adapter_layout(tiny: ModelGraph) -> None:
    text = plan("  rank = 8\n  targets model.embed_tokens\n" + TARGETS, mesh="  tp = 2", extra=TP_RULES)
    [error] = errors(text, tiny, 2)
    assert (error.code, error.span.line, error.span.column) == ("E513", 9, 11)
    assert "`model.embed_tokens` is an Embedding in `rowwise`, which has no adapter layout for it" in error.message
    assert error.related[0][0].line == line_of(text, "model.embed_tokens                      :")


def test_a_layout_that_shards_the_rank_needs_tp_to_divide_it(tiny: ModelGraph,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """No registered style shards the rank (PEFT's layouts shard the base's features);
    a record whose lora_A is colwise (its weight is (rank, in): dim 0 is the rank) must."""
    def sharded_rank(call: object) -> AdapterLayout:
        return AdapterLayout(a=AdapterCall("colwise", input="replicate", output="shard(-1)"),
                             b=AdapterCall("rowwise", input="shard(-1)", output="shard(-1)"))

    record = dataclasses.replace(STYLES["colwise"], adapter={"linear": sharded_rank})
    monkeypatch.setitem(STYLES, "colwise", record)  # type: ignore[index]
    text = plan("  rank = 3\n" + TARGETS, mesh="  tp = 2", extra=TP_RULES)
    found = errors(text, tiny, 2)
    assert [(e.code, e.span.line, e.span.column) for e in found] == [("E505", 8, 3)]
    assert "rank 3 of `model.layers.*.self_attn.q_proj`'s lora_A cannot be split 2 ways" in found[0].message
    _, step = adapters_step(text.replace("rank = 3", "rank = 4"), tiny, 2)
    assert step.rank == 4


def test_adapters_of_another_dtype_than_a_frozen_base_share_its_fsdp_unit(tiny: ModelGraph) -> None:
    """FSDP2 asks one dtype of a unit's trainable parameters only (torch 2.13
    `_init_mp_dtypes`), and only the adapters train: bf16 adapters beside the fp32 base,
    or fp32 adapters beside a bf16 NF4 base, in one unit without mixed precision, run and
    match one process (measured: the corpus' adapters_dtype_* cases)."""
    text = plan("  rank = 8\n  dtype = bf16\n" + TARGETS, extra=FSDP)
    adapters_step(text, tiny, 4)
    body = ("  rank = 8\n  dtype = fp32\n  targets model.layers.*.mlp.down_proj\n"
            "  quantize { compute = bf16, block_size = 16, scaler_block_size = 16 }\n")
    fsdp = "fully_shard on dp_shard {\n  unit model.layers.*.mlp\n  root\n}\n"
    _, step = adapters_step(plan(body, extra=fsdp), tiny, 4)
    assert step.quantize is not None and step.quantize.compute == "bf16" and step.dtype == "fp32"


@pytest.mark.parametrize(("quantize", "world", "line", "phrase"), [
    ("quantize { compute = fp32 }", 1, 10,
     "the weight of `model.layers.*.mlp.down_proj` cannot be cut into NF4 blocks: 64 × 128 = 8192 values; "
     "block_size × scaler_block_size = 64 × 256 = 16384"),
    ("quantize { compute = fp32, block_size = 16, scaler_block_size = 16 }", 3, 10,
     "cannot be sharded over `dp_shard` (3 ranks): its 64 rows cannot be split 3 ways"),
    ("quantize { compute = fp32, block_size = 64, scaler_block_size = 64 }", 4, 10,
     "each of 4 shards would not hold whole NF4 scaler blocks (64 × 128 = 8192 values"),
])
def test_nf4_blocks_must_split(tiny: ModelGraph, quantize: str, world: int, line: int, phrase: str) -> None:
    body = f"  rank = 8\n  dtype = fp32\n  targets model.layers.*.mlp.down_proj\n  {quantize}\n"
    text = plan(body, extra=FSDP)
    found = errors(text, tiny, world)
    assert [(e.code, e.span.line, e.span.column) for e in found] == [("E514", 11, 3)], found
    assert phrase in found[0].message, found[0].message
    assert found[0].related[0][0].line == line


def test_nf4_blocks_that_split_compile(tiny: ModelGraph) -> None:
    body = ("  rank = 8\n  dtype = fp32\n" + TARGETS
            + "  quantize { compute = fp32, block_size = 16, scaler_block_size = 16 }\n")
    _, step = adapters_step(plan(body, extra=FSDP), tiny, 4)
    assert step.quantize is not None and step.quantize.block_size == 16


def test_a_quantized_base_under_tensor_parallelism(tiny: ModelGraph) -> None:
    body = ("  rank = 8\n  dtype = fp32\n  targets model.layers.*.mlp.down_proj\n"
            "  quantize { compute = fp32, block_size = 16, scaler_block_size = 16 }\n")
    text = plan(body, mesh="  tp = 2", extra=TP_RULES)
    [error] = errors(text, tiny, 2)
    rule = line_of(text, "mlp.down_proj            :")
    assert (error.code, error.span.line, error.span.column) == ("E514", rule, 45)
    assert "NF4 bases shard over FSDP only" in error.message


def test_a_quantized_embedding(tiny: ModelGraph) -> None:
    body = "  rank = 8\n  dtype = fp32\n  targets model.embed_tokens\n  quantize { compute = fp32 }\n"
    [error] = errors(plan(body), tiny, 1)
    assert (error.code, error.span.line, error.span.column) == ("E514", 10, 11)
    assert "only Linear bases are held in NF4" in error.message


def test_bitsandbytes_storage_and_backend(tiny: ModelGraph) -> None:
    body = ("  rank = 8\n  dtype = fp32\n" + TARGETS
            + "  quantize { backend = bitsandbytes, compute = fp32, storage = bf16, block_size = 16, "
              "scaler_block_size = 16 }\n")
    found = errors(plan(body, extra=FSDP), tiny, 4)
    assert [(e.code, e.span.line, e.span.column) for e in found] == [("E511", 12, 14), ("E514", 12, 54)]
    assert "bitsandbytes stores the 4-bit base in bf16, but the model's parameters are fp32" in found[1].message
    # The runtime holds 4-bit bases with torchao only: bitsandbytes is refused however stored.
    found = errors(plan(body.replace("storage = bf16", "storage = fp32"), extra=FSDP), tiny, 4)
    assert [e.code for e in found] == ["E511"] and "torchao only" in found[0].message


# ------------------------------------------------------------------ shipped plans, CLI, script


def test_shipped_adapter_plans_compile(tiny: ModelGraph) -> None:
    lora = compile_plan(PLANS / "llama_lora.plan", tiny, 4, ["tp=2"]).program
    assert lora.steps[0].kind == "adapters" and lora.steps_of(Parallelize)
    # The tiny model's projections are smaller than one NF4 scaler block of the defaults
    # (64 × 256 values); Llama-3.2-1B's split into whole blocks over 8 ranks.
    found = errors((PLANS / "llama_qlora.plan").read_text(encoding="utf-8"), tiny, 4)
    assert {e.code for e in found} == {"E514"}
    qlora = compile_plan(PLANS / "llama_qlora.plan", "llama-3.2-1b", 8).program
    step = qlora.steps[0]
    assert isinstance(step, Adapters) and step.quantize == Quantize() and len(step.fqns) == 16 * 7


def test_a_rendered_error_golden(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("lora.plan").write_text(plan("  rank = 8\n  targets model.layers.*.self_attn\n"), encoding="utf-8")
    code = main(["compile", "lora.plan", "--model", "tiny-llama", "--world-size", "1", "--no-dry-run"])
    _, err = capsys.readouterr()
    assert code == 1
    assert_golden("compile/adapters_not_adaptable.stderr.txt", err)


def test_emit_python_puts_styles_on_base_layer_and_adapters(tiny: ModelGraph) -> None:
    text = plan("  rank = 16\n  alpha = 32\n  dtype = fp32\n" + TARGETS, mesh="  dp_shard = auto\n  tp = 2",
                extra=TP_RULES + "\n" + FSDP)
    source = to_python(compile_plan(text, tiny, 4).program)
    compile(source, "emitted.py", "exec")
    assert "inject_adapter_in_model(LoraConfig(target_modules=['model.layers.0.self_attn.q_proj'" in source
    assert "r=16, lora_alpha=32.0, lora_dropout=0.0, bias=\"none\"" in source
    assert "_param.data = _param.data.to(torch.float32)" in source
    assert ("'self_attn.q_proj.base_layer': ColwiseParallel(input_layouts=Replicate(), "
            "output_layouts=Shard(-1), use_local_output=True)") in source
    assert "'self_attn.q_proj.lora_A.default': ReplicateParallel(" in source
    assert "'self_attn.o_proj.lora_A.default': RowwiseParallel(input_layouts=Shard(-1), output_layouts=Shard(1)" \
        in source
    assert "'self_attn': PrepareModuleInput(" in source  # on the block, untouched
    assert source.index("inject_adapter_in_model") < source.index("parallelize_module(_module(")
    # SequenceParallel makes the norms' parameters trainable again: each Parallelize gives
    # every parameter its own flag back, as the runtime does.
    restore = "_param.requires_grad_(_trainable[_name])"
    assert source.count(restore) == len(compile_plan(text, tiny, 4).program.steps_of(Parallelize))
    assert source.rindex(restore) < source.index("fully_shard(")


def test_the_emitted_script_keeps_the_base_frozen_under_sequence_parallelism() -> None:
    """The script's own lines on a real (1-rank gloo) mesh: a frozen norm under
    SequenceParallel stays frozen, the adapters stay trainable."""
    import os
    import subprocess
    import sys

    text = plan("  rank = 4\n" + TARGETS, mesh="  tp = 1", extra=TP_RULES)
    program = compile_plan(text, "tiny-llama", 1, []).program
    assert not program.steps_of(Parallelize)  # tp = 1 lowers to nothing: build the step by hand
    from meshplan.planner.program import MeshLayout, StyleCall

    sp = Parallelize(fqn="", mesh_dim="tp", plan=(("model.norm", StyleCall(style="sequence_parallel")),
                                                  ("model.layers.0.self_attn.q_proj", StyleCall(style="colwise"))))
    program = dataclasses.replace(program, mesh=MeshLayout(names=("tp",), shape=(1,)),
                                  steps=(*program.steps_of(Adapters), sp))
    script = to_python(program) + textwrap.dedent("""
        import torch, torch.distributed as dist
        from meshplan.planner.models import resolve_model
        dist.init_process_group("gloo", rank=0, world_size=1)
        src = resolve_model("tiny-llama")
        model = src.model_class(src.config)
        apply(model, build_mesh("cpu"))
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        assert not flags["model.norm.weight"], flags
        assert flags["model.layers.0.self_attn.q_proj.lora_A.default.weight"]
        assert not flags["model.layers.0.self_attn.q_proj.base_layer.weight"]
        print("frozen", sum(not f for f in flags.values()), "trainable", sum(flags.values()))
        dist.destroy_process_group()
    """)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29561"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "trainable 28" in out.stdout


def test_emit_python_refuses_a_quantized_base_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    body = ("  rank = 8\n  dtype = fp32\n" + TARGETS
            + "  quantize { compute = fp32, block_size = 16, scaler_block_size = 16 }\n")
    Path("q.plan").write_text(plan(body, extra=FSDP), encoding="utf-8")
    code = main(["compile", "q.plan", "--model", "tiny-llama", "--world-size", "4", "--no-dry-run",
                 "--emit", "python", "-o", "q.py"])
    _, err = capsys.readouterr()
    assert code == 2 and "cannot write a quantized (QLoRA) base" in err, err
    assert not Path("q.py").exists()


def test_plan_check_and_fmt_accept_the_shipped_adapter_plans(capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    files = ["plans/llama_lora.plan", "plans/llama_qlora.plan"]
    assert main(["check", *files]) == 0
    assert main(["fmt", "--check", *files]) == 0
    capsys.readouterr()
    text = textwrap.dedent((PLANS / "llama_lora.plan").read_text(encoding="utf-8"))
    assert format_plan(parse(text)) == text


@pytest.mark.parametrize(("out", "inp", "block", "scaler", "shards"), [
    (64, 256, 64, 256, 1), (64, 256, 64, 256, 4), (128, 512, 64, 256, 4), (64, 128, 64, 256, 1),
    (64, 128, 16, 16, 3), (64, 128, 64, 64, 4), (64, 128, 64, 64, 2), (32, 64, 16, 16, 4),
    (96, 64, 32, 32, 3), (96, 64, 32, 32, 6), (12, 1024, 16, 16, 8),
])
def test_the_nf4_rule_is_torchaos(out: int, inp: int, block: int, scaler: int, shards: int) -> None:
    """The compiler refuses exactly the weights torchao cannot quantise, or split along
    their rows into `shards` chunks as FSDP2 does (`torch.chunk` on the NF4 tensor)."""
    from meshplan.planner.passes.adapters import nf4_problem

    nf4 = pytest.importorskip("torchao.quantization.quantize_.workflows.nf4.nf4_tensor")
    weight = torch.randn(out, inp, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    try:
        quantized = nf4.to_nf4(weight, block, scaler)
        chunks = torch.chunk(quantized, shards, dim=0)
        works = len(chunks) == shards and all(c.shape[0] == out // shards for c in chunks)
    except AssertionError:
        works = False
    assert (nf4_problem(out, inp, block, scaler, shards) is None) == works
