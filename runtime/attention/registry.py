"""Register meshplan's attention backends with transformers and pick one per device.

Backends (names as registered in `transformers.AttentionInterface`):

- `meshplan_sdpa` — exact PyTorch block-diagonal attention; CPU and GPU; always there.
- `meshplan_flash` — flash-attn varlen; needs CUDA and the flash-attn package.
- `meshplan_te` — Transformer Engine `thd`; needs CUDA and transformer-engine.

Guarantees:

- `register_backends()` is idempotent. It registers each backend's attention function
  AND a mask function under the same name in `transformers.masking_utils.
  AttentionMaskInterface`: transformers 5.23 hands an attention implementation the
  model's padding mask only when a mask function is registered for its name (otherwise
  `attention_mask` is always None). meshplan's mask function returns the 2-D padding
  mask `[B, S]` (None when nothing is padded) and never a dense 4-D mask: the backends
  build their own masks from packing info.
- `available_backends(device)` lists the backends that can run on `device`, probing
  the optional packages once (an import that fails counts as absent, with its error
  as the reason); `describe_backend(name)` says what a backend is and whether it can
  run here, in one line for `plan explain` / `plan run`.
- `select_backend(device, available=...)`: flash-attn, then Transformer Engine, on
  CUDA; `meshplan_sdpa` otherwise and whenever nothing better is available.
- `use_backend(model, name)` registers the backends and sets the model's (and its
  sub-configs') `config._attn_implementation`, which every attention layer reads at
  each forward. It does not call `model.set_attn_implementation`: in transformers 5.23
  that treats any name containing "flash" as a Hugging Face hub kernel to download.
  It raises `BackendUnavailable` when the backend cannot run on the model's device
  (a meta-device model is not checked) and `ValueError` for a model whose attention
  does not dispatch through `AttentionInterface`.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "BACKENDS",
    "FLASH",
    "SDPA",
    "TE",
    "BackendInfo",
    "BackendUnavailable",
    "available_backends",
    "describe_backend",
    "padding_mask_function",
    "register_backend",
    "register_backends",
    "select_backend",
    "use_backend",
]

SDPA = "meshplan_sdpa"
FLASH = "meshplan_flash"
TE = "meshplan_te"
BACKENDS: tuple[str, ...] = (SDPA, FLASH, TE)

# Preference on CUDA, best first.
_CUDA_ORDER: tuple[str, ...] = (FLASH, TE, SDPA)


class BackendUnavailable(RuntimeError):
    """The requested attention backend cannot run here (the message says why)."""


@dataclass(frozen=True)
class BackendInfo:
    name: str
    kernel: str
    devices: tuple[str, ...]
    preferred_format: str
    available: bool
    reason: str

    def __str__(self) -> str:
        state = "available" if self.available else f"unavailable: {self.reason}"
        return (
            f"{self.name}: {self.kernel} on {'/'.join(self.devices)}, "
            f"packs as {self.preferred_format} ({state})"
        )


_KERNELS: dict[str, tuple[str, tuple[str, ...], str]] = {
    SDPA: (
        "exact block-diagonal torch scaled_dot_product_attention",
        ("cpu", "cuda"),
        "varlen",
    ),
    FLASH: ("flash_attn.flash_attn_varlen_func", ("cuda",), "varlen"),
    TE: ("transformer_engine DotProductAttention(qkv_format='thd')", ("cuda",), "thd"),
}

_PACKAGES: dict[str, str] = {FLASH: "flash_attn", TE: "transformer_engine.pytorch"}


@functools.cache
def _package_problem(module: str) -> str:
    """'' when `module` imports, else why not (probed once per process)."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # a broken CUDA extension raises all sorts of errors
        return f"{module} cannot be imported ({type(exc).__name__}: {exc})".splitlines()[0]
    return ""


def _device_type(device: str | torch.device | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def _problem(name: str, device_type: str) -> str:
    if name not in _KERNELS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    devices = _KERNELS[name][1]
    if device_type not in devices:
        return f"runs on {'/'.join(devices)}, not {device_type}"
    if device_type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available"
    package = _PACKAGES.get(name)
    return _package_problem(package) if package else ""


def describe_backend(name: str, device: str | torch.device | None = None) -> BackendInfo:
    """What backend `name` is and whether it can run on `device` (default: CUDA if any)."""
    problem = _problem(name, _device_type(device))
    kernel, devices, fmt = _KERNELS[name]
    return BackendInfo(
        name=name,
        kernel=kernel,
        devices=devices,
        preferred_format=fmt,
        available=not problem,
        reason=problem,
    )


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """The backends that can run on `device` (default: CUDA if any), best first."""
    kind = _device_type(device)
    order = _CUDA_ORDER if kind == "cuda" else BACKENDS
    return [name for name in order if not _problem(name, kind)]


def select_backend(
    device: str | torch.device | None = None, available: Iterable[str] | None = None
) -> str:
    """The backend to use on `device`: the first of flash-attn, Transformer Engine,
    meshplan_sdpa (CUDA) or meshplan_sdpa (elsewhere) that is in `available`
    (default: `available_backends(device)`)."""
    kind = _device_type(device)
    have = set(available_backends(device) if available is None else available)
    unknown = have - set(BACKENDS)
    if unknown:
        raise ValueError(
            f"unknown attention backends {sorted(unknown)}; choose from {', '.join(BACKENDS)}"
        )
    order = _CUDA_ORDER if kind == "cuda" else (SDPA,)
    for name in order:
        if name in have:
            return name
    # The exact fallback runs everywhere; it is the answer when nothing else fits.
    return SDPA


def padding_mask_function(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable[..., Any] | None = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """transformers mask-interface function: the 2-D boolean padding mask of the last
    `kv_length` keys, or None when no key is padding. The backends build the causal,
    sliding-window and packing structure themselves (and ignore this mask when packing
    info is present)."""
    if attention_mask is None:
        return None
    mask = attention_mask[:, -kv_length:].to(torch.bool)
    return None if bool(mask.all()) else mask


def _attention_functions() -> dict[str, Callable[..., Any]]:
    from .flash import flash_attention_forward
    from .sdpa import sdpa_attention_forward
    from .te import te_attention_forward

    return {SDPA: sdpa_attention_forward, FLASH: flash_attention_forward, TE: te_attention_forward}


def register_backend(name: str, attention: Callable[..., Any]) -> None:
    """Register `attention` and meshplan's padding-mask function under `name`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, padding_mask_function)


def register_backends() -> None:
    """Register the three meshplan backends with transformers (idempotent)."""
    for name, fn in _attention_functions().items():
        register_backend(name, fn)


def _configs(model: nn.Module) -> list[Any]:
    seen: dict[int, Any] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            seen.setdefault(id(config), config)
    return list(seen.values())


def _model_device(model: nn.Module) -> torch.device | None:
    for tensor in model.parameters():
        return tensor.device
    return None


def use_backend(model: nn.Module, name: str, *, check_device: bool = True) -> str | None:
    """Make `model` use attention backend `name`; returns the implementation it had.

    Any implementation registered with transformers is accepted (meshplan's three,
    `sdpa`, `eager`, or a test's own); meshplan's are registered first.
    """
    register_backends()
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name != "eager" and name not in ALL_ATTENTION_FUNCTIONS:
        raise ValueError(
            f"unknown attention implementation {name!r}; registered: "
            f"{', '.join(sorted(ALL_ATTENTION_FUNCTIONS.valid_keys()))}"
        )
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    if callable(can_set) and not can_set():
        raise ValueError(
            f"{type(model).__name__} does not dispatch attention through transformers' "
            "AttentionInterface, so its attention backend cannot be replaced"
        )
    configs = _configs(model)
    if not configs:
        raise ValueError(f"{type(model).__name__} has no transformers config to set")
    device = _model_device(model)
    if check_device and name in BACKENDS and device is not None and device.type != "meta":
        info = describe_backend(name, device)
        if not info.available:
            raise BackendUnavailable(f"attention backend {name} cannot run: {info.reason}")
    previous: str | None = configs[0]._attn_implementation
    for config in configs:
        # The config setter also updates the config's declared sub-configs.
        config._attn_implementation = name
    return previous
