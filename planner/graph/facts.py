"""Module facts of the full model: kinds, sizes, heads, experts, tied weights, stacks.

Everything here reads the meta model (and its config) only; nothing is traced. What
the facts mean is documented on `ModuleInfo`, `Stack` and `BlockKind`.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from ..models import PER_LAYER_CONFIG_LISTS
from .types import BlockKind, ModuleInfo, Stack

_PER_INDEX_ATTR = re.compile(
    r"(^|_)(layer_?(idx|id|index|number|num)|block_?(idx|id|index)|idx|index)$"
)


def shape_of(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def _first_int(*values: Any) -> int | None:
    for v in values:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def experts_transposed(module: nn.Module) -> bool | None:
    """Does a fused experts module store its experts transposed ([E, H, 2I] / [E, I, H])
    rather than as transformers' default ([E, 2I, H] / [E, H, I])? transformers'
    `is_transposed` says so; a class without it (LongCat's, Llama-4's experts), the shapes;
    None when neither tells. (The runtime's torch-only twin: `runtime.parallel.styles`.)"""
    flag = getattr(module, "is_transposed", None)
    if isinstance(flag, bool):
        return flag
    own = {n: tuple(p.shape) for n, p in module.named_parameters(recurse=False)}
    down, up = own.get("down_proj", ()), own.get("gate_up_proj", own.get("up_proj", ()))
    fused = 2 if "gate_up_proj" in own else 1  # gate and up packed, or up alone / beside gate_proj
    if len(down) != 3 or len(up) != 3:
        return None
    if up[1] == fused * down[2] and up[2] == down[1]:
        return False
    if up[2] == fused * down[1] and up[1] == down[2]:
        return True
    return None


def _classify(fqn: str, module: nn.Module, stack_blocks: set[str], stack_fqns: set[str]) -> str:
    name = type(module).__name__
    lower = name.lower()
    if fqn in stack_blocks:
        return "decoder_layer"
    if fqn in stack_fqns:
        return "stack"
    if name == "Conv1D":
        return "conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)) or lower.endswith("norm"):
        return "norm"
    if isinstance(module, nn.Dropout):
        return "dropout"
    if "rotary" in lower:
        return "rotary"
    if "attention" in lower:
        return "attention"
    if "experts" in lower:
        return "experts"
    if "router" in lower:
        return "router"
    if "moe" in lower:
        return "moe"
    if lower.endswith(("mlp", "feedforward", "ffn")):
        return "mlp"
    mod = type(module).__module__
    if mod.startswith(("transformers.activations", "torch.nn.modules.activation")):
        return "activation"
    if fqn == "" or lower.endswith("model") or lower.endswith("lmheadmodel"):
        return "model"
    return "other"


def _attention_attrs(module: nn.Module, config: Any) -> dict[str, Any]:
    heads = _first_int(
        getattr(module, "num_heads", None),
        getattr(module, "num_attention_heads", None),
        getattr(config, "num_attention_heads", None),
    )
    hidden = getattr(config, "hidden_size", None)
    head_dim = _first_int(
        getattr(module, "head_dim", None),
        getattr(config, "head_dim", None),
        hidden // heads if isinstance(hidden, int) and heads else None,
    )
    groups = getattr(module, "num_key_value_groups", None)
    kv = _first_int(
        getattr(module, "num_key_value_heads", None),
        getattr(module, "num_kv_heads", None),
        heads // groups if heads and isinstance(groups, int) and groups else None,
        getattr(config, "num_key_value_heads", None),
        heads,
    )
    attrs: dict[str, Any] = {"num_heads": heads, "num_kv_heads": kv, "head_dim": head_dim}
    for key in ("sliding_window", "is_causal", "attn_logit_softcapping"):
        value = getattr(module, key, None)
        if isinstance(value, (bool, int, float)):
            attrs[key] = value
    return attrs


def _module_attrs(kind: str, module: nn.Module, config: Any) -> dict[str, Any]:
    if kind == "linear":
        assert isinstance(module, nn.Linear)
        return {
            "in_features": module.in_features,
            "out_features": module.out_features,
            "bias": module.bias is not None,
        }
    if kind == "conv1d":
        # transformers' Conv1D stores weight as (nx, nf) = (in, out): a transposed Linear.
        nx_, nf = _first_int(getattr(module, "nx", None)), _first_int(getattr(module, "nf", None))
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            nx_ = nx_ if nx_ is not None else int(weight.shape[0])
            nf = nf if nf is not None else int(weight.shape[1])
        return {"nx": nx_, "nf": nf, "in_features": nx_, "out_features": nf, "bias": True}
    if kind == "embedding":
        assert isinstance(module, nn.Embedding)
        return {
            "num_embeddings": module.num_embeddings,
            "embedding_dim": module.embedding_dim,
            "padding_idx": module.padding_idx,
        }
    if kind == "norm":
        shape = getattr(module, "normalized_shape", None)
        weight = getattr(module, "weight", None)
        if shape is None and isinstance(weight, torch.Tensor):
            shape = shape_of(weight)
        eps = next(
            (
                getattr(module, k)
                for k in ("eps", "variance_epsilon", "epsilon")
                if isinstance(getattr(module, k, None), float)
            ),
            None,
        )
        return {"normalized_shape": tuple(shape) if shape is not None else None, "eps": eps}
    if kind == "attention":
        return _attention_attrs(module, config)
    if kind in ("experts", "router", "moe"):
        attrs: dict[str, Any] = {
            "num_experts": _first_int(
                getattr(module, "num_experts", None),
                getattr(config, "num_local_experts", None),
                getattr(config, "num_experts", None),
            ),
            "top_k": _first_int(
                getattr(module, "top_k", None), getattr(config, "num_experts_per_tok", None)
            ),
        }
        # Noise a router draws in training (Mixtral's `jitter_noise`, PhiMoE's
        # `router_jitter_noise` of its sampling router): routes then differ per rank.
        # A MoE block answers for its router too (PhiMoE's is a Linear subclass).
        owners = [module, *module.children()] if kind == "moe" else [module]
        jitter = [float(v) for m in owners for k, v in vars(m).items()
                  if "jitter" in k and isinstance(v, (int, float)) and not isinstance(v, bool)]
        if jitter:
            attrs["jitter"] = max(jitter)
        if kind == "experts":
            attrs["hidden_dim"] = _first_int(getattr(module, "hidden_dim", None))
            own = {n: tuple(p.shape) for n, p in module.named_parameters(recurse=False)}
            down_shape = own.get("down_proj", ())
            transposed = experts_transposed(module)
            attrs["intermediate_dim"] = _first_int(
                getattr(module, "intermediate_dim", None),
                (down_shape[1] if transposed else down_shape[2])
                if len(down_shape) == 3 and isinstance(transposed, bool) else None)
            # How transformers' `use_experts_implementation` lays the experts out (absent
            # on classes that do not use it): what a tensor-parallel split must respect.
            for flag in ("is_concatenated", "has_gate", "has_bias", "has_post_expert_norm"):
                if isinstance(getattr(module, flag, None), bool):
                    attrs[flag] = getattr(module, flag)
            if isinstance(transposed, bool):
                attrs["is_transposed"] = transposed
            # transformers 5 stores all experts of a layer as 3-D tensors [experts, …].
            attrs["fused"] = any(p.dim() == 3 for p in module.parameters(recurse=False))
        return attrs
    if kind == "mlp":
        hidden = _first_int(
            getattr(module, "hidden_size", None), getattr(config, "hidden_size", None)
        )
        # The down projection maps intermediate -> hidden: its input size is the
        # intermediate size when no attribute says so (GPT-2's n_inner may be None).
        down = [
            _module_attrs(k, child, config).get("in_features")
            for child in module.children()
            for k in (_classify("-", child, set(), set()),)
            if k in ("linear", "conv1d")
            and _module_attrs(k, child, config).get("out_features") == hidden
        ]
        return {
            "hidden_size": hidden,
            "intermediate_size": _first_int(
                getattr(module, "intermediate_size", None),
                getattr(config, "intermediate_size", None),
                getattr(config, "n_inner", None),
                *down,
            ),
        }
    if kind == "rotary":
        rope_type = getattr(module, "rope_type", None)
        return {"rope_type": rope_type} if isinstance(rope_type, str) else {}
    return {}


def module_infos(model: nn.Module, config: Any, stacks: tuple[Stack, ...]) -> dict[str, ModuleInfo]:
    blocks: dict[str, tuple[Stack, int]] = {
        stack.block(i): (stack, i) for stack in stacks for i in range(stack.length)
    }
    stack_fqns = {s.fqn for s in stacks}
    block_fqns = set(blocks)
    infos: dict[str, ModuleInfo] = {}
    for fqn, module in model.named_modules(remove_duplicate=False):
        if fqn in infos:
            continue
        kind = _classify(fqn, module, block_fqns, stack_fqns)
        if kind == "decoder_layer":
            stack, index = blocks[fqn]
            attrs: dict[str, Any] = {
                "stack": stack.fqn,
                "index": index,
                "block_kind": stack.kind_of(index).name,
            }
        elif kind == "stack":
            stack = next(s for s in stacks if s.fqn == fqn)
            attrs = {
                "length": stack.length,
                "block_type": stack.block_type,
                "kinds": tuple(k.name for k in stack.kinds),
            }
        else:
            attrs = _module_attrs(kind, module, config)
        infos[fqn] = ModuleInfo(
            fqn=fqn,
            type=type(module).__name__,
            kind=kind,
            params={n: shape_of(p) for n, p in module.named_parameters(recurse=False)},
            buffers={
                n: shape_of(b) for n, b in module.named_buffers(recurse=False) if b is not None
            },
            attrs=attrs,
        )
    return infos


def tied_groups(model: nn.Module) -> tuple[tuple[str, ...], ...]:
    by_tensor: dict[int, list[str]] = {}
    for fqn, p in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), []).append(fqn)
    return tuple(tuple(names) for names in by_tensor.values() if len(names) > 1)


# --------------------------------------------------------------------------- stacks


def block_structure(block: nn.Module) -> tuple[Any, ...]:
    return tuple(
        (
            rel,
            type(m).__qualname__,
            tuple((n, shape_of(p), str(p.dtype)) for n, p in m.named_parameters(recurse=False)),
            tuple(
                (n, shape_of(b), str(b.dtype))
                for n, b in m.named_buffers(recurse=False)
                if b is not None
            ),
        )
        for rel, m in block.named_modules()
    )


def block_settings(block: nn.Module) -> tuple[Any, ...]:
    # Scalar attributes (is_sliding, sliding_window, …) distinguish blocks whose
    # structure is the same but which compute differently; per-index ones do not.
    out = []
    for rel, m in block.named_modules():
        scalars = tuple(
            sorted(
                (k, v)
                for k, v in vars(m).items()
                if not k.startswith("_")
                and k != "training"
                and not _PER_INDEX_ATTR.search(k)
                and (v is None or isinstance(v, (bool, int, float, str)))
            )
        )
        out.append((rel, scalars))
    return tuple(out)


def _per_layer_values(config: Any, index: int, length: int) -> tuple[tuple[str, Any], ...]:
    values = []
    for attr in PER_LAYER_CONFIG_LISTS:
        value = getattr(config, attr, None)
        if isinstance(value, (list, tuple)) and len(value) == length:
            values.append((attr, value[index]))
    return tuple(values)


def find_stacks(model: nn.Module, config: Any) -> tuple[Stack, ...]:
    stacks: list[Stack] = []
    taken: list[str] = []
    n_layers = getattr(config, "num_hidden_layers", None)
    for fqn, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(fqn.startswith(t + ".") for t in taken):
            continue  # a list inside a block (e.g. per-expert modules) is part of the block
        blocks = list(module)
        block_type = type(blocks[0])
        if not all(type(b) is block_type for b in blocks):
            continue
        if not any(True for _ in blocks[0].parameters()):
            continue
        groups: OrderedDict[Any, list[int]] = OrderedDict()
        config_values: dict[Any, tuple[tuple[str, Any], ...]] = {}
        for i, block in enumerate(blocks):
            per_layer = _per_layer_values(config, i, len(blocks)) if len(blocks) == n_layers else ()
            key = (block_structure(block), block_settings(block), per_layer)
            groups.setdefault(key, []).append(i)
            config_values[key] = per_layer
        kinds = []
        labels = ["/".join(str(v) for _, v in config_values[key]) for key in groups]
        distinct = len(set(labels)) == len(labels) and all(labels)
        for k, layers in enumerate(groups.values()):
            if distinct:
                name = labels[k]
            elif len(groups) == 1:
                name = labels[k] or "block"
            else:
                name = f"{labels[k] or 'variant'}#{k}"
            kinds.append(BlockKind(name=name, layers=tuple(layers), representative=layers[0]))
        stacks.append(
            Stack(fqn=fqn, block_type=block_type.__name__, length=len(blocks), kinds=tuple(kinds))
        )
        taken.append(fqn)
    return tuple(stacks)
