"""Trace a model on the meta device into a `ModelGraph`: module facts plus ATen dataflow.

The package follows the phases of building one: `types` (the graph and its node data
types), `facts` (module facts from the meta model and its config), `trace`
(`torch.export` on meta, cached), `build` (the trace renamed into the networkx graph).

What a `ModelGraph` guarantees:

- `modules` holds a `ModuleInfo` for every module of the *full* model (named_modules
  order, root `""` included): class name, a coarse `kind`, direct parameter and buffer
  shapes, and the facts plan checks divide by (features, vocabulary, heads, key/value
  heads, head size, experts). Built from the meta model: no weights are allocated.
- `tied` lists groups of parameter fqns that are one tensor (GPT-2's and
  Llama-3.2-1B's `lm_head.weight` and token embedding), found by tensor identity.
- `stacks` lists the repeated blocks (an `nn.ModuleList` of same-class blocks, e.g.
  `model.layers`, `transformer.h`) grouped into kinds: blocks of one kind have the same
  submodules, parameter shapes and per-layer settings (Gemma-2: sliding vs global
  attention). Only one block per kind is traced: for a transformers model a copy with
  just those layers is built and checked to match the full model block by block (if it
  does not, the full model is traced). `representative(fqn)` maps any fqn inside a
  block to the same fqn in its kind's traced block, so an 80-layer model costs what a
  one-layer model does.
- `dataflow` is a `networkx.DiGraph` over the traced ATen nodes, in execution order.
  Node id = fx node name, except weights, whose id is their parameter/buffer fqn.
  Attributes: `op` ("aten.mm.default", "getitem", "placeholder", "output"), `target`,
  `args`/`kwargs` (with `Ref(node_id)` for values), `shape` (tuple, or None when the
  value is not one tensor; multi-output ops carry `shapes`/`dtypes`), `dtype`,
  `module` (innermost module fqn, in the full model's naming; "" at the root),
  `module_stack` (fqns outer → inner, root excluded), `module_type`. Placeholders
  carry `kind` ("parameter", "buffer", "constant", "input") and, for weights, `fqn`;
  a tied tensor is one node, under the first fqn of its group, with `tied` = the
  group. Edges go producer → consumer with `positions`: the argument paths (`(0,)`,
  `(1, 2)` for an element of a list argument, `("dim",)` for a keyword) where the
  value is used. Left out, because they compute nothing: assertion ops
  (`aten._assert_*`) and casts to the dtype and device a tensor already has (those
  return their input, so their uses are uses of the input: Llama's residual add reads
  the layer input, not a node inside `input_layernorm`).
- `calls(fqn)` gives a traced module's boundary: the values flowing in from outside
  (named by the module's forward arguments when known), the values flowing out, the
  weights used and the nodes inside.

How tracing is done: `torch.export.export(model, (), {"input_ids": …, "use_cache":
False}, strict=False)` on meta tensors, `input_ids` of shape [batch, seq_len]. The
defaults (2, 48) are chosen so the traced sizes do not collide with model sizes
(a size-1 batch or a sequence as long as a head would make reshapes ambiguous) and
divide by 2, 4, 8 and 16. MoE experts are traced with transformers' `batched_mm`
implementation (index + bmm: plain ATen ops with static shapes). Traces are cached
in-process per (model class, reduced config, settings).

Errors: a model that cannot be traced raises `GraphError` (one line) when it comes
from a factory or an `nn.Module`; for presets and config directories the failure is
recorded (`traced=False`, `trace_error`) and the module facts are still returned.
"""

from .build import build_graph
from .trace import DEFAULT_BATCH, DEFAULT_SEQ_LEN, TRACE_EXPERTS_IMPLEMENTATION
from .types import (
    BlockKind,
    Boundaries,
    CallArg,
    GraphError,
    ModelGraph,
    ModuleCall,
    ModuleInfo,
    Ref,
    Signature,
    Stack,
)

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_SEQ_LEN",
    "TRACE_EXPERTS_IMPLEMENTATION",
    "BlockKind",
    "Boundaries",
    "CallArg",
    "GraphError",
    "ModelGraph",
    "ModuleCall",
    "ModuleInfo",
    "Ref",
    "Signature",
    "Stack",
    "build_graph",
]
