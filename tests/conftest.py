"""Shared test helpers.

Golden files: `MESHPLAN_UPDATE_GOLDEN=1 pytest …` rewrites them from the current
output; review the diff before committing.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

if TYPE_CHECKING:
    from meshplan.planner.graph import ModelGraph

# CI has two cores, shared by pytest and the ranks it spawns: one thread each keeps tiny
# matmuls from fighting over them.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"
PLANS = ROOT / "plans"


def assert_golden(name: str, actual: str) -> None:
    path = GOLDEN / name
    if os.environ.get("MESHPLAN_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual, encoding="utf-8")
    if not path.exists():
        pytest.fail(f"golden file {path} is missing; run with MESHPLAN_UPDATE_GOLDEN=1 to create it")
    assert actual == path.read_text(encoding="utf-8")


# plans/llama.plan's tensor-parallel section (TP + SP + loss parallel on a Llama), for
# tests that build plans around it.
LLAMA_TP = """\
tensor_parallel on tp {
  model.embed_tokens                      : rowwise(input = replicate, output = shard(1))
  model.layers.*.input_layernorm          : sequence_parallel
  model.layers.*.self_attn                : prepare_input(hidden_states: shard(1) -> replicate)
  model.layers.*.self_attn.{q,k,v}_proj   : colwise
  model.layers.*.self_attn.o_proj         : rowwise(output = shard(1))
  model.layers.*.post_attention_layernorm : sequence_parallel
  model.layers.*.mlp                      : prepare_input(shard(1) -> replicate)
  model.layers.*.mlp.{gate,up}_proj       : colwise
  model.layers.*.mlp.down_proj            : rowwise(output = shard(1))
  model.norm                              : sequence_parallel
  lm_head                                 : colwise(input = shard(1), output = shard(-1), local_output = false)
}
"""


def tiny_llama_graph(layers: int | None = None, *, tied: bool = False) -> ModelGraph:
    """The model graph of tiny-llama, with `layers` decoder layers and tied embeddings if asked."""
    from meshplan.planner.graph import build_graph
    from meshplan.planner.models import resolve_model

    source = resolve_model("tiny-llama")
    config = copy.deepcopy(source.config)
    if layers is not None:
        config.num_hidden_layers = layers
    config.tie_word_embeddings = tied
    assert source.model_class is not None
    with torch.device("meta"):
        model = source.model_class(config)
    if tied:
        model.tie_weights()
    return build_graph(model)
