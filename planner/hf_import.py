"""A `.plan` from a transformers model's own tensor-parallel plan (`plan import hf MODEL`).

transformers 5 ships a TP plan for most decoder families: the config's
`base_model_tp_plan` (module names of the base model → a style name) merged with the
model class's `_tp_plan` (usually `lm_head`), which a built model exposes as `tp_plan`.
`import_hf(model)` writes it as a plan: those rules `on tp`, FSDP over `dp_shard` with one
unit per decoder layer and the root, the mesh `dp_shard = auto`, `tp = tp`.

How each transformers style is written (transformers' `distributed/tensor_parallel.py`):

| transformers                    | meshplan                                                |
|---------------------------------|---------------------------------------------------------|
| `colwise`                       | `colwise`                                               |
| `colwise_gather_output`, `colwise_rep` | `colwise(output = replicate)`                    |
| `rowwise`                       | `rowwise`                                               |
| `rowwise_split_input`, `rowwise_rep`   | `rowwise(input = replicate)`                     |
| `embedding_rowwise`             | `rowwise(input = replicate)` (vocabulary-parallel)      |
| `embedding_colwise`             | `colwise(output = replicate)` (embedding dim, gathered) |
| `packed_colwise` on a Linear    | `colwise(parts = 2)` (each half sharded)                |
| `sequence_parallel`             | `sequence_parallel(local_output = true)`                |
| `replicated_with_grad_allreduce`| `replicate(input = shard(2), output = shard(2))`        |
| `replicate`                     | no rule (a comment says so): the tensor stays whole     |
| `mla_kv_a_proj`                 | `mla_kv_a(rope = N)`, N the config's `qk_rope_head_dim` |
| `moe_tp_experts` on fused experts, with `gate_up_proj: packed_colwise` (or `up_proj: colwise`) and `down_proj: rowwise` | `tp_experts(parts = 2)` (`parts = 1`) |
| `moe_tp_experts` with `gate_up_proj: colwise`  | `tp_experts(parts = 1)`: each rank's rows are not its gate and up rows (the compiler says so) |
| `moe_tp_experts` on transposed experts ([E, H, 2I] / [E, I, H]), `gate_up_proj: packed_rowwise`, `down_proj: colwise` | `tp_experts(parts = 2)` |
| `all_reduce` on 3-D experts with `gate_proj`/`up_proj: colwise`, `down_proj: rowwise` (Inkling's shared experts) | `tp_experts(parts = 1)` |
| `local_params` on attention, with `colwise` on its own 1-D per-head parameters (`sinks`, `gate_bias`) | `head_params` |

`moe_tp_experts` goes on a fused experts module (`mlp.experts`, 3-D `gate_up_proj`
[E, 2I, H], `down_proj` [E, H, I]) together with rules on those two parameters, which
say how each is cut: the three rules are one meshplan rule, `tp_experts` on the module,
its `parts` read from the gate_up_proj rule (`packed_colwise`: gate and up each sharded;
plain `colwise`: the rows cut as one block).

`replicated_with_grad_allreduce` keeps a norm's weight whole and sums its gradient over
the ranks; it sits on per-head norms that see this rank's heads. Where the heads lie
depends on the family: dimension 2 of `[b, s, heads, d]` (Qwen3, the norm before the
transpose) or of `[b, s, heads·d]`, but dimension 1 of `[b, heads, s, d]` (Gemma-3,
Exaone-4 normalise after it). The importer runs the model once on a few tokens (on its
own device, meta included) and reads the norm's input shape: the dimension holding a head
count is the one declared sharded. The meshplan style makes the weight a replicated
DTensor and declares its input sharded there, so DTensor both sums the gradient and
computes the norm as one process would.

`mla_kv_a_proj` sits on latent attention's kv_a projection (DeepSeek-V2, MiniCPM3, …):
the last `qk_rope_head_dim` features of its output are the rotary key every head
shares, so with the heads split over the ranks their gradient is a partial sum on each
rank; `mla_kv_a` keeps the weight whole and sums that part's gradient.

`local_params` runs a module on the local shards of its own parameters, which other rules
cut: on attention modules those are per-head (attention sinks, one logit per head; Beam's
per-head gate bias), cut with the heads. `head_params` on the module is that, as one rule.

Styles with no meshplan equivalent yet (`moe_identity_expert`, `all_reduce` or
`packed_rowwise` outside fused experts, a rule on a parameter outside its owner's
`local_params` or experts rule) raise `HfImportError` naming the rule: nothing is
dropped silently. A rule that matches no module of the model is
left out with a comment saying so (transformers ignores it too).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["STYLES", "UNSUPPORTED", "HfImportError", "ImportedPlan", "hf_source", "import_hf",
           "tiny_config", "tp_plan_of"]

# transformers style → meshplan style text (for a module of the right kind).
STYLES: Mapping[str, str] = {
    "colwise": "colwise",
    "colwise_gather_output": "colwise(output = replicate)",
    "colwise_rep": "colwise(output = replicate)",
    "rowwise": "rowwise",
    "rowwise_split_input": "rowwise(input = replicate)",
    "rowwise_rep": "rowwise(input = replicate)",
    "embedding_rowwise": "rowwise(input = replicate)",
    "embedding_colwise": "colwise(output = replicate)",
    "packed_colwise": "colwise(parts = 2)",
    "sequence_parallel": "sequence_parallel(local_output = true)",
    "replicated_with_grad_allreduce": "replicate(input = shard(2), output = shard(2))",
    "moe_tp_experts": "tp_experts(parts = {parts})",  # with its parameters' rules: `_experts_rule`
    "mla_kv_a_proj": "mla_kv_a(rope = {rope})",  # the config's qk_rope_head_dim
    "local_params": "head_params",  # with its parameters' rules: `_head_params_rule`
}

# transformers styles meshplan has no equivalent for yet, and what they do.
UNSUPPORTED: Mapping[str, str] = {
    "packed_rowwise": "a rowwise projection whose input packs two halves, each sharded (meshplan writes it "
                      "only on transposed fused experts, as `tp_experts`)",
    "moe_identity_expert": "an identity expert whose input is divided by the tp size",
    "all_reduce": "sum a module's partial output over the ranks (meshplan writes it only on 3-D experts)",
    "grouped_gemm": "an expert-parallel weight (transformers' `ep_plan`)",
    "ep_dispatch_experts": "expert-parallel token dispatch (transformers' `ep_plan`)",
}


class HfImportError(ValueError):
    """The model's TP plan cannot be written as a meshplan plan; the message says why."""


@dataclass(frozen=True)
class ImportedPlan:
    text: str  # the plan, formatted canonically
    name: str
    architecture: str
    rules: tuple[tuple[str, str, str], ...]  # (pattern, transformers style, meshplan style)


def tp_plan_of(model: nn.Module) -> dict[str, str]:
    """The model's full TP plan (names from the top model), as transformers resolves it."""
    plan = getattr(model, "tp_plan", None)
    if isinstance(plan, Mapping):
        return dict(plan)
    return dict(getattr(model, "_tp_plan", None) or {})


def _generic(name: str) -> str:
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


def _layer_list(model: nn.Module, layers: int | None) -> str | None:
    """The FQN of the decoder layers' ModuleList: the longest one (with `layers` entries)."""
    lists = [(len(m), n) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if layers is not None:
        exact = [x for x in lists if x[0] == layers]
        lists = exact or lists
    return max(lists, key=lambda x: (x[0], -x[1].count(".")))[1] if lists else None


def _identifier(text: str) -> str:
    name = re.sub(r"\W+", "_", text).strip("_").lower() or "model"
    return f"m_{name}" if name[0].isdigit() else name


def _head_dims(model: nn.Module, fqns: list[str]) -> dict[str, int]:
    """The dimension of each module's first input that holds attention heads (see the module
    docstring), read from one forward over a few tokens; modules it cannot tell are absent."""
    import torch

    config: Any = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    found_counts = {getattr(text, k, None) for k in ("num_attention_heads", "num_key_value_heads")}
    counts = {c for c in found_counts if isinstance(c, int) and c > 1}
    tokens = 7  # a length no head count of the tiny configs equals
    counts.discard(tokens)
    shapes: dict[str, tuple[int, ...]] = {}

    def record(fqn: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], torch.Tensor):
                shapes.setdefault(fqn, tuple(args[0].shape))
        return hook

    handles = [model.get_submodule(f).register_forward_pre_hook(record(f)) for f in fqns]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        with torch.no_grad():
            # use_cache: without a cache, transformers checks position ids for packed
            # sequences with `.item()`, which a meta tensor cannot answer.
            model(input_ids=torch.zeros(1, tokens, dtype=torch.long, device=device), use_cache=True)
    except Exception:  # a model that will not run here keeps the batch-first default
        pass
    finally:
        for h in handles:
            h.remove()
    found: dict[str, int] = {}
    for fqn, shape in shapes.items():
        dims = [d for d in (1, 2) if d < len(shape) - 1 and shape[d] in counts]
        if len(dims) == 1:
            found[fqn] = dims[0]
    return found


# How transformers cuts a fused experts module's parameters → `tp_experts`' parts: the
# parameter rules that go with `moe_tp_experts` (or `all_reduce` on 3-D experts), keyed by
# (parameters, is the module transposed) → ({parameter: style}, parts). Stored as
# transformers does ([E, 2I, H] / [E, H, I]) the up side is cut colwise (dim -2, I) and
# down_proj rowwise (dim -1, I); stored transposed ([E, H, 2I] / [E, I, H]) the other way.
EXPERT_PARAMS: Mapping[tuple[str, bool], tuple[Mapping[str, str], int]] = {
    ("gate_up_proj packed_colwise", False): ({"gate_up_proj": "packed_colwise", "down_proj": "rowwise"}, 2),
    ("gate_up_proj colwise", False): ({"gate_up_proj": "colwise", "down_proj": "rowwise"}, 1),  # 2I rows as one
    ("up_proj colwise", False): ({"up_proj": "colwise", "down_proj": "rowwise"}, 1),  # no gate: [E, I, H]
    ("gate_proj colwise", False): ({"gate_proj": "colwise", "up_proj": "colwise", "down_proj": "rowwise"}, 1),
    ("gate_up_proj packed_rowwise", True): ({"gate_up_proj": "packed_rowwise", "down_proj": "colwise"}, 2),
    ("gate_up_proj rowwise", True): ({"gate_up_proj": "rowwise", "down_proj": "colwise"}, 1),
}
# Module styles that put fused experts on local shards with their output summed.
EXPERTS_STYLES = ("moe_tp_experts", "all_reduce")


def _experts_rule(pattern: str, style: str, plan: Mapping[str, str],
                  modules: list[nn.Module]) -> tuple[str, list[str]]:
    """`moe_tp_experts` (or `all_reduce`) on `pattern` and its parameter rules →
    (`tp_experts(...)`, the parameter rules it stands for)."""
    inner = {k[len(pattern) + 1:]: v for k, v in plan.items() if k.startswith(pattern + ".")}
    where = f"transformers' rule `{pattern}: {style}`"
    three_d = all(isinstance(getattr(m, n, None), nn.Parameter) and getattr(m, n).dim() == 3
                  for m in modules for n in ("up_proj" if "up_proj" in inner else "gate_up_proj", "down_proj"))
    if style == "all_reduce" and not three_d:
        raise HfImportError(f"{where} has no meshplan equivalent yet ({UNSUPPORTED[style]})")
    key = next((f"{n} {inner[n]}" for n in ("gate_up_proj", "gate_proj", "up_proj") if n in inner), None)
    if key is None or "down_proj" not in inner:
        raise HfImportError(f"{where} comes without rules cutting its gate_up_proj and down_proj: replicated "
                            "experts whose outputs are summed over the ranks have no meshplan equivalent")
    kinds = {type(m).__name__ for m in modules}
    from meshplan.planner.graph.facts import experts_transposed

    layouts = {experts_transposed(m) for m in modules}
    found = EXPERT_PARAMS.get((key, layouts.pop())) if len(layouts) == 1 else None
    cut = ", ".join(f"`{n}` {v}" for n, v in inner.items())
    if found is None or dict(found[0]) != {n: v for n, v in inner.items() if n in found[0]}:
        raise HfImportError(f"{where} cuts {cut} on {', '.join(sorted(kinds))}: expert parameters cut that way "
                            "have no meshplan equivalent yet (tp_experts shards every expert on its "
                            "intermediate features)")
    extra = sorted(set(inner) - set(found[0]))
    if extra:
        raise HfImportError(f"{where}: {', '.join(f'`{pattern}.{e}: {inner[e]}`' for e in extra)} inside the "
                            "experts has no meshplan equivalent yet")
    return STYLES["moe_tp_experts"].format(parts=found[1]), [f"{pattern}.{n}" for n in inner]


def _inner_comment(pattern: str, style: str, plan: Mapping[str, str], absorbed: list[str]) -> str:
    """The transformers rules one meshplan rule stands for (a module style and the rules on
    its parameters), as its comment says them."""
    return f"{style} ({', '.join(f'{k[len(pattern) + 1:]} {plan[k]}' for k in absorbed)})"


def _head_params_rule(pattern: str, plan: Mapping[str, str], modules: list[nn.Module]) -> list[str] | None:
    """`local_params` on an attention module and `colwise` rules on its own 1-D per-head
    parameters (attention sinks, a gate bias) → the parameter rules `head_params` stands
    for; None when no parameter of the module has a rule (nothing is sharded)."""
    inner = {k[len(pattern) + 1:]: v for k, v in plan.items() if k.startswith(pattern + ".")}
    own = {n for m in modules for n, _ in m.named_parameters(recurse=False)}
    cut = {n: v for n, v in inner.items() if n in own}
    if not cut:
        return None
    where = f"transformers' rule `{pattern}: local_params`"
    for name, style in cut.items():
        shapes = {tuple(getattr(m, name).shape) for m in modules if isinstance(getattr(m, name, None), nn.Parameter)}
        heads = {getattr(getattr(m, "config", None), "num_attention_heads", None) for m in modules}
        if style != "colwise" or any(len(sh) != 1 or sh[0] not in heads for sh in shapes):
            raise HfImportError(f"{where} with `{pattern}.{name}: {style}` (shape {sorted(shapes)}): meshplan shards "
                                "a module's own parameters only when they are 1-D, one entry per attention head "
                                "(`head_params`)")
    return [f"{pattern}.{n}" for n in cut]


def _rule_style(pattern: str, style: str, modules: list[nn.Module], head_dim: int | None = None,
                rope: object = None) -> str:
    if style in UNSUPPORTED:
        raise HfImportError(f"transformers' rule `{pattern}: {style}` has no meshplan equivalent yet "
                            f"({UNSUPPORTED[style]})")
    if style not in STYLES:
        raise HfImportError(f"transformers' rule `{pattern}: {style}`: unknown style `{style}`")
    if style == "packed_colwise" and not all(isinstance(m, nn.Linear) for m in modules):
        kinds = sorted({type(m).__name__ for m in modules})
        raise HfImportError(f"transformers' rule `{pattern}: packed_colwise` is on {', '.join(kinds)}, "
                            "not a Linear: packed expert weights have no meshplan equivalent yet")
    if style == "replicated_with_grad_allreduce" and head_dim is not None:
        return f"replicate(input = shard({head_dim}), output = shard({head_dim}))"
    if style == "mla_kv_a_proj":
        if not isinstance(rope, int) or rope < 1:
            raise HfImportError(f"transformers' rule `{pattern}: mla_kv_a_proj` needs the config's "
                                "`qk_rope_head_dim`, which this model's config does not have")
        return STYLES[style].format(rope=rope)
    return STYLES[style]


def import_hf(model: nn.Module, *, name: str | None = None, tp: int = 2) -> ImportedPlan:
    """Write `model`'s transformers TP plan as a meshplan plan (see the module docstring)."""
    from meshplan.dsl import format_plan, parse
    from meshplan.dsl.patterns import select

    plan = tp_plan_of(model)
    arch = type(model).__name__
    if not plan:
        raise HfImportError(f"{arch} ships no tensor-parallel plan (no `base_model_tp_plan` in its config, "
                            "no `_tp_plan` on the class)")
    modules = dict(model.named_modules())
    fqns = [n for n in modules if n]
    params = {_generic(n) for n, _ in model.named_parameters(remove_duplicate=False)}
    rules: list[tuple[str, str, str]] = []
    notes: list[str] = []
    per_head = [f for pattern, style in plan.items() if style == "replicated_with_grad_allreduce"
                for f in select(pattern, fqns)]
    head_dims = _head_dims(model, per_head) if per_head else {}
    config: Any = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    rope = getattr(text_config, "qk_rope_head_dim", None)
    # A module rule that stands for the rules on its parameters too (fused experts →
    # tp_experts, per-head parameters → head_params): pattern → its meshplan style, and
    # "" for each parameter rule it absorbs.
    grouped: dict[str, str] = {}
    absorbed: dict[str, list[str]] = {}
    for pattern, style in plan.items():
        matched = select(pattern, fqns)
        owners = [modules[f] for f in matched]
        if style in EXPERTS_STYLES and matched and (style == "moe_tp_experts" or any(
                k.startswith(pattern + ".") for k in plan)):
            grouped[pattern], absorbed[pattern] = _experts_rule(pattern, style, plan, owners)
        elif style == "local_params" and matched:
            found = _head_params_rule(pattern, plan, owners)
            if found is None:
                notes.append(f"# transformers' `{pattern}: local_params` shards none of its parameters: no rule")
            grouped[pattern], absorbed[pattern] = ("head_params", found) if found else ("", [])
        grouped.update({a: "" for a in absorbed.get(pattern, ())})
    for pattern, style in plan.items():
        if pattern in grouped:
            if grouped[pattern]:
                rules.append((pattern, _inner_comment(pattern, style, plan, absorbed[pattern]), grouped[pattern]))
            continue
        matched = select(pattern, fqns)
        if not matched:
            if pattern in params or _generic(pattern) in params:
                if style == "replicate":
                    notes.append(f"# transformers' `{pattern}: replicate` keeps that tensor whole: no rule")
                    continue
                raise HfImportError(f"transformers' rule `{pattern}: {style}` shards a parameter, not a "
                                    "module, outside a `local_params` or experts rule on its owner: meshplan's "
                                    "rules apply to modules (no equivalent yet)")
            notes.append(f"# transformers' rule `{pattern}: {style}` matches no module of {arch}: left out")
            continue
        if style == "replicate":
            notes.append(f"# transformers' `{pattern}: replicate` keeps the module whole: no rule")
            continue
        dims = {head_dims[f] for f in matched if f in head_dims}
        rules.append((pattern, style, _rule_style(pattern, style, [modules[f] for f in matched],
                                                  dims.pop() if len(dims) == 1 else None, rope)))
    layers = _layer_list(model, getattr(config, "num_hidden_layers", None))
    plan_name = name or _identifier(f"{getattr(config, 'model_type', arch)}_hf")
    width = max((len(p) for p, _, _ in rules), default=0)
    lines = [
        f"# {arch}: transformers' own tensor-parallel plan (`plan import hf`), FSDP over the",
        "# data-parallel ranks with one unit per decoder layer.",
        f"plan {plan_name} for {arch}",
        "",
        f"param tp = {tp}",
        "",
        "mesh {",
        "  dp_shard = auto",
        "  tp = tp",
        "}",
        "",
    ]
    if notes:
        lines += [*notes, ""]
    lines.append("tensor_parallel on tp {")
    lines += [f"  {p.ljust(width)} : {s}  # transformers: {hf}" for p, hf, s in rules]
    lines += ["}", "", "fully_shard on dp_shard {"]
    if layers:
        lines.append(f"  unit {layers}.*")
    lines += ["  root", "}", ""]
    text = format_plan(parse("\n".join(lines), "<import>"))
    return ImportedPlan(text, plan_name, arch, tuple(rules))


# --------------------------------------------------------------------------- models


# Small sizes for a trainable copy of a config class's defaults; only attributes the
# config has are set. Widths keep every head count and head dimension divisible by 4.
TINY: Mapping[str, int] = {
    "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 256, "max_position_embeddings": 256,
    "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64, "num_experts": 4,
    "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
    "q_lora_rank": 32, "kv_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
    "v_head_dim": 16, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
    "sliding_window": 16, "num_layers": 2, "n_layer": 2, "n_embd": 64, "n_head": 4, "n_inner": 128,
    "rotary_dim": 8, "partial_rotary_factor_dim": 8, "global_head_dim": 16, "num_global_key_value_heads": 2,
    "hidden_size_per_layer_input": 16, "vocab_size_per_layer_input": 256, "laurel_rank": 8,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
    "linear_value_head_dim": 16, "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 16,
    "mamba_n_groups": 1, "mamba_expand": 2, "ssm_state_size": 16, "time_step_rank": 8,
}


def tiny_config(config_class: Any) -> Any:
    """A trainable tiny copy of `config_class`'s defaults (see `TINY`), 2 decoder layers,
    dropout off."""
    from meshplan.planner.models import PER_LAYER_CONFIG_LISTS

    config = config_class()
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None)
    # Latent attention (DeepSeek-V2, MiniCPM3, …) sets `head_dim` to the rotary part's width
    # and `qk_head_dim` to the sum of both parts: they follow the tiny widths.
    rope_head = getattr(text, "qk_rope_head_dim", None)
    rope_is_head = isinstance(rope_head, int) and getattr(text, "head_dim", None) == rope_head
    # Its keys and values are expanded per head from one latent: as many as the queries.
    mla_heads = isinstance(getattr(text, "kv_lora_rank", None), int) and \
        getattr(text, "num_key_value_heads", None) == getattr(text, "num_attention_heads", None)
    for key, size in TINY.items():
        if isinstance(getattr(text, key, None), int) and not isinstance(getattr(text, key), bool):
            setattr(text, key, size)
    if rope_is_head:
        text.head_dim = text.qk_rope_head_dim
    if mla_heads:
        text.num_key_value_heads = text.num_attention_heads
    # DeepSeek-V2 leaves the experts per token unset (None): a router with experts needs it.
    if getattr(text, "num_experts_per_tok", 0) is None and isinstance(getattr(text, "n_routed_experts", None), int):
        text.num_experts_per_tok = TINY["num_experts_per_tok"]
    if isinstance(getattr(text, "qk_head_dim", None), int):
        text.qk_head_dim = text.qk_nope_head_dim + text.qk_rope_head_dim
    if isinstance(layers, int):
        for attr in (*PER_LAYER_CONFIG_LISTS, "mlp_only_layers", "layers_block_type"):
            per_layer = getattr(text, attr, None)
            if isinstance(per_layer, list | tuple) and len(per_layer) == layers:
                setattr(text, attr, type(per_layer)(per_layer[:2]))
    vocab = getattr(text, "vocab_size", None)
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id"):  # ids must fit the tiny vocabulary
        value = getattr(text, attr, None)
        if isinstance(vocab, int) and isinstance(value, int) and value >= vocab:
            setattr(text, attr, 0)
        elif isinstance(vocab, int) and isinstance(value, list):
            setattr(text, attr, [v for v in value if isinstance(v, int) and v < vocab] or None)
    # Dropout off: a tiny model is built to be measured against one process, and random
    # masks drawn on many ranks never agree with one process's (Seed-OSS defaults to 0.1).
    for key, value in vars(text).items():
        if "dropout" in key and isinstance(value, float) and value > 0:
            setattr(text, key, 0.0)
    if hasattr(text, "rope_parameters") and isinstance(text.rope_parameters, dict):
        text.rope_parameters = copy.deepcopy(text.rope_parameters)
    text.tie_word_embeddings = bool(getattr(text, "tie_word_embeddings", False))
    return config


def _config_class(name: str) -> Any:
    import transformers
    from transformers.models.auto import configuration_auto

    # A module-level table of transformers' that its module does not re-export by name.
    CONFIG_MAPPING_NAMES: dict[str, str] = getattr(configuration_auto, "CONFIG_MAPPING_NAMES")  # noqa: B009

    if name in CONFIG_MAPPING_NAMES:
        return getattr(transformers, CONFIG_MAPPING_NAMES[name])
    cls = getattr(transformers, name, None) if name.endswith("Config") else None
    if isinstance(cls, type) and issubclass(cls, transformers.PretrainedConfig):
        return cls
    return None


def hf_source(spec: str) -> Any:
    """A `ModelSource` for `plan import hf MODEL`: a preset, a Hugging Face directory, or a
    config class name / model_type (its defaults made tiny, `tiny_config`). Raises
    `ModelSpecError` (a ValueError) for anything else."""
    from meshplan.planner.models import ModelSource, ModelSpecError, list_presets, resolve_model

    text = spec.strip()
    # A preset or a directory wins over a model_type of the same name (`gpt2`).
    config_class = None if text.lower() in list_presets() or Path(text).expanduser().exists() else \
        _config_class(text)
    if config_class is None:
        return resolve_model(spec)
    import transformers

    config = tiny_config(config_class)
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        try:
            model_class = auto._model_mapping[config_class]
            break
        except (KeyError, AttributeError):
            continue
    else:
        raise ModelSpecError(f"model '{spec}': transformers has no model class for {config_class.__name__}")
    return ModelSource(spec=spec, kind="module", name=config.model_type, origin=f"{config_class.__name__} "
                       "defaults, made tiny", config=config, model_class=model_class, values={})
