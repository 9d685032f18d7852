"""Model weights for the runtime: meta construction, materialisation, deterministic
random init, per-rank sharded loading, and gathering a full state dict.

The life of a model's weights under `torch.distributed`:

    model   = meta_model("tiny-llama")              # parameters on meta, buffers real on CPU
    applied = apply(program, model)                 # TP / AC / FSDP2 on meta: no memory
    materialize(applied)                            # to_empty: local shards allocated
    load_sharded(applied, "path/to/hf-dir")         # or init_random(applied, seed=0)

Guarantees:

- `meta_params()` / `meta_model()` build a model whose *parameters* are on the meta
  device while its *buffers* (rotary `inv_freq`, …) are computed for real on CPU by the
  model's own constructor. Each parameter is moved to meta as it is registered, so at
  most one freshly created parameter tensor (allocated with `torch.empty`, never
  touched) exists at a time.
- `materialize()` allocates every parameter (plain, DTensor or FSDP2-sharded) on the
  target device with `to_empty` and puts the real buffers back, so buffers are right
  after `apply()` and materialisation. It refuses a model whose buffers are on meta.
- `init_random(model, seed)` writes, into every parameter's *local* shard, exactly the
  values it writes into the same parameter of an unsharded single-process copy of the
  model: a parameter's values depend only on (seed, parameter name, global shape, init
  rule), never on the mesh, the plan, the rank, or the thread count. Values are drawn
  in fixed blocks of rows (`BLOCK_ELEMENTS` elements per block, so the block height
  depends only on the global shape), each block from its own generator seeded by
  (seed, name, block index); a rank draws only the blocks that overlap its shard and
  never holds more than one block beyond its own shard. Rules: `normal(0,
  config.initializer_range)` (0.02 without a config) for Linear / Embedding / Conv1D
  weights and other parameters of ≥ 2 dimensions; zeros for biases and other 1-D
  parameters; ones for norm weights, zeros for norms that scale by `1 + weight`
  (Gemma's); for LoRA adapters PEFT's own rule (`runtime.parallel.adapters.adapter_init`:
  on a Linear lora_A kaiming-uniform `uniform(±1/sqrt(in_features))` and lora_B zeros),
  so an adapted model starts as its base. Values are drawn in fp32 and then cast to the parameter's dtype.
- `load_sharded(model, directory)` reads a Hugging Face safetensors directory
  (`model.safetensors`, or `model-0000x-of-0000y.safetensors` with
  `model.safetensors.index.json`) so that each rank reads *only the elements of its
  own shard* through `safe_open(...).get_slice(name)[a:b, …]`, one contiguous box at a
  time, and never holds a full sharded parameter. It needs no communication. It
  handles any DTensor placements (including FSDP-over-TP `_StridedShard` and uneven
  shards), fused rows stored rank-major (`styles.fused_row_order`), tied parameters
  (any of their names may be in the file), Hub names without the model's
  `base_model_prefix` (`wte.weight`), and module wrappers in names
  (`_checkpoint_wrapped_module.`, …). Every mismatch raises `LoadError`: a missing
  tensor (naming it and the checkpoint), an unexpected one with `strict` (except
  non-persistent buffers and the model's `_keys_to_ignore_on_load_unexpected`), a
  shape that differs (naming the tensor and its file). Values are cast to the
  parameter's dtype. Persistent buffers the files hold are loaded too. LoRA adapter
  tensors the files do not hold (Hugging Face checkpoints never do) are initialised as
  `init_random(model, seed)` initialises them (`LoadReport.initialised`).
- `load_broadcast(model, source)` serves sources that cannot be sliced (a `.bin` /
  `.pt` file, read with `weights_only=True`, an in-memory state dict, or safetensors
  visible to rank `src` only): rank `src` reads one tensor at a time and broadcasts it
  (in the parameter's dtype) over the default group; every rank keeps its own shard
  and drops the rest, so a rank holds one full tensor at a time. It uses the same
  shard arithmetic as `load_sharded` (rather than DCP's `broadcast_from_rank0`), so
  fused rows, tied names and error messages behave alike. A source rank `src` cannot
  read raises `LoadError` on every rank, not only on `src`.
- `full_state_dict(model)` yields (name, full tensor) with Hugging Face names and
  row order (fused rows un-permuted, one entry per tied tensor, wrappers stripped). It
  is a collective: every rank must iterate it to the end, in step.

A 4-bit (NF4) base weight (`runtime.parallel.quantize`) is the exception to reading only
a shard: `load_sharded`, `load_broadcast` and `init_random` build its FULL tensor (one
weight at a time) and `store_quantized` quantises it whole and keeps this rank's dim-0
chunk, because torchao's NF4 all-gather reuses the local shard's scaler mean for the
whole gathered tensor.

Every function that reads or writes weights first reshards FSDP2 modules (`reshard`):
after a forward with `reshard_after_forward = false` the module holds unsharded,
possibly low-precision copies, and the sharded parameters are the weights.

Which parameters hold fused rows comes from the Program (`Applied.program`, or
`program=`); for a bare module it is read from the forward hooks the fused styles
install (`fused_rows`).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import itertools
import json
import logging
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

from meshplan.dsl.styles import STYLES
from meshplan.planner.program import Parallelize, Program

from ..parallel.adapters import adapter_init, adapter_side
from ..parallel.apply import Applied
from ..parallel.quantize import is_quantized, store_quantized
from ..parallel.styles import _fused_output, expert_shard_dims, fused_row_order

__all__ = [
    "BLOCK_ELEMENTS",
    "FusedRows",
    "LoadError",
    "LoadReport",
    "WeightEntry",
    "canonical_name",
    "checkpoint_files",
    "full_state_dict",
    "fused_rows",
    "global_indices",
    "init_random",
    "init_rule",
    "load_broadcast",
    "load_sharded",
    "materialize",
    "meta_model",
    "meta_params",
    "model_and_fused",
    "reshard",
    "weight_entries",
]

# Name segments that module wrappers insert; checkpoints never contain them.
WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "_orig_mod.")
# PEFT's LoRA wrapper moves the module it adapts to `<fqn>.base_layer`: the base's
# tensors keep their Hugging Face names (`q_proj.weight`), the adapters' do not exist
# in Hugging Face checkpoints (`q_proj.lora_A.default.weight`).
ADAPTED_BASE_SEGMENT = "base_layer."

# The number of elements one random block holds (rows × row size). Part of the
# determinism contract: changing it changes every value `init_random` writes.
BLOCK_ELEMENTS = 1 << 20

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

InitKind = Literal["normal", "uniform", "zeros", "ones"]
InitRule = Callable[[str, nn.Module, torch.Tensor, float], tuple[InitKind, float]]


class LoadError(RuntimeError):
    """Weights cannot be loaded: the message names the tensor and the file."""


@dataclass(frozen=True)
class FusedRows:
    """A parameter whose `dim` packs `parts` equal pieces, stored rank-major over `tp`."""

    dim: int
    parts: int
    tp: int

    def order(self, n: int) -> torch.Tensor:
        """Stored index → Hugging Face (packed) index along `dim`."""
        return fused_row_order(n, self.parts, self.tp)


@dataclass(frozen=True, eq=False)
class WeightEntry:
    """One tensor of the model: its Hugging Face name, every name it has (tied), and
    where it lives (`module.<attr>`)."""

    name: str
    aliases: tuple[str, ...]
    module: nn.Module
    attr: str
    is_buffer: bool
    fused: FusedRows | None = None

    @property
    def tensor(self) -> torch.Tensor:
        table = self.module._buffers if self.is_buffer else self.module._parameters
        value = table[self.attr]
        if value is None:  # pragma: no cover - entries are built from non-None tensors
            raise LoadError(f"{self.name} is None")
        return value


@dataclass
class LoadReport:
    """What `load_sharded` / `load_broadcast` did on this rank."""

    source: Path | None
    files: dict[str, str] = field(default_factory=dict)  # model name → file name
    elements_read: dict[str, int] = field(default_factory=dict)
    local_elements: dict[str, int] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()  # persistent buffers the source does not hold
    initialised: tuple[str, ...] = ()  # adapter tensors the source does not hold (seeded init)

    @property
    def total_read(self) -> int:
        return sum(self.elements_read.values())


# --------------------------------------------------------------------------- names


def canonical_name(name: str) -> str:
    """A parameter name without wrapper segments: the name checkpoints use (an adapted
    module's base weight `q_proj.base_layer.weight` is `q_proj.weight`)."""
    for seg in WRAPPER_SEGMENTS:
        name = name.replace(seg, "")
    if ADAPTED_BASE_SEGMENT in name:  # whole segments only: `x.base_layer.` or a leading one
        parts = name.split(".")
        name = ".".join(p for i, p in enumerate(parts) if p != "base_layer" or i == len(parts) - 1)
    return name


def model_and_fused(model: nn.Module | Applied,
                    program: Program | None = None) -> tuple[nn.Module, dict[str, FusedRows]]:
    """The module of `model`, and its fused parameters (from the program if known)."""
    if isinstance(model, Applied):
        return model.model, fused_rows(model.model, program or model.program)
    return model, fused_rows(model, program)


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 module back in its sharded state. After a forward with
    `reshard_after_forward = false` a module holds unsharded (and maybe low-precision)
    parameters; reading or writing those would miss the sharded master weights."""
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def fused_rows(model: nn.Module, program: Program | None = None) -> dict[str, FusedRows]:
    """Parameter name → `FusedRows` for every parameter stored rank-major.

    From `program`: the `colwise(parts = k)` / `conv1d_colwise(parts = k)` calls. Without
    one: from the output hooks `FusedColwiseParallel` installs on its modules."""
    out: dict[str, FusedRows] = {}
    if program is not None:
        for step in program.steps_of(Parallelize):
            tp = program.mesh.size(step.mesh_dim)
            for rel, call in step.plan:
                weight_dim = STYLES[call.style].fused_weight_dim()  # the style registry's contract
                if call.parts > 1 and weight_dim is not None:
                    fqn = ".".join(p for p in (step.fqn, rel) if p)
                    out[f"{fqn}.weight"] = FusedRows(weight_dim, call.parts, tp)
                    out[f"{fqn}.bias"] = FusedRows(0, call.parts, tp)
                    # An adapter on it: lora_B's rows are the base's output features,
                    # sharded part by part as the base's (the style registry's layout).
                    out[f"{fqn}.lora_B.default.weight"] = FusedRows(0, call.parts, tp)
                if call.parts > 1 and STYLES[call.style].fused_params:  # fused experts, not Linear-like
                    fqn = ".".join(p for p in (step.fqn, rel) if p)
                    owner = _module_or_none(model, fqn)
                    # Experts stored transposed hold their intermediate features on another dim.
                    dims = expert_shard_dims(owner) if owner is not None else {}
                    for pname, dim in STYLES[call.style].fused_params.items():
                        out[f"{fqn}.{pname}"] = FusedRows(dims.get(pname, dim), call.parts, tp)
        present = {canonical_name(n) for n, _ in model.named_parameters(remove_duplicate=False)}
        return {k: v for k, v in out.items() if k in present}
    for name, module in model.named_modules():
        found = _fused_hook(module)
        if found is None:
            continue
        parts, tp = found
        if parts == 1:  # one part: rank-major order is the packed order
            continue
        prefix = canonical_name(f"{name}.") if name else ""
        weight_dim = 1 if type(module).__name__ == "Conv1D" else 0
        if module._parameters.get("weight") is not None:
            out[f"{prefix}weight"] = FusedRows(weight_dim, parts, tp)
        if module._parameters.get("bias") is not None:
            out[f"{prefix}bias"] = FusedRows(0, parts, tp)
    return out


def _module_or_none(model: nn.Module, fqn: str) -> nn.Module | None:
    try:
        return model.get_submodule(fqn)
    except AttributeError:
        return None


def _fused_hook(module: nn.Module) -> tuple[int, int] | None:
    """(parts, tp) when one of `module`'s forward hooks is a fused style's output hook."""
    for hook in module._forward_hooks.values():
        cells = [c.cell_contents for c in (getattr(hook, "__closure__", None) or ())]
        fns = [c for c in cells if isinstance(c, partial) and c.func is _fused_output]
        meshes = [c for c in cells if isinstance(c, DeviceMesh)]
        if fns and meshes:
            return int(fns[0].args[2]), meshes[0].size()
    return None


def weight_entries(model: nn.Module, fused: Mapping[str, FusedRows] | None = None, *,
                   buffers: bool = False) -> list[WeightEntry]:
    """Every distinct parameter (tied ones once, under their first name) and, with
    `buffers`, every persistent buffer; in `named_parameters` order."""
    fused = fused or {}
    groups: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for attr, p in module._parameters.items():
            if p is not None:
                full = canonical_name(f"{mod_name}.{attr}" if mod_name else attr)
                groups.setdefault(id(p), []).append((full, module, attr))
    entries = []
    for group in groups.values():
        names = tuple(dict.fromkeys(n for n, _, _ in group))
        first, module, attr = group[0]
        entries.append(WeightEntry(first, names, module, attr, False, fused.get(first)))
    if buffers:
        seen: set[int] = set()
        for mod_name, module in model.named_modules(remove_duplicate=False):
            for attr, b in module._buffers.items():
                if b is None or attr in module._non_persistent_buffers_set or id(b) in seen:
                    continue
                seen.add(id(b))
                full = canonical_name(f"{mod_name}.{attr}" if mod_name else attr)
                entries.append(WeightEntry(full, (full,), module, attr, True))
    return entries


def _nonpersistent_names(model: nn.Module) -> set[str]:
    return {canonical_name(f"{m}.{a}" if m else a)
            for m, module in model.named_modules(remove_duplicate=False)
            for a in module._non_persistent_buffers_set}


# --------------------------------------------------------------------------- meta models


@contextmanager
def meta_params() -> Iterator[None]:
    """Build modules with parameters on meta and buffers real (see the module docs).

    Patches `nn.Module.register_parameter` for the duration of the block (in this
    process, for every thread): each parameter is moved to meta as it is registered."""
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        if param is None or param.is_meta:
            return
        kind = type(param)
        meta = kind(param.data.to("meta"), requires_grad=param.requires_grad)
        meta.__dict__.update(param.__dict__)  # e.g. transformers' `_is_hf_initialized`
        self._parameters[name] = meta

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def meta_model(spec: Any, *, num_layers: int | None = None, layers: Sequence[int] | None = None,
               attn_implementation: str | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """`planner.models.build_meta_model`, but with real buffers (under `meta_params`).

    `spec` is a preset name, a Hugging Face directory or a `ModelSource`; the options
    are `build_meta_model`'s."""
    from meshplan.planner.models import ModelSpecError, reduced_config, resolve_model

    src = resolve_model(spec)
    if not src.can_reduce or src.model_class is None:
        raise ModelSpecError(f"model '{src.spec}' has no transformers config: build it yourself "
                             "inside `with meta_params():`")
    if num_layers is not None and layers is not None:
        raise ValueError("give num_layers or layers, not both")
    config = src.config
    if num_layers is not None:
        if not 1 <= num_layers <= config.num_hidden_layers:
            raise ValueError(f"num_layers must be in 1..{config.num_hidden_layers}, not {num_layers}")
        layers = range(num_layers)
    config = reduced_config(config, list(layers)) if layers is not None else copy.deepcopy(config)
    config.use_cache = False
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    with meta_params():
        model = src.model_class(config)
    for m in model.modules():  # a parameter set into `_parameters` directly skipped the patch
        for k, p in m._parameters.items():
            if p is not None and not p.is_meta:
                m._parameters[k] = nn.Parameter(p.data.to("meta"), requires_grad=p.requires_grad)
    if dtype is not None:
        model.to(dtype)
    return model


def materialize(model: nn.Module | Applied, device: torch.device | str | None = None) -> nn.Module:
    """Allocate every parameter on `device` (uninitialised), keeping the real buffers.

    `device` defaults to the mesh's device type (the current CUDA device for cuda)."""
    module = model.model if isinstance(model, Applied) else model
    on_meta = [n for n, b in module.named_buffers() if b.is_meta]
    if on_meta:
        raise LoadError(f"buffer {on_meta[0]} is on the meta device, so its values are lost: build "
                        "the model with meta_model() or inside `with meta_params():`")
    target = torch.device(device) if device is not None else _mesh_device(module)
    saved = [(m, k, b) for m in module.modules() for k, b in m._buffers.items() if b is not None]
    tied: dict[int, list[tuple[nn.Module, str]]] = {}
    for m in module.modules():
        for k, p in m._parameters.items():
            if p is not None:
                tied.setdefault(id(p), []).append((m, k))
    # DTensor parameters are swapped in place (FSDP2 then re-pads them in its `_apply`);
    # plain ones are replaced by new objects, which unties tied weights: re-tie below.
    module.to_empty(device=target)
    with torch.no_grad():
        for m, k, b in saved:
            m._buffers[k] = b.to(target)
    for group in tied.values():
        first_module, first_attr = group[0]
        first = first_module._parameters[first_attr]
        for m, k in group[1:]:
            m._parameters[k] = first
    return module


def _mesh_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        if isinstance(p, DTensor):
            kind = p.device_mesh.device_type
            if kind == "cuda":
                return torch.device("cuda", torch.cuda.current_device())
            return torch.device(kind)
    return torch.device("cpu")


# --------------------------------------------------------------------------- shard indices


def global_indices(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per dimension, the global indices (in stored order) of the elements this rank holds.

    The local shard is the cartesian product of these index lists. For a DTensor each
    dimension's list comes from sharding `arange(n)` with the placements that shard
    that dimension (`src_data_rank=None`: local chunking, no communication), which is
    how DTensor and FSDP2 chunk, `_StridedShard` included."""
    if not isinstance(tensor, DTensor):
        return tuple(torch.arange(n) for n in tensor.shape)
    mesh, ndim = tensor.device_mesh, tensor.ndim
    out = []
    for d, n in enumerate(tensor.shape):
        projected: list[Placement] = []
        for pl in tensor.placements:
            if isinstance(pl, _StridedShard) and pl.dim % max(ndim, 1) == d:
                projected.append(_StridedShard(0, split_factor=pl.split_factor))
            elif isinstance(pl, Shard) and pl.dim % max(ndim, 1) == d:
                projected.append(Shard(0))
            else:
                projected.append(Replicate())
        if all(isinstance(p, Replicate) for p in projected):
            out.append(torch.arange(n))
            continue
        ids = distribute_tensor(torch.arange(n), mesh, projected, src_data_rank=None)
        out.append(ids.to_local().cpu())
    local_shape = tuple(tensor.to_local().shape)
    if tuple(len(i) for i in out) != local_shape:  # pragma: no cover - a torch change
        raise LoadError(f"cannot work out the shard of a tensor placed {tensor.placements}: "
                        f"indices {[len(i) for i in out]}, local shape {list(local_shape)}")
    return tuple(out)


def _hf_indices(entry: WeightEntry) -> tuple[torch.Tensor, ...]:
    """`global_indices` in the Hugging Face (packed) order of the checkpoint."""
    idx = list(global_indices(entry.tensor))
    if entry.fused is not None:
        d = entry.fused.dim
        idx[d] = entry.fused.order(entry.tensor.shape[d])[idx[d]]
    return tuple(idx)


def _runs(idx: torch.Tensor) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive indices: (global start, global stop, local start)."""
    if idx.numel() == 0:
        return []
    breaks = (torch.nonzero(idx[1:] - idx[:-1] != 1).flatten() + 1).tolist()
    starts, stops = [0, *breaks], [*breaks, idx.numel()]
    return [(int(idx[s]), int(idx[s]) + e - s, s) for s, e in zip(starts, stops, strict=True)]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The storage this rank writes: a DTensor's local shard, or the tensor itself."""
    if isinstance(tensor, DTensor):
        return tensor._local_tensor  # what FSDP2 pads and all-gathers from
    return tensor.data


def _check_materialized(entries: Sequence[WeightEntry]) -> None:
    for e in entries:
        if e.tensor.is_meta:
            raise LoadError(f"{e.name} is on the meta device: call materialize(model) first")


# --------------------------------------------------------------------------- random init


def init_rule(name: str, module: nn.Module, tensor: torch.Tensor, std: float) -> tuple[InitKind, float]:
    """The default rule: see the module docstring."""
    adapter = adapter_init(name, tuple(tensor.shape))  # PEFT's rule (runtime.parallel.adapters)
    if adapter is not None:
        return adapter
    attr = name.rsplit(".", 1)[-1]
    kind = type(module).__name__
    if "Norm" in kind and attr == "weight":
        return ("zeros", 0.0) if _scales_by_one_plus_weight(type(module)) else ("ones", 0.0)
    if attr == "bias" or tensor.ndim < 2:
        return "zeros", 0.0
    return "normal", std


_ONE_PLUS: dict[type, bool] = {}


def _scales_by_one_plus_weight(cls: type) -> bool:
    """Whether a norm's forward multiplies by `1 + weight` (Gemma-style norms)."""
    if cls not in _ONE_PLUS:
        try:
            source = inspect.getsource(cls.forward)  # type: ignore[attr-defined]
        except (OSError, TypeError, AttributeError):
            source = ""
        flat = "".join(source.split())
        _ONE_PLUS[cls] = any(s in flat for s in ("1.0+self.weight", "1+self.weight",
                                                 "self.weight+1.0", "self.weight+1"))
    return _ONE_PLUS[cls]


def _block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.blake2b(f"meshplan-init/{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def init_random(model: nn.Module | Applied, seed: int, *, program: Program | None = None,
                std: float | None = None, rule: InitRule | None = None,
                block_elements: int = BLOCK_ELEMENTS) -> None:
    """Initialise every parameter's local shard as a single-process copy would be
    initialised (see the module docstring). Needs no communication.

    `std` overrides `config.initializer_range`; `rule(name, module, tensor, std)` the
    default `init_rule`; `block_elements` the block size (values depend on it)."""
    if block_elements < 1:
        raise ValueError(f"block_elements must be ≥ 1, got {block_elements}")
    module, fused = model_and_fused(model, program)
    reshard(module)
    entries = weight_entries(module, fused)
    _check_materialized(entries)
    _init_entries(module, entries, seed, std=std, rule=rule, block_elements=block_elements)


def _init_entries(module: nn.Module, entries: Sequence[WeightEntry], seed: int, *, std: float | None = None,
                  rule: InitRule | None = None, block_elements: int = BLOCK_ELEMENTS) -> None:
    if std is None:
        std = float(getattr(getattr(module, "config", None), "initializer_range", 0.02))
    choose = rule or init_rule
    with torch.no_grad():
        for e in entries:
            tensor = e.tensor
            kind, scale = choose(e.name, e.module, tensor, std)
            if is_quantized(tensor):  # a 4-bit base is quantised whole (runtime.parallel.quantize)
                _init_quantized(e, seed, kind, scale, block_elements)
                continue
            local = _local(tensor)
            if kind == "zeros":
                local.zero_()
            elif kind == "ones":
                local.fill_(1.0)
            elif kind in ("normal", "uniform"):
                _random_into(local, _hf_indices(e), tuple(tensor.shape), e.name, seed, kind, scale,
                             block_elements)
            else:
                raise ValueError(f"init rule for {e.name} returned {kind!r}")


def _init_quantized(e: WeightEntry, seed: int, kind: InitKind, scale: float, block_elements: int) -> None:
    """An NF4 weight: the full tensor's values (one weight at a time), quantised whole."""
    shape = tuple(e.tensor.shape)
    full = torch.zeros(shape, dtype=torch.float32)
    if kind == "ones":
        full.fill_(1.0)
    elif kind in ("normal", "uniform"):
        _random_into(full, tuple(torch.arange(n) for n in shape), shape, e.name, seed, kind, scale,
                     block_elements)
    elif kind != "zeros":
        raise ValueError(f"init rule for {e.name} returned {kind!r}")
    store_quantized(e.module, e.attr, full, name=e.name)


def _draw(shape: tuple[int, ...], kind: InitKind, scale: float, g: torch.Generator) -> torch.Tensor:
    """fp32 values: normal(0, scale), or uniform(-scale, scale)."""
    values = torch.empty(shape, dtype=torch.float32)
    if kind == "uniform":
        return values.uniform_(-scale, scale, generator=g)
    return values.normal_(0.0, scale, generator=g)


def _random_into(local: torch.Tensor, idx: tuple[torch.Tensor, ...], shape: tuple[int, ...],
                 name: str, seed: int, kind: InitKind, scale: float, block_elements: int) -> None:
    if local.numel() == 0:
        return
    if not shape:  # a scalar parameter: one block of one element
        g = torch.Generator().manual_seed(_block_seed(seed, name, 0))
        local.copy_(_draw((), kind, scale, g))
        return
    row = math.prod(shape[1:])
    block_rows = max(1, block_elements // max(row, 1))
    rows = idx[0]
    blocks = torch.div(rows, block_rows, rounding_mode="floor")
    full_cols = [i.numel() == n and bool((i == torch.arange(n)).all())
                 for i, n in zip(idx, shape, strict=True)]
    for b in torch.unique(blocks).tolist():
        where = torch.nonzero(blocks == b).flatten()
        start = b * block_rows
        count = min(block_rows, shape[0] - start)
        g = torch.Generator().manual_seed(_block_seed(seed, name, b))
        values = _draw((count, *shape[1:]), kind, scale, g)
        piece = values.index_select(0, rows[where] - start)
        for d in range(1, len(shape)):
            if not full_cols[d]:
                piece = piece.index_select(d, idx[d])
        local.index_copy_(0, where.to(local.device), piece.to(local.device, local.dtype))


# --------------------------------------------------------------------------- safetensors


def checkpoint_files(path: str | Path) -> dict[str, Path]:
    """Tensor name → safetensors file, for a Hugging Face directory (index or single
    file, or every `*.safetensors` in it), an index JSON, or one `.safetensors` file."""
    p = Path(path)
    if p.is_file():
        if p.name.endswith(".index.json"):
            return _from_index(p)
        if p.suffix == ".safetensors":
            return dict.fromkeys(_keys(p), p)
        raise LoadError(f"{p} is not a .safetensors file or a safetensors index")
    if not p.is_dir():
        raise LoadError(f"{p} does not exist")
    if (p / INDEX_FILE).is_file():
        return _from_index(p / INDEX_FILE)
    if (p / SINGLE_FILE).is_file():
        return dict.fromkeys(_keys(p / SINGLE_FILE), p / SINGLE_FILE)
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise LoadError(f"{p} holds no safetensors weights (expected {SINGLE_FILE} or {INDEX_FILE})")
    out: dict[str, Path] = {}
    for f in files:
        for k in _keys(f):
            if k in out:
                raise LoadError(f"tensor {k} is in both {out[k].name} and {f.name} in {p}")
            out[k] = f
    return out


def _keys(file: Path) -> list[str]:
    try:
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    except Exception as e:
        raise LoadError(f"cannot read {file}: {type(e).__name__}: {e}") from e


def _from_index(index: Path) -> dict[str, Path]:
    try:
        data = json.loads(index.read_text("utf-8"))
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LoadError(f"{index} is not a safetensors index: {type(e).__name__}: {e}") from e
    out = {str(k): index.parent / str(v) for k, v in weight_map.items()}
    for f in sorted(set(out.values())):
        if not f.is_file():
            name = next(k for k, v in out.items() if v == f)
            raise LoadError(f"{index.name} maps {name} (and maybe more) to {f.name}, which does "
                            f"not exist in {index.parent}")
    return out


def _match(entries: Sequence[WeightEntry], names: Sequence[str], model: nn.Module, where: str,
           strict: bool) -> tuple[list[tuple[WeightEntry, str]], list[str], list[WeightEntry]]:
    """Pair each entry with a source name; (pairs, persistent buffers not in the source,
    adapter tensors not in the source).

    A tensor is found under any of its names (tied), or under a name without the
    model's `base_model_prefix` (`wte.weight` for GPT-2's `transformer.wte.weight`, as
    on the Hub). Names matching the model's `_keys_to_ignore_on_load_unexpected` and
    non-persistent buffers (old checkpoints hold `inv_freq`) are not unexpected."""
    available = set(names)
    prefix = getattr(model, "base_model_prefix", "")
    prefix = f"{prefix}." if isinstance(prefix, str) and prefix else ""
    pairs: list[tuple[WeightEntry, str]] = []
    missing: list[str] = []
    skipped: list[str] = []
    adapters: list[WeightEntry] = []
    known: set[str] = set()
    for e in entries:
        names_of = [*e.aliases, *(a[len(prefix):] for a in e.aliases if prefix and a.startswith(prefix))]
        present = [a for a in names_of if a in available]
        if not present:
            if e.is_buffer:
                skipped.append(e.name)
            elif adapter_side(e.name) is not None:
                adapters.append(e)
            else:
                missing.append(e.name)
            continue
        known.update(present)
        pairs.append((e, present[0]))
    ignore = [re.compile(str(p)) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    unexpected = sorted(k for k in available - known - _nonpersistent_names(model)
                        if not any(p.search(k) for p in ignore))
    if missing:
        raise LoadError(f"{len(missing)} model tensor(s) missing from {where}: {_few(missing)}")
    if strict and unexpected:
        raise LoadError(f"{where} holds {len(unexpected)} tensor(s) the model does not have: "
                        f"{_few(unexpected)} (strict=False ignores them)")
    return pairs, skipped, adapters


def _few(names: Sequence[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f", … ({len(names) - n} more)" if len(names) > n else "")


def load_sharded(model: nn.Module | Applied, path: str | Path, *, program: Program | None = None,
                 strict: bool = True, seed: int = 0) -> LoadReport:
    """Read each parameter's local shard (and persistent buffers the files hold) from a
    safetensors checkpoint, slicing only this rank's elements. Needs no communication.
    Adapter tensors the files lack get `init_random(model, seed)`'s values."""
    module, fused = model_and_fused(model, program)
    files = checkpoint_files(path)
    reshard(module)
    entries = weight_entries(module, fused, buffers=True)
    _check_materialized(entries)
    pairs, skipped, adapters = _match(entries, list(files), module, str(path), strict)
    report = LoadReport(Path(path), skipped=tuple(skipped), initialised=tuple(e.name for e in adapters))
    _init_entries(module, adapters, seed)
    with ExitStack() as stack, torch.no_grad():
        handles: dict[Path, Any] = {}
        for e, key in pairs:
            file = files[key]
            if file not in handles:
                try:
                    handles[file] = stack.enter_context(safe_open(str(file), framework="pt"))
                except Exception as exc:
                    raise LoadError(f"cannot open {file}: {type(exc).__name__}: {exc}") from exc
            try:
                view = handles[file].get_slice(key)
                shape = tuple(view.get_shape())
            except Exception as exc:
                raise LoadError(f"{key}: cannot read it from {file}: {type(exc).__name__}: {exc}") from exc
            want = tuple(e.tensor.shape)
            if shape != want:
                raise LoadError(f"{key} in {file} has shape {list(shape)}, but the model's {e.name} "
                                f"is {list(want)}")
            local = _local(e.tensor)
            if is_quantized(e.tensor):  # a 4-bit base is quantised whole: read all of it
                store_quantized(e.module, e.attr, handles[file].get_tensor(key), name=e.name)
                read = math.prod(shape)
            else:
                read = _read_box(view, handles[file], key, _hf_indices(e), local)
            report.files[e.name] = file.name
            report.elements_read[e.name] = read
            report.local_elements[e.name] = local.numel()
    return report


def _read_box(view: Any, handle: Any, key: str, idx: tuple[torch.Tensor, ...],
              local: torch.Tensor) -> int:
    """Copy the elements at `idx` (one index list per dim) into `local`; elements read."""
    if local.numel() == 0:
        return 0
    if not idx:  # a scalar: nothing to slice
        local.copy_(handle.get_tensor(key))
        return 1
    read = 0
    for box in itertools.product(*(_runs(i) for i in idx)):
        piece = view[tuple(slice(a, b) for a, b, _ in box)]
        local[tuple(slice(o, o + b - a) for a, b, o in box)].copy_(piece)
        read += piece.numel()
    return read


# --------------------------------------------------------------------------- broadcast


class _Reader:
    """Tensors of a source on the reading rank: a state dict, safetensors, or torch.save."""

    def __init__(self, source: Mapping[str, torch.Tensor] | str | Path) -> None:
        self._stack = ExitStack()
        self._mapping: Mapping[str, torch.Tensor] | None = None
        self._files: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        if isinstance(source, Mapping):
            self._mapping = source
            return
        p = Path(source)
        if p.is_file() and p.suffix in (".bin", ".pt", ".pth"):
            try:
                loaded = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
                loaded = torch.load(p, map_location="cpu", weights_only=True)
            if not isinstance(loaded, Mapping):
                raise LoadError(f"{p} does not hold a state dict")
            self._mapping = loaded
        else:
            self._files = checkpoint_files(p)

    def names(self) -> dict[str, list[int]]:
        if self._mapping is not None:
            return {k: list(v.shape) for k, v in self._mapping.items() if isinstance(v, torch.Tensor)}
        out = {}
        for k, f in self._files.items():
            out[k] = list(self._handle(f).get_slice(k).get_shape())
        return out

    def get(self, key: str) -> torch.Tensor:
        if self._mapping is not None:
            return self._mapping[key]
        return self._handle(self._files[key]).get_tensor(key)

    def where(self, key: str) -> str:
        return str(self._files.get(key, "the state dict"))

    def _handle(self, file: Path) -> Any:
        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(safe_open(str(file), framework="pt"))
        return self._handles[file]

    def close(self) -> None:
        self._stack.close()


def load_broadcast(model: nn.Module | Applied,
                   source: Mapping[str, torch.Tensor] | str | Path | None, *,
                   program: Program | None = None, src: int = 0, strict: bool = True,
                   seed: int = 0) -> LoadReport:
    """Rank `src` reads `source` and broadcasts it tensor by tensor; each rank keeps its
    shard. Other ranks may pass `source=None`. A collective over the default group.
    Adapter tensors the source lacks get `init_random(model, seed)`'s values."""
    module, fused = model_and_fused(model, program)
    reshard(module)
    entries = weight_entries(module, fused, buffers=True)
    _check_materialized(entries)
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    reader: _Reader | None = None
    header: Any = None
    if rank == src:
        try:
            if source is None:
                raise LoadError("load_broadcast: the source rank got source=None")
            reader = _Reader(source)
            header = ("ok", reader.names())
        except Exception as exc:
            header = ("error", f"rank {src} cannot read {source}: {type(exc).__name__}: {exc}")
    if distributed:
        box = [header]
        dist.broadcast_object_list(box, src=src)
        header = box[0]
    if header[0] != "ok":
        raise LoadError(header[1])
    shapes: dict[str, list[int]] = header[1]
    where = str(source) if rank == src else f"the source on rank {src}"
    pairs, skipped, adapters = _match(entries, list(shapes), module, where, strict)
    for e, key in pairs:
        if list(shapes[key]) != list(e.tensor.shape):
            raise LoadError(f"{key} in {where} has shape {shapes[key]}, but the model's {e.name} "
                            f"is {list(e.tensor.shape)}")
    report = LoadReport(Path(source) if isinstance(source, str | Path) else None, skipped=tuple(skipped),
                        initialised=tuple(e.name for e in adapters))
    _init_entries(module, adapters, seed)  # every rank draws its own shard: no communication
    failure: str | None = None
    try:
        with torch.no_grad():
            for e, key in pairs:
                local = _local(e.tensor)
                full = torch.empty(tuple(e.tensor.shape), dtype=local.dtype, device=local.device)
                if reader is not None:
                    try:
                        if failure is None:
                            full.copy_(reader.get(key))
                    except Exception as exc:  # keep broadcasting: the others are waiting
                        failure = f"rank {src} cannot read {key} from {reader.where(key)}: {exc}"
                if distributed:
                    dist.broadcast(full, src=src)
                piece = full
                for d, i in enumerate(_hf_indices(e)):
                    if i.numel() != full.shape[d] or not bool((i == torch.arange(full.shape[d])).all()):
                        piece = piece.index_select(d, i.to(full.device))
                if is_quantized(e.tensor):  # a 4-bit base is quantised whole (runtime.parallel.quantize)
                    store_quantized(e.module, e.attr, full, name=e.name)
                else:
                    local.copy_(piece)
                report.files[e.name] = reader.where(key) if reader is not None else f"rank {src}"
                report.elements_read[e.name] = full.numel() if reader is not None else 0
                report.local_elements[e.name] = local.numel()
                del full, piece
    finally:
        if reader is not None:
            reader.close()
    if distributed:
        box = [failure]
        dist.broadcast_object_list(box, src=src)
        failure = box[0]
    if failure is not None:
        raise LoadError(failure)
    return report


# --------------------------------------------------------------------------- gathering


@contextmanager
def _quiet_redistribute() -> Iterator[None]:
    """Gathering a `_StridedShard` parameter takes two all-gathers, and DTensor logs a
    warning per parameter saying so; silence it while gathering."""
    logger = logging.getLogger("torch.distributed.tensor._redistribute")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def full_state_dict(model: nn.Module | Applied, *, program: Program | None = None,
                    fused: Mapping[str, FusedRows] | None = None,
                    buffers: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, full CPU tensor) per parameter and persistent buffer.

    A collective (`full_tensor()` per DTensor): every rank iterates to the end. `fused`
    overrides the fused rows found from the program or the hooks."""
    module, found = model_and_fused(model, program)
    fused = found if fused is None else fused
    reshard(module)
    for e in weight_entries(module, fused, buffers=buffers):
        yield e.name, full_tensor(e)


def full_tensor(entry: WeightEntry) -> torch.Tensor:
    """One entry's whole tensor on the CPU, in the Hugging Face row order (a collective
    for a DTensor: every rank of its mesh calls it)."""
    with torch.no_grad(), _quiet_redistribute():
        t = entry.tensor
        full = t.full_tensor() if isinstance(t, DTensor) else t.detach().clone()
        if entry.fused is not None:
            order = entry.fused.order(full.shape[entry.fused.dim])
            full = full.index_select(entry.fused.dim, torch.argsort(order).to(full.device))
        return full.detach().cpu()
