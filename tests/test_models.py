"""Model presets, spec resolution and meta-device building (meshplan.planner.models)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from meshplan.planner.models import (
    ModelSource,
    ModelSpecError,
    build_meta_model,
    list_presets,
    load_preset,
    reduced_config,
    resolve_model,
)

REAL = {
    # preset: published parameter count (unique tensors: tied embeddings counted once)
    "llama-3.2-1b": 1.236e9,
    "llama-3.1-8b": 8.03e9,
    "llama-3.1-70b": 70.6e9,
    "llama-3.1-405b": 405.9e9,
    "mistral-7b": 7.25e9,
    "qwen2.5-7b": 7.62e9,
    "qwen2.5-72b": 72.7e9,
    "qwen3-8b": 8.19e9,
    "gemma-2-9b": 9.24e9,
    "phi-3-mini": 3.82e9,
    "gpt2": 124.4e6,
    "mixtral-8x7b": 46.7e9,
    "qwen3-30b-a3b": 30.5e9,
    "deepseek-v3": 671e9,
}
TINY = [
    "tiny-llama",
    "tiny-mistral",
    "tiny-qwen2",
    "tiny-qwen3",
    "tiny-gemma2",
    "tiny-phi3",
    "tiny-gpt2",
    "tiny-mixtral",
    "tiny-qwen3-moe",
    "tiny-deepseek-v3",
]


def _error(spec: object) -> str:
    with pytest.raises(ModelSpecError) as info:
        resolve_model(spec)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    assert isinstance(info.value, ValueError)
    return message


def test_presets_are_listed() -> None:
    assert list_presets() == sorted([*REAL, *TINY])


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_preset_builds_on_meta_with_published_size(name: str) -> None:
    raw = load_preset(name)
    assert raw["_source"].startswith("https://huggingface.co/")
    assert raw["_source"].endswith("/config.json")
    assert raw["_description"]
    model = build_meta_model(name)
    params = list(model.parameters())
    assert all(p.is_meta for p in params)  # nothing allocated, even for 405B
    count = sum(p.numel() for p in params)
    assert count == pytest.approx(REAL[name], rel=0.01)


@pytest.mark.parametrize("name", TINY)
def test_tiny_preset_builds(name: str) -> None:
    src = resolve_model(name)
    assert src.kind == "preset" and src.origin == "meshplan test model"
    model = build_meta_model(src)
    assert all(p.is_meta for p in model.parameters())
    config = src.config
    # The MoE stand-ins are narrower: their experts multiply the width.
    assert config.hidden_size == (32 if name in ("tiny-qwen3-moe", "tiny-deepseek-v3") else 64)
    assert config.vocab_size == 256
    assert config.num_attention_heads == 4
    # GQA 4/2 everywhere, except GPT-2 (no GQA), Phi-3, whose fused qkv_proj has equal
    # parts as in Phi-3-mini (32/32) so that `colwise(parts = 3)` applies, and DeepSeek-V3,
    # whose latent attention has as many key/value heads as heads (as the published model).
    expected_kv = 4 if name in ("tiny-phi3", "tiny-deepseek-v3") else 2
    assert getattr(config, "num_key_value_heads", expected_kv) == expected_kv or name == "tiny-gpt2"


def test_published_values() -> None:
    c = resolve_model("llama-3.1-8b").config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (4096, 14336, 32)
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (32, 8, 128256)
    rope = c.rope_parameters
    assert rope["rope_theta"] == 500000.0 and rope["rope_type"] == "llama3"
    assert (rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]) == (8.0, 1.0, 4.0)
    assert rope["original_max_position_embeddings"] == 8192
    assert resolve_model("llama-3.2-1b").config.tie_word_embeddings is True
    g = resolve_model("gemma-2-9b").config
    assert (g.head_dim, g.query_pre_attn_scalar, g.sliding_window) == (256, 256, 4096)
    assert g.layer_types[:2] == ["sliding_attention", "full_attention"]
    m = resolve_model("mixtral-8x7b").config
    assert (m.num_local_experts, m.num_experts_per_tok) == (8, 2)
    assert resolve_model("Llama-3.1-8B").name == "llama-3.1-8b"  # case-insensitive


def test_fewer_layers_keep_per_layer_settings() -> None:
    src = resolve_model("llama-3.1-70b")
    small = build_meta_model(src, num_layers=2)
    assert len(small.model.layers) == 2
    assert src.config.num_hidden_layers == 80  # the source config is never mutated
    gemma = resolve_model("tiny-gemma2").config
    cut = reduced_config(gemma, [1, 2])
    assert cut.num_hidden_layers == 2
    assert cut.layer_types == ["full_attention", "sliding_attention"]
    assert gemma.layer_types == ["sliding_attention", "full_attention"] * 2
    model = build_meta_model("tiny-gemma2", layers=[1])
    assert model.model.layers[0].self_attn.sliding_window is None  # layer 1 is global


def test_unknown_preset_suggests_nearest() -> None:
    message = _error("llama-3-8b")
    assert message.startswith("unknown model 'llama-3-8b'")
    assert "did you mean" in message and "llama-3.1-8b" in message
    assert "presets are" in _error("zzzz")


def test_directory(tmp_path: Path) -> None:
    values = dict(load_preset("tiny-llama"))
    (tmp_path / "config.json").write_text(json.dumps(values))
    (tmp_path / "model.safetensors").write_bytes(b"")
    src = resolve_model(str(tmp_path))
    assert src.kind == "directory" and src.architecture == "LlamaForCausalLM"
    assert [p.name for p in src.weights] == ["model.safetensors"]
    assert resolve_model(str(tmp_path / "config.json")).kind == "directory"
    assert sum(p.numel() for p in build_meta_model(src).parameters()) == 106816


def test_directory_errors(tmp_path: Path) -> None:
    assert "has no config.json" in _error(str(tmp_path))
    assert "does not exist" in _error(str(tmp_path / "missing"))
    config = tmp_path / "config.json"
    config.write_text('{"model_type": "llama",\n "hidden_size": 64,,}')
    message = _error(str(tmp_path))
    assert "is not valid JSON" in message and "line 2" in message
    config.write_text("[1, 2]")
    assert "must hold a JSON object" in _error(str(tmp_path))
    config.write_text(json.dumps({"hidden_size": 64}))
    assert "has no model_type" in _error(str(tmp_path))
    config.write_text(json.dumps({"model_type": "nosuchmodel"}))
    assert "unknown model_type 'nosuchmodel'" in _error(str(tmp_path))
    config.write_text(json.dumps({"model_type": "llama", "architectures": ["FooForCausalLM"]}))
    assert "unknown architecture 'FooForCausalLM'" in _error(str(tmp_path))
    config.write_text(
        json.dumps({"model_type": "llama", "hidden_size": 65, "num_attention_heads": 4})
    )
    message = _error(str(tmp_path))
    assert "transformers rejects the config" in message and "65" in message


@pytest.fixture
def factories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "mp_test_factories.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            def good():
                return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))

            def not_a_module():
                return 42

            def boom():
                raise RuntimeError("boom")
            """
        )
    )
    (tmp_path / "mp_test_broken.py").write_text("raise ImportError('missing dependency xyz')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "mp_test_factories"


def test_factory(factories: str) -> None:
    src = resolve_model(f"{factories}:good")
    assert src.kind == "factory" and src.module is not None
    assert all(p.is_meta for p in src.module.parameters())  # called under the meta device
    assert build_meta_model(src) is src.module
    with pytest.raises(ModelSpecError, match="fewer layers"):
        build_meta_model(src, num_layers=1)


def test_factory_errors(factories: str) -> None:
    message = _error("mp_no_such_module:make")
    assert "cannot import 'mp_no_such_module'" in message and "ModuleNotFoundError" in message
    assert "missing dependency xyz" in _error("mp_test_broken:make")
    assert "has no attribute 'nope'" in _error(f"{factories}:nope")
    assert "returned int, not an nn.Module" in _error(f"{factories}:not_a_module")
    assert "raised RuntimeError: boom" in _error(f"{factories}:boom")
    assert "must look like package.module:function" in _error("a b:c")


def test_module_object_and_bad_types() -> None:
    module = nn.Linear(4, 4)
    src = resolve_model(module)
    assert isinstance(src, ModelSource) and src.kind == "module" and src.module is module
    assert resolve_model(src) is src
    assert "not int" in _error(3)
    assert "empty model spec" in _error("  ")
    with torch.device("meta"):
        hf = build_meta_model("tiny-qwen3")
    src = resolve_model(hf)
    assert src.can_reduce and src.architecture == "Qwen3ForCausalLM"
    assert len(build_meta_model(src, num_layers=1).model.layers) == 1
