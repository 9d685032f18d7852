"""LoRA adapters on a model, in place: the runtime of a Program's `Adapters` step.

`install_adapters(model, step)` injects PEFT's LoRA layers (`peft.inject_adapter_in_model`,
adapter name `default`) into exactly the base modules the step names and freezes every
other parameter. An adapted module keeps its name (`...q_proj`) and becomes PEFT's
wrapper: the base module moves to `<fqn>.base_layer`, the adapter matrices are
`<fqn>.lora_A.default` (rank × in) and `<fqn>.lora_B.default` (out × rank), and the
forward adds `lora_B(lora_A(dropout(x))) * alpha / rank` to the base's output. On an
Embedding, PEFT holds bare parameters instead: `<fqn>.lora_embedding_A.default` (rank ×
vocabulary) and `<fqn>.lora_embedding_B.default` (width × rank).

Guarantees:

- Only the adapter matrices require gradients afterwards (checked, not assumed): the
  optimizer of `runtime.train` takes trainable parameters only, so the base stays
  bit-identical through training.
- On a meta model the adapters are created on meta too (`low_cpu_mem_usage`): the dry
  run and the runtime apply the step before any weight exists; values come later from
  `runtime.weights.loading` (PEFT's rule, `adapter_init`, drawn from a seed keyed by
  the tensor's name), the same full tensor on every layout.
- `step.dtype` is the adapters' parameter dtype (None: PEFT's, the base's).
- With `step.quantize`, the adapted modules' bases are then held in 4 bits
  (`runtime.parallel.quantize.quantize_bases`).
- A target PEFT cannot adapt, or one already adapted, or a base that cannot be held in
  4 bits, raises `AdapterError` naming the module (the apply loop names the plan line).

Tensor parallelism on an adapted module is `runtime.parallel.apply`'s business (the
style goes to `base_layer`, the style registry's adapter layout to lora_A / lora_B),
as is FSDP2, whose units shard base and adapters together.
"""

from __future__ import annotations

import math
import re
from typing import Literal

import torch
from torch import nn

from meshplan.planner.program import Adapters

from .noise import quiet_optional_backends

__all__ = [
    "ADAPTER_NAME",
    "AdapterError",
    "adapted_modules",
    "adapter_init",
    "adapter_matrices",
    "adapter_side",
    "base_kind",
    "install_adapters",
    "is_adapted",
    "is_adapter_param",
    "quiet_optional_backends",
]

ADAPTER_NAME = "default"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}

# An adapter matrix's parameter, under any adapter name: `….lora_A.default.weight` on a
# Linear (modules), `….lora_embedding_A.default` on an Embedding (bare parameters).
_ADAPTER_PARAM = re.compile(r"(^|\.)lora_(A|B)\.[^.]+\.weight$")
_EMBEDDING_PARAM = re.compile(r"(^|\.)lora_embedding_(A|B)\.[^.]+$")
# Where a PEFT LoRA wrapper holds its adapters.
_HOLDERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")

# peft's optional backends log at import; drop those messages (see `noise`).
quiet_optional_backends()


class AdapterError(ValueError):
    """The Adapters step cannot be applied to this model (a user's error)."""


def is_adapter_param(name: str) -> bool:
    """Is `name` (any spelling, wrappers included) a LoRA adapter matrix's weight?"""
    return adapter_side(name) is not None


def adapter_side(name: str) -> str | None:
    """"A" for a lora_A weight's name (lora_embedding_A on an Embedding), "B" for a
    lora_B one, None for any other name."""
    found = _ADAPTER_PARAM.search(name) or _EMBEDDING_PARAM.search(name)
    return found.group(2) if found else None


def adapter_init(name: str, shape: tuple[int, ...]) -> tuple[Literal["uniform", "normal", "zeros"], float] | None:
    """PEFT's initialisation of the adapter tensor `name` (None: not an adapter), as
    (kind, scale): `uniform` in ±scale, `normal` of std scale, or `zeros`.

    On a Linear, lora_A is kaiming_uniform_(a=√5) (bound 1/√fan_in) and lora_B zeros; on
    an Embedding, lora_embedding_A zeros and lora_embedding_B normal(0, 1). Either way
    the adapter adds nothing until it trains."""
    if _EMBEDDING_PARAM.search(name):
        return ("zeros", 0.0) if adapter_side(name) == "A" else ("normal", 1.0)
    side = adapter_side(name)
    if side == "A":
        return "uniform", 1.0 / math.sqrt(max(math.prod(shape[1:]), 1))
    return ("zeros", 0.0) if side == "B" else None


def is_adapted(module: nn.Module) -> bool:
    """Is `module` a PEFT LoRA wrapper (its base in `base_layer`, adapters in `lora_A`)?

    Read from the module's structure, so that asking needs no import of peft (slow, and
    a plan without adapters never imports it)."""
    children = module._modules
    return isinstance(children.get("base_layer"), nn.Module) and isinstance(children.get("lora_A"), nn.ModuleDict)


def adapted_modules(model: nn.Module) -> dict[str, nn.Module]:
    """FQN → PEFT LoRA wrapper, for every adapted module of `model`."""
    return {name: m for name, m in model.named_modules() if is_adapted(m)}


def adapter_matrices(wrapper: nn.Module) -> tuple[nn.Module, nn.Module]:
    """A PEFT LoRA wrapper's (lora_A, lora_B) modules of the `default` adapter."""
    a, b = getattr(wrapper, "lora_A", None), getattr(wrapper, "lora_B", None)
    if not (isinstance(a, nn.ModuleDict) and isinstance(b, nn.ModuleDict)) \
            or ADAPTER_NAME not in a or ADAPTER_NAME not in b:
        raise AdapterError(f"{type(wrapper).__name__} holds no {ADAPTER_NAME!r} LoRA adapter")
    return a[ADAPTER_NAME], b[ADAPTER_NAME]


def base_kind(module: nn.Module) -> str:
    """The style registry's module kind of a base module (what an adapter layout is keyed by)."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if type(module).__name__ == "Conv1D":
        return "conv1d"
    return type(module).__name__


def install_adapters(model: nn.Module, step: Adapters) -> nn.Module:
    """Inject LoRA adapters into `step.fqns` of `model` in place and freeze the rest;
    returns `model`. See the module docstring."""
    present = dict(model.named_modules())
    for fqn in step.fqns:
        module = present.get(fqn)
        if module is None:
            raise AdapterError(f"the model has no module `{fqn}` to adapt")
        if is_adapted(module):
            raise AdapterError(f"`{fqn}` already carries a LoRA adapter")
        if base_kind(module) not in ("linear", "embedding", "conv1d"):
            raise AdapterError(f"`{fqn}` is a {type(module).__name__}: LoRA adapts Linear, Embedding "
                               "and Conv1D modules")
    from peft import LoraConfig, inject_adapter_in_model

    # Exact names: PEFT also matches a target as a name suffix, so every fqn given here is
    # checked to be adapted, and nothing else is.
    config = LoraConfig(target_modules=list(step.fqns), r=step.rank, lora_alpha=step.alpha,
                        lora_dropout=step.dropout, bias="none")
    on_meta = any(p.is_meta for p in model.parameters())
    before = set(adapted_modules(model))
    try:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME, low_cpu_mem_usage=on_meta)
    except (ValueError, TypeError) as e:
        raise AdapterError(f"PEFT cannot adapt {', '.join(step.fqns[:3])}…: {e}") from None
    wrappers = adapted_modules(model)
    missing = [f for f in step.fqns if f not in wrappers]
    extra = sorted(set(wrappers) - set(step.fqns) - before)
    if missing or extra:  # pragma: no cover - PEFT's matching changed
        raise AdapterError(f"PEFT adapted {extra[:3]} and not {missing[:3]}")
    dtype = DTYPES[step.dtype] if step.dtype is not None else None
    for wrapper in wrappers.values():
        for holder in (getattr(wrapper, h, None) for h in _HOLDERS):
            if dtype is not None and isinstance(holder, nn.Module):
                holder.to(dtype)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad and not is_adapter_param(n))
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad and is_adapter_param(n))
    if trainable or frozen:  # pragma: no cover - PEFT's freezing changed
        raise AdapterError(f"after injecting LoRA, {trainable[:3]} still train and {frozen[:3]} are frozen")
    if step.quantize is not None:  # QLoRA: the frozen bases in 4 bits, before any sharding step
        from .quantize import QuantizeError, quantize_bases

        try:
            quantize_bases(model, step)
        except QuantizeError as e:
            raise AdapterError(str(e)) from None
    return model
