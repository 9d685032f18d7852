"""`plan import hf`: transformers' own TP plans written as meshplan plans."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from torch import nn

from meshplan.cli.main import main
from meshplan.dsl.errors import PlanRejected
from meshplan.planner.compile import compile_plan
from meshplan.planner.hf_import import STYLES, UNSUPPORTED, HfImportError, hf_source, import_hf
from meshplan.planner.models import build_meta_model


def _import(spec: str) -> str:
    return import_hf(build_meta_model(hf_source(spec))).text


def test_llama_plan_is_transformers_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "llama_hf.plan"
    assert main(["import", "hf", "tiny-llama", "-o", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert "plan llama_hf for LlamaForCausalLM" in text
    assert "model.layers.*.self_attn.q_proj : colwise " in text
    assert "lm_head                         : colwise(output = replicate)" in text
    assert "model.embed_tokens              : rowwise(input = replicate)" in text
    assert "unit model.layers.*" in text and "root" in text
    # The written plan is canonical and passes the model-free checks.
    assert main(["fmt", "--check", str(out)]) == 0
    assert main(["check", str(out)]) == 0
    capsys.readouterr()
    # And it compiles for the model at 4 ranks (dp 2 × tp 2).
    program = compile_plan(out, "tiny-llama", 4).program
    assert program.mesh.size("tp") == 2 and program.mesh.size("dp_shard") == 2


def test_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["import", "hf", "qwen3"]) == 0  # a model_type: its defaults, made tiny
    text = capsys.readouterr().out
    assert text.startswith("# Qwen3ForCausalLM")
    assert "model.layers.*.self_attn.q_norm : replicate(input = shard(2), output = shard(2))" in text


def test_fused_and_gathered_styles() -> None:
    phi3 = _import("tiny-phi3")
    assert "model.layers.*.self_attn.qkv_proj : colwise(output = replicate)" in phi3
    assert "model.layers.*.self_attn.o_proj   : rowwise(input = replicate)" in phi3


def test_unsupported_style_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["import", "hf", "longcat_flash"]) == 1  # identity experts inside tensor-parallel experts
    err = capsys.readouterr().err
    assert "longcat_flash" in err and "identity_expert" in err and "no meshplan equivalent yet" in err


def test_shared_experts_summed_over_tp_are_tensor_parallel_experts() -> None:
    """Inkling's shared experts: 3-D gate_proj / up_proj cut colwise, down_proj rowwise and
    `all_reduce` on the module: every expert split on its intermediate features, the output
    summed, which is `tp_experts(parts = 1)` (gate and up are apart)."""
    text = _import("inkling_text")
    assert re.search(r"model\.layers\.\*\.mlp\.shared_experts : tp_experts\(parts = 1\) +# transformers: all_reduce "
                     r"\(gate_proj colwise, up_proj colwise, down_proj rowwise\)", text)
    assert "shared_experts.gate_proj" not in text  # the parameter rules are the module rule


def test_tensor_parallel_experts_are_one_rule() -> None:
    """`moe_tp_experts` and its parameters' rules (gate_up_proj packed_colwise, down_proj
    rowwise) become `tp_experts(parts = 2)` on the experts module; it compiles at 4 ranks."""
    imported = import_hf(build_meta_model(hf_source("tiny-mixtral")))
    assert "model.layers.*.mlp.experts      : tp_experts(parts = 2)" in imported.text
    assert "# transformers: moe_tp_experts (gate_up_proj packed_colwise, down_proj rowwise)" in imported.text
    assert not [r for r in imported.rules if "gate_up_proj" in r[0] or "down_proj" in r[0]]
    assert compile_plan(imported.text, "tiny-mixtral", 4).program.mesh.size("tp") == 2


def test_experts_cut_as_one_block_are_imported_as_written_and_rejected() -> None:
    """Inkling-2 cuts its concatenated gate_up_proj with plain `colwise`: rank 0 gets the
    gate rows, rank 1 the up rows (measured wrong). The importer writes what transformers
    does; the compiler rejects it, saying why and what fixes it."""
    from meshplan.dsl.errors import PlanRejected

    source = hf_source("inkling2_text")
    model = build_meta_model(source)
    text = import_hf(model).text
    assert "model.layers.*.mlp.experts : tp_experts(parts = 1)" in text
    with pytest.raises(PlanRejected) as info:
        compile_plan(text, model, 4)
    errors = [e for e in info.value.errors if e.code == "E504"]
    assert errors and "gate and up projections" in errors[0].message
    assert "parts = 2" in (errors[0].hint or "")
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "tp_experts" in t)
    assert errors[0].span.line == line


def test_experts_without_a_gate_are_one_part() -> None:
    # Nemotron-H's experts have up_proj [E, I, H] only (`colwise`): nothing to cut part by part.
    assert "model.layers.*.mixer.experts : tp_experts(parts = 1)" in _import("nemotron_h")


@pytest.mark.parametrize(("family", "experts"), [("aria_text", "model.layers.*.mlp.experts"),
                                                 ("llama4_text", "model.layers.*.feed_forward.experts")])
def test_transposed_experts_are_tensor_parallel_experts(family: str, experts: str) -> None:
    """Experts stored transposed ([E, H, 2I] / [E, I, H]: Aria's flag, Llama-4's shapes) cut
    `packed_rowwise` / `colwise` by transformers: gate and up each split on I."""
    text = _import(family)
    assert re.search(re.escape(experts) + r" +: tp_experts\(parts = 2\) +# transformers: moe_tp_experts "
                     r"\(gate_up_proj packed_rowwise, down_proj colwise\)", text)


def test_deepseek_v2_latent_attention_and_tensor_parallel_experts() -> None:
    text = _import("deepseek_v2")
    assert "mla_kv_a(" in text and "model.layers.*.mlp.experts                  : tp_experts(parts = 2)" in text


def test_mla_kv_a_sums_the_shared_rotary_part() -> None:
    """Latent attention's kv_a projection: its rotary part's width is the config's
    qk_rope_head_dim (8 in tiny configs), and the plan compiles with the heads split
    (MiniCPM3: latent attention without experts; measured exact, tests/test_hf_audit.py)."""
    source = hf_source("minicpm3")
    model = build_meta_model(source)
    assert model.config.qk_rope_head_dim == 8 and model.config.head_dim == 8  # the tiny widths follow
    text = import_hf(model).text
    assert re.search(r"self_attn\.kv_a_proj_with_mqa : mla_kv_a\(rope = 8\) +# transformers: mla_kv_a_proj", text)
    program = compile_plan(text, source, 4).program
    calls = [c for step in program.steps for f, c in getattr(step, "plan", ()) if f.endswith("kv_a_proj_with_mqa")]
    assert len(calls) == 2 and {c.style for c in calls} == {"mla_kv_a"} and {c.rope for c in calls} == {8}
    # Without the rule the rotary key's gradient stays a partial sum per rank (measured
    # wrong): refused, naming the projection.
    without = "\n".join(line for line in text.splitlines() if "kv_a_proj_with_mqa" not in line)
    with pytest.raises(PlanRejected) as rejected:
        compile_plan(without, source, 4)
    assert any(d.code == "E506" and "(`model.layers.*.self_attn.kv_a_proj_with_mqa`) get wrong gradients"
               in d.message for d in rejected.value.errors)


@pytest.mark.parametrize(("family", "param"), [("granite_swa", "sinks"), ("beam", "gate_bias")])
def test_per_head_parameters_are_head_params(family: str, param: str) -> None:
    """`local_params` on the attention module and `colwise` on its own per-head parameter
    (Granite-SWA's sinks, Beam's gate bias) become `head_params` on the module."""
    text = _import(family)
    assert re.search(r"model\.layers\.\*\.self_attn +: head_params +# transformers: local_params "
                     rf"\({param} colwise\)", text)
    assert f"self_attn.{param}" not in text


def test_a_parameter_rule_without_its_owner_rule_is_named() -> None:
    """A rule on a parameter whose module has no `local_params` (or experts) rule."""
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(8)
            self.tp_plan = {"norm.weight": "colwise"}

    with pytest.raises(HfImportError, match=r"norm\.weight: colwise` shards a parameter, not a module"):
        import_hf(Block())


def test_unknown_model_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["import", "hf", "no-such-model"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err


def test_every_transformers_style_is_mapped_or_named() -> None:
    """Every style transformers registers is either written or refused by name."""
    import transformers.distributed.expert_parallel
    import transformers.distributed.tensor_parallel  # noqa: F401 (registers the styles)
    from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES

    registered = set(ALL_PARALLEL_STYLES.keys())
    assert registered, "transformers registers no styles"
    handled = set(STYLES) | set(UNSUPPORTED) | {"replicate"}
    assert registered <= handled, registered - handled


def test_a_local_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from meshplan.planner.models import load_preset

    (tmp_path / "config.json").write_text(json.dumps(load_preset("tiny-qwen2")), encoding="utf-8")
    assert main(["import", "hf", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "plan qwen2_hf for Qwen2ForCausalLM" in text
    assert "model.layers.*.mlp.down_proj    : rowwise" in text
