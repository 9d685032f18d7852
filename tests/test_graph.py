"""The traced model graph (meshplan.planner.graph): facts, stacks, dataflow, boundaries."""

from __future__ import annotations

import time
from functools import cache

import pytest
import torch
from torch import nn

from meshplan.planner.graph import GraphError, ModelGraph, Ref, build_graph
from meshplan.planner.models import resolve_model

TINY = [
    "tiny-llama",
    "tiny-mistral",
    "tiny-qwen2",
    "tiny-qwen3",
    "tiny-gemma2",
    "tiny-phi3",
    "tiny-gpt2",
    "tiny-mixtral",
]


@cache
def graph(name: str) -> ModelGraph:
    return build_graph(name)


def consumers(g: ModelGraph, node: str) -> list[tuple[str, str, str]]:
    """(node, op, module) of each consumer of `node`."""
    return [
        (s, g.dataflow.nodes[s]["op"], g.dataflow.nodes[s]["module"])
        for s in g.dataflow.successors(node)
    ]


@pytest.mark.parametrize("name", TINY)
def test_every_family_traces_to_aten(name: str) -> None:
    g = graph(name)
    assert g.traced and g.trace_error is None and g.reduced
    ops = {attrs["op"] for _, attrs in g.ops()}
    assert {o for o in ops if not o.startswith("aten.")} <= {"placeholder", "output", "getitem"}
    assert not any(o.startswith("aten._assert") for o in ops)
    # every weight the trace reads is named by its fqn in the full model
    weights = [n for n, a in g.ops() if a.get("kind") in ("parameter", "buffer")]
    assert weights and all(n in g.parameters or "." in n for n in weights)


def test_module_facts_tiny_llama() -> None:
    g = graph("tiny-llama")
    attn = g.module("model.layers.1.self_attn")
    assert attn.kind == "attention" and attn.type == "LlamaAttention"
    assert (attn.attrs["num_heads"], attn.attrs["num_kv_heads"], attn.attrs["head_dim"]) == (
        4,
        2,
        16,
    )
    k = g.module("model.layers.1.self_attn.k_proj")
    assert k.kind == "linear" and k.params == {"weight": (32, 64)}
    assert (k.attrs["in_features"], k.attrs["out_features"], k.attrs["bias"]) == (64, 32, False)
    emb = g.module("model.embed_tokens")
    assert emb.kind == "embedding" and emb.attrs["num_embeddings"] == 256
    norm = g.module("model.norm")
    assert norm.kind == "norm" and norm.attrs["normalized_shape"] == (64,)
    assert g.module("model.layers.0.mlp").attrs["intermediate_size"] == 128
    assert g.module("model.layers").kind == "stack"
    assert g.module("model.layers.1").kind == "decoder_layer"
    assert g.fqns()[:3] == ["model", "model.embed_tokens", "model.layers"]
    assert "" in g.modules and "" not in g.fqns()
    assert g.num_parameters() == 106816 and g.tied == ()


def test_fused_and_transposed_projections() -> None:
    phi = graph("tiny-phi3")
    qkv = phi.module("model.layers.0.self_attn.qkv_proj")
    assert qkv.attrs["out_features"] == (4 + 4 + 4) * 16
    assert phi.module("model.layers.0.mlp.gate_up_proj").attrs["out_features"] == 2 * 128
    gpt2 = graph("tiny-gpt2")
    c_attn = gpt2.module("transformer.h.1.attn.c_attn")
    assert c_attn.kind == "conv1d" and c_attn.params["weight"] == (64, 192)  # (nx, nf)
    assert (c_attn.attrs["nx"], c_attn.attrs["nf"]) == (64, 192)
    attn = gpt2.module("transformer.h.1.attn")
    assert (attn.attrs["num_heads"], attn.attrs["num_kv_heads"], attn.attrs["head_dim"]) == (
        4,
        4,
        16,
    )
    assert gpt2.module("transformer.h.0.mlp").attrs["intermediate_size"] == 128


def test_mixtral_experts_are_fused_3d() -> None:
    g = graph("tiny-mixtral")
    moe = g.module("model.layers.1.mlp")
    assert moe.kind == "moe" and (moe.attrs["num_experts"], moe.attrs["top_k"]) == (4, 2)
    assert g.module("model.layers.1.mlp.gate").kind == "router"
    experts = g.module("model.layers.1.mlp.experts")
    assert experts.kind == "experts" and experts.attrs["fused"]
    assert experts.params == {"gate_up_proj": (4, 256, 64), "down_proj": (4, 64, 128)}
    call = g.calls("model.layers.1.mlp.experts")
    assert [a.name for a in call.inputs] == ["hidden_states", "top_k_index", "top_k_weights"]
    assert call.params == (
        "model.layers.0.mlp.experts.gate_up_proj",
        "model.layers.0.mlp.experts.down_proj",
    )


def test_tied_groups() -> None:
    assert graph("tiny-gpt2").tied == (("transformer.wte.weight", "lm_head.weight"),)
    g = build_graph("llama-3.2-1b")
    assert g.tied == (("model.embed_tokens.weight", "lm_head.weight"),)
    assert g.num_parameters() == pytest.approx(1.236e9, rel=0.01)
    # the trace reads the shared tensor once, under one fqn
    assert "lm_head.weight" not in g.dataflow and "model.embed_tokens.weight" in g.dataflow


def test_gemma2_kinds_and_representatives() -> None:
    g = graph("tiny-gemma2")
    (stack,) = g.stacks
    assert (stack.fqn, stack.block_type, stack.length) == ("model.layers", "Gemma2DecoderLayer", 4)
    assert [(k.name, k.layers, k.representative) for k in stack.kinds] == [
        ("sliding_attention", (0, 2), 0),
        ("full_attention", (1, 3), 1),
    ]
    assert g.traced_layers == {"model.layers": (0, 1)}
    assert g.representative("model.layers.3.self_attn") == "model.layers.1.self_attn"
    assert (
        g.representative("model.layers.2.mlp.down_proj.weight")
        == "model.layers.0.mlp.down_proj.weight"
    )
    assert g.representative("model.norm") == "model.norm"
    assert g.module("model.layers.2").attrs["block_kind"] == "sliding_attention"
    traced = {a["module"] for _, a in g.ops()}
    assert "model.layers.1.self_attn" in traced and not any(
        m.startswith("model.layers.2") for m in traced
    )
    # the two kinds get different masks: sliding (window 8) and global
    sliding = g.calls("model.layers.2.self_attn").input("attention_mask")
    full = g.calls("model.layers.3.self_attn").input("attention_mask")
    assert sliding != full
    with pytest.raises(KeyError):
        g.representative("model.layers.9")


def test_attention_boundary_and_residual_add() -> None:
    g = graph("tiny-llama")
    call = g.calls("model.layers.1.self_attn")
    assert call.fqn == "model.layers.0.self_attn" and call.count == 1
    names = [a.name for a in call.inputs]
    assert names[0] == "hidden_states" and "attention_mask" in names
    assert {"position_embeddings[0]", "position_embeddings[1]"} <= set(names)
    hidden = call.input("hidden_states")
    assert g.dataflow.nodes[hidden]["module"] == "model.layers.0.input_layernorm"
    assert g.dataflow.nodes[hidden]["shape"] == (g.batch, g.seq_len, 64)
    assert call.params == tuple(f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkvo")
    (out,) = [a for a in call.outputs if a.name == "output[0]"]
    adds = [c for c in consumers(g, out.node) if c[1] == "aten.add.Tensor"]
    assert adds and adds[0][2] == "model.layers.0"  # the residual add, in the decoder layer
    residual = g.dataflow.nodes[adds[0][0]]
    assert residual["args"][1] == Ref(out.node) or residual["args"][0] == Ref(out.node)
    assert g.dataflow.edges[out.node, adds[0][0]]["positions"] in (((0,),), ((1,),))


def test_decoder_layer_boundary() -> None:
    g = graph("tiny-llama")
    call = g.calls("model.layers.1")
    hidden = call.input("hidden_states")
    assert g.dataflow.nodes[hidden]["op"] == "aten.embedding.default"
    used = consumers(g, hidden)
    assert any(op == "aten.add.Tensor" and mod == "model.layers.0" for _, op, mod in used)
    assert any(mod == "model.layers.0.input_layernorm" for _, _, mod in used)
    (out,) = call.outputs
    assert out.name == "output" and g.dataflow.nodes[out.node]["op"] == "aten.add.Tensor"
    assert {m for _, _, m in consumers(g, out.node)} == {"model.norm"}
    assert len(call.params) == 9 and set(call.nodes) <= set(g.dataflow)
    node = g.dataflow.nodes[call.nodes[-1]]
    assert node["module_stack"][:2] == ("model", "model.layers.0")


def test_big_model_costs_what_a_small_one_does() -> None:
    start = time.perf_counter()
    tiny = build_graph("tiny-llama")
    tiny_s = time.perf_counter() - start
    start = time.perf_counter()
    big = build_graph("llama-3.1-70b")
    big_s = time.perf_counter() - start
    print(f"graph build: tiny-llama {tiny_s:.2f}s, llama-3.1-70b {big_s:.2f}s")
    # structural check: one decoder layer traced for 80 (and for tiny-llama's 2)
    assert big.traced_layers == {"model.layers": (0,)}
    assert len(big.dataflow) == len(tiny.dataflow)
    assert len([f for f in big.fqns() if f.startswith("model.layers.")]) == 80 * 13
    assert big.num_parameters() == pytest.approx(70.6e9, rel=0.01)
    assert big_s < 30
    full = build_graph("tiny-llama", reduce=False)
    assert not full.reduced and len(full.dataflow) > len(tiny.dataflow)
    assert "model.layers.1.mlp.down_proj.weight" in full.dataflow
    assert full.representative("model.layers.1.mlp") == "model.layers.0.mlp"


class Tagger(nn.Module):
    """A small user model: embedding -> linear -> norm, with a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(32, 8)
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids)
        return self.norm(h + self.proj(h))


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: export cannot trace it
            return self.proj(x.float().unsqueeze(-1).expand(*x.shape, 8))
        return x


def test_user_module() -> None:
    g = build_graph(Tagger(), batch=2, seq_len=5)
    assert g.traced and not g.reduced and g.stacks == ()
    call = g.calls("proj")
    assert [a.name for a in call.inputs] == ["input"]
    assert g.dataflow.nodes[call.inputs[0].node]["module"] == "emb"
    assert [c[1] for c in consumers(g, call.outputs[0].node)] == ["aten.add.Tensor"]
    assert g.module("norm").attrs == {"normalized_shape": (8,), "eps": 1e-05}


def test_untraceable_user_module() -> None:
    with pytest.raises(GraphError) as info:
        build_graph(DataDependent())
    assert str(info.value).startswith("torch.export failed for DataDependent")
    assert "\n" not in str(info.value)
    g = build_graph(resolve_model(DataDependent()), allow_untraced=True)
    assert not g.traced and g.trace_error and len(g.dataflow) == 0
    assert g.module("proj").attrs["out_features"] == 8  # module facts survive
    with pytest.raises(GraphError, match="was not traced"):
        g.calls("proj")


def test_graph_is_read_only() -> None:
    """Graphs are shared through the trace cache: their fields cannot be rebound."""
    import dataclasses

    g = graph("tiny-llama")
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.traced = False  # type: ignore[misc]
    assert g.calls("model.layers.0.mlp") is g.calls("model.layers.1.mlp")  # one boundary per kind
