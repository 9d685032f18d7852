"""Adapter (PEFT LoRA) checkpoints: adapter-only save / resume of a sharded model, and
export to PEFT's format or to a Hugging Face model with the adapters merged.

    save_adapters(checkpoint_dir(root, step), applied, optimizer, step, loader_state)
    step, loader_state = load_adapters(directory, applied, optimizer)
    export_adapter(applied, "out/adapter")          # or export_adapter(directory, …): no model
    export_merged(applied, "out/merged")

Names. A PEFT-adapted module `<fqn>` holds `<fqn>.base_layer.weight` (frozen) and
`<fqn>.lora_A.default.weight`, `<fqn>.lora_B.default.weight` (trainable; adapter name
`default`, `checkpoint.ADAPTER_NAME`).

Guarantees:

- `save_adapters` is `checkpoint.save(..., adapters_only=True)`: the checkpoint (format
  `meshplan-ckpt/2`, atomic, checksummed, no pickle) holds the trainable parameters and
  their optimizer state and no base weight. Each rank writes its own DTensor shards (FSDP2
  or tensor-parallel), with their global offsets: no shard is dropped, whatever the
  layout. Its marker records the PEFT configuration (`checkpoint.peft_record`).
  `load_adapters` restores them into a freshly built model (same base, same targets) and
  its optimizer: training then continues exactly as it would have.
- `export_adapter(source, out_dir)` writes what `PeftModel.save_pretrained` writes:
  `adapter_model.safetensors`, PEFT's key names (`base_model.model.<fqn>.lora_A.weight`:
  the adapter name dropped, as PEFT's save does) and full tensors in Hugging Face row
  order; and `adapter_config.json`, the recorded `LoraConfig.to_dict()` with
  `inference_mode` true, `base_model_name_or_path`, and PEFT's `auto_mapping` when the
  config has no task type (the set `target_modules` sorted, so the bytes are fixed).
  `source` is a live model (a collective: `full_tensor()` per adapter tensor, rank 0
  writes) or a checkpoint directory (read in this process, every rank's shards joined;
  no model, no process group). Either way the same bytes.
- `export_merged(model, out_dir)` writes the base with every adapter merged,
  W + (alpha / r)·B·A (PEFT's `merge`), under the base's Hugging Face names
  (`base_layer` dropped) through `checkpoint.export_hf`: `model.safetensors` (sharded
  above the limit) and `config.json`, loadable by `from_pretrained`. A collective on a
  sharded model (one full tensor at a time).
- Outputs go to `<out_dir>.tmp-export` and are renamed when complete; an existing
  `out_dir` is refused unless `overwrite`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from meshplan.planner.program import Program

from ..parallel.apply import Applied
from .checkpoint import (
    ADAPTER_NAME,
    CheckpointError,
    _agree,
    _describe,
    _prepare_agreed,
    _rank_world,
    _replace_dir,
    load,
    peft_record,
    read_marker,
    read_tensors,
    save,
)
from .loading import canonical_name, full_tensor, model_and_fused, reshard, weight_entries

__all__ = [
    "ADAPTER_FILE",
    "CONFIG_FILE",
    "PEFT_PREFIX",
    "AdapterError",
    "adapted_names",
    "adapter_config_json",
    "export_adapter",
    "export_merged",
    "inject_recorded",
    "load_adapters",
    "load_tensors",
    "merge_adapters",
    "peft_name",
    "recorded",
    "save_adapters",
]

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # what PeftModel's state dict puts before the base's names

# `<fqn>.lora_A.default.weight`, `<fqn>.lora_embedding_A.default`: a LoRA tensor of adapter `default`.
_LORA = re.compile(rf"^(?P<head>.+\.lora_[A-Za-z_]+)\.{ADAPTER_NAME}(?P<tail>(\..+)?)$")
_BASE = ".base_layer."


class AdapterError(CheckpointError):
    """A model or checkpoint without (usable) adapters, or adapters that cannot be exported."""


# --------------------------------------------------------------------------- names and records


def peft_name(name: str) -> str | None:
    """PEFT's saved name of an adapter tensor (None: not one): the adapter name dropped,
    `base_model.model.` put in front, as `get_peft_model_state_dict` and `save_pretrained` do."""
    m = _LORA.match(name)
    return None if m is None else PEFT_PREFIX + m["head"] + m["tail"]


def recorded(directory: str | Path) -> dict[str, Any]:
    """The PEFT record of a checkpoint's marker; `AdapterError` when it holds no adapter."""
    d = Path(directory)
    marker = read_marker(d)
    if marker is None:
        raise CheckpointError(f"{d} is not a complete meshplan checkpoint (no valid marker)")
    record = marker.get("adapters")
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise AdapterError(f"{d} holds no adapters (the model it saved carried no PEFT adapter)")
    return record


def _record_of(module: nn.Module) -> dict[str, Any]:
    record = peft_record(module)
    if record is None:
        raise AdapterError("the model carries no PEFT adapter")
    return record


def adapter_config_json(record: Mapping[str, Any], base_model_name_or_path: str | None = None) -> str:
    """`adapter_config.json` as `PeftModel.save_pretrained` writes it (inference mode on,
    the base's name, `auto_mapping` without a task type; keys sorted, indent 2)."""
    config = dict(record["config"])
    config["inference_mode"] = True
    name = base_model_name_or_path or config.get("base_model_name_or_path") or record.get("name_or_path")
    config["base_model_name_or_path"] = name or None
    if config.get("task_type") is None and record.get("model_class"):
        config["auto_mapping"] = {"base_model_class": record["model_class"],
                                  "parent_library": record.get("model_module")}
    return json.dumps(config, indent=2, sort_keys=True)


# --------------------------------------------------------------------------- checkpoints


def save_adapters(directory: str | Path, model: nn.Module | Applied, optimizer: torch.optim.Optimizer | None,
                  step: int, dataloader_state: Any = None, *, program: Program | None = None,
                  overwrite: bool = False) -> Path:
    """An adapter-only checkpoint (see the module docstring). A collective."""
    return save(directory, model, optimizer, step, dataloader_state, program=program,
                overwrite=overwrite, adapters_only=True)


def load_adapters(directory: str | Path, model: nn.Module | Applied,
                  optimizer: torch.optim.Optimizer | None = None, *,
                  program: Program | None = None) -> tuple[int, Any]:
    """Restore an adapter-only checkpoint; returns (step, this rank's loader state). A collective."""
    d = Path(directory)
    marker = read_marker(d)
    if marker is not None and not marker.get("adapters_only", False):
        raise AdapterError(f"{d} is a full checkpoint, not an adapter-only one: use checkpoint.load")
    return load(d, model, optimizer, program=program)


# --------------------------------------------------------------------------- export: PEFT's format


def export_adapter(source: nn.Module | Applied | str | Path, out_dir: str | Path, *,
                   base_model_name_or_path: str | None = None, program: Program | None = None,
                   overwrite: bool = False) -> Path:
    """Write `adapter_model.safetensors` + `adapter_config.json` (see the module docstring)."""
    final = Path(out_dir)
    tmp = final.with_name(f"{final.name}.tmp-export")
    rank, _ = _rank_world()
    tensors: dict[str, torch.Tensor] = {}
    record: dict[str, Any] = {}
    error = None
    if isinstance(source, (str, Path)):
        try:
            record = recorded(source)
            tensors = {peft: t for name, t in read_tensors(source, lambda n: peft_name(n) is not None).items()
                       if (peft := peft_name(name)) is not None}
        except CheckpointError as exc:
            error = str(exc)
        _agree(error, f"reading the adapters of {source}")
    else:
        module, _ = model_and_fused(source, program)
        try:
            record = _record_of(module)
        except CheckpointError as exc:
            error = str(exc)
        _agree(error, f"exporting {final}")
        tensors = _gathered_adapters(module, program, keep=rank == 0)
    error = "no adapter tensor found" if rank == 0 and not tensors else None
    _agree(error, f"exporting {final}")
    _prepare_agreed(final, tmp, overwrite, rank)
    error = None
    if rank == 0:
        try:
            save_file({k: t.contiguous() for k, t in sorted(tensors.items())}, str(tmp / ADAPTER_FILE),
                      metadata={"format": "pt"})
            (tmp / CONFIG_FILE).write_text(adapter_config_json(record, base_model_name_or_path), "utf-8")
            _replace_dir(tmp, final, overwrite)
        except Exception as exc:
            error = _describe(exc)
    _agree(error, f"exporting {final}")
    return final


def _gathered_adapters(module: nn.Module, program: Program | None, keep: bool) -> dict[str, torch.Tensor]:
    """Every adapter tensor, full (`full_tensor()`), by PEFT name; a collective that
    gathers the adapters only, never the base. Fused rows (a lora_B under a fused colwise
    base) are un-permuted as `full_state_dict` does."""

    _, fused = model_and_fused(module, program)
    reshard(module)
    out: dict[str, torch.Tensor] = {}
    for e in weight_entries(module, fused):
        peft = peft_name(e.name)
        if peft is None:
            continue
        full = full_tensor(e)  # a collective: every rank gathers, rank 0 keeps
        if keep:
            out[peft] = full
    return out


# --------------------------------------------------------------------------- export: merged


def _scaling(config: Mapping[str, Any]) -> float:
    """PEFT's LoRA scaling: alpha / r (alpha / √r with rsLoRA)."""
    unsupported = [k for k in ("rank_pattern", "alpha_pattern") if config.get(k)]
    if config.get("use_dora"):
        unsupported.append("use_dora")
    if unsupported:
        raise AdapterError(f"merging LoRA with {', '.join(unsupported)} is not supported")
    r, alpha = config["r"], config["lora_alpha"]
    return float(alpha) / (math.sqrt(r) if config.get("use_rslora") else float(r))


def merge_adapters(record: Mapping[str, Any], adapted: Iterable[str]
                   ) -> Callable[[Iterator[tuple[str, torch.Tensor]]], Iterator[tuple[str, torch.Tensor]]]:
    """A rewrite of a model's (name, full tensor) stream that merges the adapter of each
    module in `adapted` (their names) into its base weight (W + scaling·B·A, transposed
    for `fan_in_fan_out` bases such as GPT-2's Conv1D) and names every tensor as the
    unadapted model does (`base_layer` dropped)."""
    config = record["config"]
    scaling = _scaling(config)
    transpose = bool(config.get("fan_in_fan_out"))
    modules = set(adapted)
    matrices = {"A": f".lora_A.{ADAPTER_NAME}.weight", "B": f".lora_B.{ADAPTER_NAME}.weight"}

    def part_of(name: str) -> tuple[str, str] | None:
        for part, suffix in matrices.items():
            if name.endswith(suffix):
                return name[: -len(suffix)], part
        for suffix in (".base_layer.weight", ".weight"):
            if name.endswith(suffix) and name[: -len(suffix)] in modules:
                return name[: -len(suffix)], "W"
        return None

    def rewrite(stream: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        pending: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in stream:
            found = part_of(name)
            if found is None:
                if _LORA.match(name):
                    raise AdapterError(f"{name}: only LoRA on linear layers (lora_A / lora_B) can be merged")
                yield name.replace(_BASE, "."), tensor
                continue
            fqn, part = found
            if fqn not in modules:
                raise AdapterError(f"{name}: an adapter of {fqn}, which is not among the adapted modules")
            parts = pending.setdefault(fqn, {})
            parts[part] = tensor
            if len(parts) == 3:
                del pending[fqn]
                w, a, b = parts["W"], parts["A"], parts["B"]
                delta = b.to(torch.float32) @ a.to(torch.float32)
                if transpose:
                    delta = delta.T
                # PEFT's merge: W += (B @ A) * scaling, in the weight's dtype (fp32 here first).
                yield f"{fqn}.weight", (w.to(torch.float32) + delta * scaling).to(w.dtype)
        if pending:
            raise AdapterError(f"adapted modules without base or adapter tensors: {sorted(pending)[:3]}")

    return rewrite


def adapted_names(model: nn.Module) -> list[str]:
    """The names of the modules carrying a LoRA adapter (from their lora_A weights)."""
    suffix = f".lora_A.{ADAPTER_NAME}.weight"
    return [e.name[: -len(suffix)] for e in weight_entries(model) if e.name.endswith(suffix)]


def _refuse_tied(module: nn.Module, adapted: set[str]) -> None:
    """Merging an adapter into one name of a tied tensor would change the other name too
    (the compiler warns of it: W108); the merged model would not be the trained one."""
    for entry in weight_entries(module):
        owners = {a.rsplit(".", 1)[0].removesuffix(".base_layer") for a in entry.aliases}
        if len(entry.aliases) > 1 and owners & adapted:
            names = ", ".join(f"`{a}`" for a in entry.aliases)
            raise AdapterError(f"cannot merge: {names} are one tied tensor and "
                               f"`{sorted(owners & adapted)[0]}` carries an adapter; merging would change "
                               "every name of it. Export the adapter unmerged (--adapter), or untie the weights")


def export_merged(model: nn.Module | Applied, out_dir: str | Path, *, program: Program | None = None,
                  dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30,
                  overwrite: bool = False) -> Path:
    """The base with its adapters merged, as a Hugging Face directory (see the module docstring)."""
    from .checkpoint import export_hf

    module, _ = model_and_fused(model, program)
    error, rewrite = None, None
    try:
        adapted = adapted_names(module)
        _refuse_tied(module, set(adapted))
        rewrite = merge_adapters(_record_of(module), adapted)
    except CheckpointError as exc:
        error = str(exc)
    _agree(error, f"exporting {out_dir}")
    return export_hf(model, out_dir, program=program, dtype=dtype, max_shard_bytes=max_shard_bytes,
                     overwrite=overwrite, rewrite=rewrite)


# --------------------------------------------------------------------------- one process, from a checkpoint


def inject_recorded(model: nn.Module, record: Mapping[str, Any]) -> nn.Module:
    """Inject the recorded LoRA adapter into `model` in place (PEFT, adapter `default`):
    the model a checkpoint was saved from, rebuilt in one process."""
    from peft import LoraConfig, inject_adapter_in_model

    config = dict(record["config"])
    known = set(LoraConfig.__dataclass_fields__)
    config = {k: v for k, v in config.items() if k in known}
    config["inference_mode"] = False
    lora = LoraConfig(**config)
    return inject_adapter_in_model(lora, model, adapter_name=ADAPTER_NAME)


def load_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor], *, adapters_only: bool) -> None:
    """Copy full tensors (`read_tensors` of a checkpoint) into an unsharded model: every
    trainable parameter (`adapters_only`) or every parameter and persistent buffer. A
    tensor missing, left over, or of another shape raises `AdapterError`."""
    tensors = {canonical_name(k): v for k, v in tensors.items()}  # DCP keys keep `base_layer`
    entries = weight_entries(model, buffers=not adapters_only)
    if adapters_only:
        entries = [e for e in entries if not e.is_buffer and e.tensor.requires_grad]
    used: set[str] = set()
    missing: list[str] = []
    with torch.no_grad():
        for e in entries:
            name = next((n for n in e.aliases if n in tensors), None)
            if name is None:
                missing.append(e.name)
                continue
            source, target = tensors[name], e.tensor
            if tuple(source.shape) != tuple(target.shape):
                raise AdapterError(f"{name}: the checkpoint holds {tuple(source.shape)}, the model "
                                   f"{tuple(target.shape)}")
            target.copy_(source)
            used.add(name)
    extra = sorted(set(tensors) - used)
    if missing or extra:
        raise AdapterError("the checkpoint does not fit the model: "
                           + "; ".join(part for part in (f"missing {missing[:3]}" if missing else "",
                                                         f"not in the model {extra[:3]}" if extra else "")
                                       if part))

