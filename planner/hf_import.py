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

`replicated_with_grad_allreduce` keeps a norm's weight whole and sums its gradient over
the ranks; it sits on per-head norms that see this rank's heads. Where the heads lie
depends on the family: dimension 2 of `[b, s, heads, d]` (Qwen3, the norm before the
transpose) or of `[b, s, heads·d]`, but dimension 1 of `[b, heads, s, d]` (Gemma-3,
Exaone-4 normalise after it). The importer runs the model once on a few tokens (on its
own device, meta included) and reads the norm's input shape: the dimension holding a head
count is the one declared sharded. The meshplan style makes the weight a replicated
DTensor and declares its input sharded there, so DTensor both sums the gradient and
computes the norm as one process would.

Styles with no meshplan equivalent yet (`packed_rowwise`, `packed_colwise` on expert
parameters, `mla_kv_a_proj`, `moe_tp_experts`, `moe_identity_expert`, `all_reduce`,
`local_params`, a rule on a parameter rather than a module) raise `HfImportError` naming
the rule: nothing is dropped silently. A rule that matches no module of the model is
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
}

# transformers styles meshplan has no equivalent for yet, and what they do.
UNSUPPORTED: Mapping[str, str] = {
    "packed_rowwise": "a rowwise projection whose input packs two halves, each sharded",
    "mla_kv_a_proj": "MLA's kv_a projection: the rope part's gradient is summed over the ranks",
    "moe_tp_experts": "every expert sharded tensor-parallel, outputs summed over the ranks",
    "moe_identity_expert": "an identity expert whose input is divided by the tp size",
    "all_reduce": "sum a module's partial output over the ranks",
    "local_params": "run the module on its parameters' local shards",
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


def _rule_style(pattern: str, style: str, modules: list[nn.Module], head_dim: int | None = None) -> str:
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
    for pattern, style in plan.items():
        matched = select(pattern, fqns)
        if not matched:
            if pattern in params or _generic(pattern) in params:
                if style == "replicate":
                    notes.append(f"# transformers' `{pattern}: replicate` keeps that tensor whole: no rule")
                    continue
                raise HfImportError(f"transformers' rule `{pattern}: {style}` shards a parameter, not a "
                                    "module: meshplan's rules apply to modules (no equivalent yet)")
            notes.append(f"# transformers' rule `{pattern}: {style}` matches no module of {arch}: left out")
            continue
        if style == "replicate":
            notes.append(f"# transformers' `{pattern}: replicate` keeps the module whole: no rule")
            continue
        dims = {head_dims[f] for f in matched if f in head_dims}
        rules.append((pattern, style, _rule_style(pattern, style, [modules[f] for f in matched],
                                                  dims.pop() if len(dims) == 1 else None)))
    config = getattr(model, "config", None)
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
    for key, size in TINY.items():
        if isinstance(getattr(text, key, None), int) and not isinstance(getattr(text, key), bool):
            setattr(text, key, size)
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
