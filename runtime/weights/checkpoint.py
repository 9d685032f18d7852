"""Checkpoints: atomic save / resume of sharded training state that never runs code on
load and detects damage, and export of a consolidated Hugging Face directory.

    save(checkpoint_dir(root, step), applied, optimizer, step, sampler.state_dict())
    found = load_latest(root, applied, optimizer)        # (directory, step, loader state) or None
    export_hf(applied, "out/hf")

Layout of a checkpoint directory (format `meshplan-ckpt/2`):

    tensors/shard-0000R-model-00001-of-00001.safetensors   rank R-1's shards (DCP, safetensors)
    state.json                                             every non-tensor value (JSON)
    dataloader/rank-0000R.json                             each rank's data-loader state (JSON)
    COMPLETE                                               marker: step, layout, sha256 of every file

Guarantees:

- Nothing is unpickled, ever. The tensors go through `torch.distributed.checkpoint`
  (DCP) with its safetensors storage (`HuggingFaceStorageWriter(save_distributed=True)`:
  each rank writes only its own shards, with their global offsets in the file's
  safetensors metadata); DCP's global metadata is rebuilt on load from the safetensors
  headers (`HuggingFaceStorageReader`), so no `.metadata` pickle is written or read. The
  values that are not tensors (optimizer hyper-parameters, loader positions) are JSON.
  A directory in the older pickle-based format, or one holding any file its marker does
  not list (a planted `.metadata`, say), is refused before anything in it is read.
- `save(directory, model, optimizer, step, dataloader_state)` is atomic: everything is
  written into `<directory>.tmp-<step>`; only after *every* rank reported success are
  the files' sha256 digests computed (each rank hashes a share) and does rank 0 write
  the completion marker `COMPLETE` (a temporary name, fsynced, renamed) and rename the
  directory to its final name (fsyncing the parent). Success is agreed with one
  all-gather per phase, so an error on one rank makes every rank raise
  `CheckpointError` (naming the failed ranks) instead of hanging. A crash at any
  earlier point leaves at most a `*.tmp-<step>` directory without a marker.
- `verify(directory)` re-hashes every file (each rank a share) and returns the problems
  (a file changed, missing or unexpected), the same list on every rank.
- `latest(root)` is the complete checkpoint (final name, parseable marker) with the
  highest step under `root`, or `None`; `load_latest(root, …)` walks the complete ones
  from the highest step down, skips a damaged one with a warning naming the file, and
  raises `CheckpointError` when checkpoints exist but none is intact.
- `load(directory, model, optimizer)` refuses a directory without a valid marker or
  that fails `verify`, restores the model's and the optimizer's state in place (bitwise;
  DCP reshards onto another mesh or world size) and returns `(step, this rank's
  data-loader state)`. Any failure while reading (DCP raises `CheckpointException`, a
  `BaseException`) becomes a `CheckpointError` on every rank. Parameters holding fused
  rows are stored rank-major for the tensor-parallel size that saved them; the marker
  records that layout and `load` refuses a model whose fused layout differs (convert
  through `export_hf` + `load_sharded` instead).
- `save(..., adapters_only=True)` keeps only the trainable parameters (a PEFT model's
  adapters: `StateDictOptions(ignore_frozen_params=True)`) and their optimizer state,
  every rank writing its own shards as above; the marker says `adapters_only` and
  records the model's PEFT configuration (`adapters`, also in a full checkpoint of an
  adapted model), so that the checkpoint can be exported without the plan
  (`runtime.weights.adapters`). `load` of such a checkpoint restores the trainable
  parameters and their optimizer state and leaves the frozen base as it is; it refuses
  a model whose trainable parameters are not exactly the saved ones.
- `export_hf(model, out_dir)` gathers full tensors (`full_tensor()`, one parameter at
  a time), un-permutes fused rows, keeps one name per tied tensor (as
  `save_pretrained` does), and writes `model.safetensors` (or
  `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json` above
  `max_shard_bytes`) and `config.json` from the model's config, on rank 0. It writes
  into `<out_dir>.tmp-export` and renames it when complete. Values are bitwise the
  model's (cast only when `dtype` is given).

Every function here is a collective when `torch.distributed` is initialised (all ranks
call it with the same arguments) and works in a single process without it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule

from meshplan.planner.program import Program

from ..parallel.apply import Applied
from .loading import INDEX_FILE, SINGLE_FILE, FusedRows, full_state_dict, model_and_fused

__all__ = [
    "ADAPTER_NAME",
    "FORMAT",
    "MARKER",
    "CheckpointError",
    "checkpoint_dir",
    "complete_checkpoints",
    "export_hf",
    "is_complete",
    "latest",
    "load",
    "load_latest",
    "peft_record",
    "read_marker",
    "read_tensors",
    "save",
    "verify",
]

MARKER = "COMPLETE"
FORMAT = "meshplan-ckpt/2"
# Formats whose metadata is a pickle: recognised only to be refused by name.
_PICKLED_FORMATS = ("meshplan-dcp/1",)
_TENSORS_DIR = "tensors"
_STATE_FILE = "state.json"
_LOADER_DIR = "dataloader"
_SEP = "/"  # joins state-dict paths into one key (parameter names use dots, never slashes)
ADAPTER_NAME = "default"  # the one PEFT adapter a meshplan model carries


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, found or read."""


# --------------------------------------------------------------------------- helpers


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextmanager
def _single_process_quietly() -> Iterator[None]:
    """DCP warns that it assumes a single process when there is no process group: that
    is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*unavailable or uninitialized")
        yield


def _rank_world() -> tuple[int, int]:
    if _distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(value: Any) -> list[Any]:
    """Every rank's `value` (an all-gather: every rank must call it)."""
    if not _distributed():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _failures(error: str | None) -> list[tuple[int, str]]:
    """Every rank's error from this phase (an all-gather: every rank must call it)."""
    return [(r, e) for r, e in enumerate(_gather(error)) if e]


def _agree(error: str | None, what: str) -> None:
    """Raise `CheckpointError` on every rank if this phase failed on any rank."""
    failed = _failures(error)
    if failed:
        detail = "; ".join(f"rank {r}: {e}" for r, e in failed[:4])
        raise CheckpointError(f"{what} failed on rank(s) {[r for r, _ in failed]}: {detail}")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, data: Any) -> None:
    """Write `path` durably: a temporary file, fsync, rename. NaN and infinities are
    refused (`allow_nan=False`): they are not JSON."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _read_json(path: Path) -> Any:
    """JSON only: `parse_constant` refuses NaN and infinities, as `_write_json` does."""
    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(path.read_text("utf-8"), parse_constant=refuse)


def _replace_dir(tmp: Path, final: Path, overwrite: bool) -> None:
    """Rename `tmp` to `final`; an existing `final` is moved aside and removed after."""
    old = None
    if final.exists():
        if not overwrite:
            raise CheckpointError(f"{final} exists (overwrite=True replaces it)")
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _prepare_agreed(final: Path, tmp: Path, overwrite: bool, rank: int) -> None:
    """Rank 0 prepares the temporary directory; every rank learns whether that worked."""
    error = None
    if rank == 0:
        try:
            _prepare(final, tmp, overwrite)
        except Exception as exc:
            error = _describe(exc)
    _agree(error, f"preparing {tmp}")


def _prepare(final: Path, tmp: Path, overwrite: bool) -> None:
    """On rank 0: refuse an existing target, clear a stale temporary directory."""
    if final.exists() and not overwrite:
        raise CheckpointError(f"{final} exists (overwrite=True replaces it)")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)


def _fused_json(fused: dict[str, FusedRows]) -> dict[str, list[int]]:
    return {k: [v.dim, v.parts, v.tp] for k, v in sorted(fused.items())}


def _check_materialized(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.is_meta:
            raise CheckpointError(f"{name} is on the meta device: call materialize(model) first")


# --------------------------------------------------------------------------- state as tensors + JSON


def _is_json(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_is_json(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _is_json(v) for k, v in value.items())
    return False


def _descend(value: Any) -> bool:
    """Walk into dicts, and into lists that hold tensors or dicts (the optimizer's
    `param_groups`); any other list (betas, parameter names) is one JSON value."""
    if isinstance(value, Mapping):
        return True
    return isinstance(value, (list, tuple)) and any(isinstance(v, (torch.Tensor, Mapping)) for v in value)


def _items(value: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, (str, int)) or _SEP in str(k):
                raise CheckpointError(f"state-dict key {k!r} cannot be stored")
            yield str(k), v
    else:
        yield from ((str(i), v) for i, v in enumerate(value))


def _split(state: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A nested state dict as {key: tensor} for DCP and {key: JSON value} for the rest."""
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, Any] = {}
    for key, v in _items(state):
        path = f"{prefix}{key}"
        if isinstance(v, torch.Tensor):
            tensors[path] = v
        elif _descend(v):
            t, j = _split(v, path + _SEP)
            tensors.update(t)
            values.update(j)
        elif _is_json(v):
            values[path] = v
        else:
            raise CheckpointError(f"{path}: a {type(v).__name__} cannot be stored in a checkpoint "
                                  "(tensors and JSON values only)")
    return tensors, values


def _unaliased(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One key per storage: tied parameters (`lm_head.weight` is `wte.weight`) appear
    under two names, and safetensors refuses to write shared memory. Loading fills the
    first name, and so the other, which shares its memory in the model loaded into."""
    from torch.distributed.tensor import DTensor

    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[Any, ...]] = set()
    for key, t in tensors.items():
        local = t.to_local() if isinstance(t, DTensor) else t
        if local.numel():
            identity = (local.device, local.data_ptr(), local.storage_offset(), tuple(local.shape),
                        local.stride(), local.dtype)
            if identity in seen:
                continue
            seen.add(identity)
        out[key] = t
    return out


# An optimizer parameter group's list of parameter names (`get_state_dict`'s form).
_OWN_PARAMS = re.compile(rf"optim{_SEP}param_groups{_SEP}\d+{_SEP}params")


def _restore(template: Any, values: Mapping[str, Any], prefix: str = "") -> Any:
    """`template` with every non-tensor value replaced by the saved one (tuples stay tuples)."""
    out: dict[str, Any] | list[Any] = {} if isinstance(template, Mapping) else []
    for (key, v), original in zip(_items(template), (template.items() if isinstance(template, Mapping)
                                                     else enumerate(template)), strict=True):
        path = f"{prefix}{key}"
        new: Any
        if isinstance(v, torch.Tensor):
            new = v
        elif _descend(v):
            new = _restore(v, values, path + _SEP)
        elif _OWN_PARAMS.fullmatch(path):
            # Which parameters a group holds is the model's being loaded into: under a
            # pipeline each stage's ranks hold other ones, and state.json is rank 0's.
            new = v
        elif path not in values:
            raise CheckpointError(f"the checkpoint has no value for {path}")
        else:
            new = values[path]
            if isinstance(v, tuple) and isinstance(new, list):
                new = tuple(new)
        if isinstance(out, dict):
            out[original[0]] = new
        else:
            out.append(new)
    return out if isinstance(template, Mapping) else type(template)(out)


# --------------------------------------------------------------------------- checksums


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(directory: Path) -> list[str]:
    """Every file under `directory` but the marker, as sorted relative paths."""
    out = []
    for path in directory.rglob("*"):
        if path.is_file() or path.is_symlink():
            rel = path.relative_to(directory).as_posix()
            if rel not in (MARKER, f"{MARKER}.tmp"):
                out.append(rel)
    return sorted(out)


def _hash_share(directory: Path, names: list[str]) -> dict[str, str]:
    """This rank's share of `names` (every world-size-th), hashed."""
    rank, world = _rank_world()
    return {n: _sha256(directory / n) for n in names[rank::world]}


def verify(directory: str | Path) -> list[str]:
    """The problems of a complete checkpoint's files against its marker's digests: a file
    changed, missing or not listed. The same list on every rank (a collective)."""
    d = Path(directory)
    marker = read_marker(d)
    listed = marker.get("files") if marker is not None else None
    problems: list[str] = []
    if not isinstance(listed, dict) or not all(isinstance(v, str) for v in listed.values()):
        problems.append(f"{d / MARKER}: records no checksums")
        listed = {}
    present = _files(d) if d.is_dir() else []
    problems += [f"{d / n}: missing" for n in sorted(set(listed) - set(present))]
    problems += [f"{d / n}: not part of the checkpoint" for n in sorted(set(present) - set(listed))]
    mine: list[str] = []
    try:
        digests = _hash_share(d, sorted(set(listed) & set(present)))
        mine = [f"{d / n}: contents changed (sha256 differs)" for n, h in digests.items() if listed[n] != h]
    except OSError as exc:
        mine = [f"{d}: cannot be read ({_describe(exc)})"]
    for share in _gather(mine):
        problems += share
    return sorted(set(problems))


# --------------------------------------------------------------------------- locating


def checkpoint_dir(root: str | Path, step: int) -> Path:
    """The conventional name of the checkpoint of `step` under `root`."""
    return Path(root) / f"step-{step:08d}"


def _marker_json(directory: Path) -> Any:
    try:
        return _read_json(directory / MARKER)
    except (OSError, ValueError):
        return None


def read_marker(directory: str | Path) -> dict[str, Any] | None:
    """The completion marker of `directory`, or None when it is absent or unreadable."""
    data = _marker_json(Path(directory))
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("step"), int):
        return None
    return data


def is_complete(directory: str | Path) -> bool:
    d = Path(directory)
    return ".tmp-" not in d.name and read_marker(d) is not None


def complete_checkpoints(root: str | Path) -> list[Path]:
    """The complete checkpoints under `root`, the highest step first."""
    base = Path(root)
    if not base.is_dir():
        return []
    found: list[tuple[int, str, Path]] = []
    for child in base.iterdir():
        marker = read_marker(child) if child.is_dir() and ".tmp-" not in child.name else None
        if marker is not None:
            found.append((int(marker["step"]), child.name, child))
    return [p for *_, p in sorted(found, reverse=True)]


def latest(root: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under `root` (None if there is none)."""
    found = complete_checkpoints(root)
    return found[0] if found else None


def _unloadable(root: Path) -> list[str]:
    """Finished-looking directories under `root` that are no loadable checkpoint: a
    marker that does not parse, or the pickle-based format."""
    out: list[str] = []
    if not root.is_dir():
        return out
    for child in sorted(root.iterdir()):
        if not child.is_dir() or ".tmp-" in child.name or not (child / MARKER).exists():
            continue
        data = _marker_json(child)
        if isinstance(data, dict) and data.get("format") in _PICKLED_FORMATS:
            out.append(f"{child}: written in the format {data['format']}, whose metadata is a pickle; "
                       "it is never loaded, since loading a pickle can run code")
        elif read_marker(child) is None:
            out.append(f"{child / MARKER}: not a valid marker")
    return out


# --------------------------------------------------------------------------- save / load


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None,
           adapters_only: bool = False) -> dict[str, Any]:
    options = StateDictOptions(ignore_frozen_params=adapters_only)
    if optimizer is None:
        return {"model": get_model_state_dict(model, options=options)}
    msd, osd = get_state_dict(model, optimizer, options=options)
    return {"model": msd, "optim": osd}


def _jsonable(value: Any) -> Any:
    """A PEFT config value as JSON: sets sorted (PEFT's own `list(set)` has no fixed
    order), enums as their values, dataclasses already dicts (`to_dict` is `asdict`)."""
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, Enum):
        return _jsonable(value.value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def peft_record(module: nn.Module) -> dict[str, Any] | None:
    """What a checkpoint records of a PEFT-adapted model (None: no adapter): `config`,
    the adapter's `LoraConfig.to_dict()` as JSON; `model_class` and `model_module`, the
    base model's class (PEFT's `auto_mapping`); `name_or_path`, the base's."""
    configs = getattr(module, "peft_config", None)
    if not isinstance(configs, Mapping) or ADAPTER_NAME not in configs:
        return None
    if set(configs) != {ADAPTER_NAME}:
        raise CheckpointError(f"the model carries the adapters {sorted(configs)}: a checkpoint holds "
                              f"one, named {ADAPTER_NAME!r}")
    config = _jsonable(configs[ADAPTER_NAME].to_dict())
    if not _is_json(config):
        raise CheckpointError("the model's PEFT configuration is not JSON")
    name = getattr(module, "name_or_path", None)
    # FSDP2 swaps the class for a subclass (`FSDPLlamaForCausalLM`): record the model's own.
    cls = next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))
    return {"config": config, "model_class": cls.__name__, "model_module": cls.__module__,
            "name_or_path": name or None}


def _loader_file(directory: Path, rank: int) -> Path:
    return directory / _LOADER_DIR / f"rank-{rank:05d}.json"


def _write_rank(tmp: Path, state: dict[str, Any], dataloader_state: Any, rank: int) -> None:
    """This rank's part of a save: its shards (a collective), then its loader state."""
    tensors, values = _split(state)
    tensors = _unaliased(tensors)
    if not _is_json(dataloader_state):
        raise CheckpointError("the data-loader state must be JSON (dicts, lists, numbers, strings)")
    writer = HuggingFaceStorageWriter(str(tmp / _TENSORS_DIR), save_distributed=True)
    with _single_process_quietly():
        dcp.save(tensors, storage_writer=writer, no_dist=not _distributed())
    if rank == 0:
        _write_json(tmp / _STATE_FILE, values)
    _loader_file(tmp, rank).parent.mkdir(exist_ok=True)
    _write_json(_loader_file(tmp, rank), {"state": dataloader_state})


def save(directory: str | Path, model: nn.Module | Applied, optimizer: torch.optim.Optimizer | None,
         step: int, dataloader_state: Any = None, *, program: Program | None = None,
         overwrite: bool = False, adapters_only: bool = False) -> Path:
    """Save atomically (see the module docstring); returns the final directory.
    `adapters_only`: the trainable parameters (a PEFT model's adapters) and their
    optimizer state only."""
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer ≥ 0, got {step!r}")
    final = Path(directory)
    if ".tmp-" in final.name:
        raise ValueError(f"{final}: a checkpoint's name must not contain '.tmp-' (temporaries' mark)")
    tmp = final.with_name(f"{final.name}.tmp-{step}")
    module, fused = model_and_fused(model, program)
    rank, world = _rank_world()

    _prepare_agreed(final, tmp, overwrite, rank)

    error, record = None, None
    try:
        _check_materialized(module)
        record = peft_record(module)
        if adapters_only and record is None:
            raise CheckpointError("adapters_only: the model carries no PEFT adapter")
        state = _state(module, optimizer, adapters_only)
    except Exception as exc:
        error = _describe(exc)
    _agree(error, f"collecting the state to save in {final}")

    error = None
    try:
        _write_rank(tmp, state, dataloader_state, rank)
    except (Exception, dcp.CheckpointException) as exc:
        error = _describe(exc)
    # Every rank has written (or failed): only now may the checkpoint be committed.
    _agree(error, f"writing {tmp} (nothing was committed)")

    error, digests = None, {}
    try:
        digests = _hash_share(tmp, _files(tmp))
    except OSError as exc:
        error = _describe(exc)
    shares = _gather(digests)
    _agree(error, f"hashing {tmp} (nothing was committed)")

    error = None
    if rank == 0:
        try:
            files = {n: h for share in shares for n, h in share.items()}
            _write_json(tmp / MARKER, {
                "format": FORMAT, "step": step, "world_size": world, "time": time.time(),
                "optimizer": optimizer is not None, "fused": _fused_json(fused), "files": files,
                "adapters_only": adapters_only, "adapters": record,
            })
            _replace_dir(tmp, final, overwrite)
        except Exception as exc:
            error = _describe(exc)
    _agree(error, f"committing {final}")
    return final


def _checked_marker(d: Path) -> dict[str, Any]:
    data = _marker_json(d) if ".tmp-" not in d.name else None
    if isinstance(data, dict) and data.get("format") in _PICKLED_FORMATS:
        raise CheckpointError(f"{d} is in the format {data['format']}, whose metadata is a pickle: it is "
                              "not loaded, since loading a pickle can run code (save it again with "
                              "this version)")
    marker = read_marker(d) if ".tmp-" not in d.name else None
    if marker is None:
        raise CheckpointError(f"{d} is not a complete checkpoint (no valid {MARKER} marker: the "
                              "save was interrupted, or this is not a meshplan checkpoint)")
    return marker


def load(directory: str | Path, model: nn.Module | Applied,
         optimizer: torch.optim.Optimizer | None = None, *, program: Program | None = None,
         strict: bool = True, verified: bool = False) -> tuple[int, Any]:
    """Restore model (and optimizer) state in place; returns (step, loader state).
    `verified=True` skips re-hashing a directory `verify` just passed."""
    d = Path(directory)
    marker = _checked_marker(d)
    module, fused = model_and_fused(model, program)
    saved_fused = marker.get("fused", {})
    if saved_fused != _fused_json(fused):
        raise CheckpointError(
            f"{d} stores fused rows for the layout {saved_fused or 'none'}, but this model's is "
            f"{_fused_json(fused) or 'none'}: resume with the same tensor-parallel size, or go "
            "through export_hf + load_sharded")
    if optimizer is not None and not marker.get("optimizer", False):
        raise CheckpointError(f"{d} holds no optimizer state")
    problems = [] if verified else verify(d)
    if problems:
        raise CheckpointError(f"{d} is damaged: " + "; ".join(problems[:3]))
    _check_materialized(module)
    rank, _ = _rank_world()
    error: str | None = None
    state: Any = None
    loader_state: Any = None
    adapters_only = bool(marker.get("adapters_only", False))
    try:
        template = _state(module, optimizer, adapters_only)
        tensors = _unaliased(_split(template)[0])
        reader = HuggingFaceStorageReader(str(d / _TENSORS_DIR))
        if adapters_only:
            _check_same_trainable(d, reader, tensors)
        with _single_process_quietly():
            dcp.load(tensors, storage_reader=reader, no_dist=not _distributed())
        values = _read_json(d / _STATE_FILE)
        if not isinstance(values, dict):
            raise CheckpointError(f"{d / _STATE_FILE} is not a JSON object")
        state = _restore(template, values)
        loader_file = _loader_file(d, rank)
        if not loader_file.is_file():
            raise CheckpointError(f"{d} has no data-loader state for rank {rank} (saved by "
                                  f"{marker.get('world_size')} ranks)")
        loader_state = _read_json(loader_file).get("state")
    except CheckpointError as exc:
        error = str(exc)
    except (Exception, dcp.CheckpointException) as exc:
        error = _describe(exc)
    # Every rank reaches this agreement, whichever of them failed and how.
    _agree(error, f"reading {d}")
    # An adapter checkpoint leaves the frozen base out: those keys are missing by design.
    options = StateDictOptions(strict=strict and not adapters_only, ignore_frozen_params=adapters_only)
    if optimizer is None:
        set_model_state_dict(module, state["model"], options=options)
    else:
        set_state_dict(module, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"], options=options)
    return int(marker["step"]), loader_state


def _check_same_trainable(d: Path, reader: HuggingFaceStorageReader,
                          tensors: Mapping[str, torch.Tensor]) -> None:
    """An adapter checkpoint fits a model only if it holds exactly its trainable parameters."""
    prefix = "model" + _SEP
    with _single_process_quietly():
        saved = {k for k in reader.read_metadata().state_dict_metadata if k.startswith(prefix)}
    wanted = {k for k in tensors if k.startswith(prefix)}
    if saved != wanted:
        missing = sorted(k[len(prefix):] for k in wanted - saved)
        extra = sorted(k[len(prefix):] for k in saved - wanted)
        raise CheckpointError(
            f"{d} holds the adapters of another model: "
            + "; ".join(part for part in (f"missing {missing[:3]}" if missing else "",
                                          f"not in this model {extra[:3]}" if extra else "") if part)
            + " (build the model with the same adapters targets)")


def read_tensors(directory: str | Path, select: Callable[[str], bool] | None = None
                 ) -> dict[str, torch.Tensor]:
    """The model tensors of a checkpoint, full (every rank's shards joined) and in Hugging
    Face row order (fused rows un-permuted), by parameter name; `select(name)` picks
    some. Needs no model and no process group (the global shapes come from the shards'
    safetensors headers); each process reads every shard. Verifies the checksums first
    (`verify`: a collective when `torch.distributed` is initialised)."""
    d = Path(directory)
    marker = _checked_marker(d)
    problems = verify(d)
    if problems:
        raise CheckpointError(f"{d} is damaged: " + "; ".join(problems[:3]))
    prefix = "model" + _SEP
    reader = HuggingFaceStorageReader(str(d / _TENSORS_DIR))
    templates: dict[str, torch.Tensor] = {}
    try:
        with _single_process_quietly():
            entries = reader.read_metadata().state_dict_metadata
            for key, meta in entries.items():
                name = key[len(prefix):]
                if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata) and (
                        select is None or select(name)):
                    templates[key] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
            if templates:
                dcp.load(templates, storage_reader=HuggingFaceStorageReader(str(d / _TENSORS_DIR)),
                         no_dist=True)
    except (Exception, dcp.CheckpointException) as exc:
        raise CheckpointError(f"reading {d}: {_describe(exc)}") from None
    out = {}
    fused = marker.get("fused", {})
    for key, tensor in templates.items():
        name = key[len(prefix):]
        if name in fused:
            rows = FusedRows(*fused[name])
            order = rows.order(tensor.shape[rows.dim])
            tensor = tensor.index_select(rows.dim, torch.argsort(order))
        out[name] = tensor
    return out


def load_latest(root: str | Path, model: nn.Module | Applied,
                optimizer: torch.optim.Optimizer | None = None, *, program: Program | None = None,
                on_warning: Callable[[str], None] | None = None) -> tuple[Path, int, Any] | None:
    """Load the newest intact checkpoint under `root`: (directory, step, loader state),
    or None when `root` holds no checkpoint. A damaged one is skipped with a warning
    naming the file; checkpoints that are all damaged or unloadable raise `CheckpointError`."""
    warn = on_warning or (lambda message: warnings.warn(message, stacklevel=3))
    base = Path(root)
    refused = _unloadable(base)
    for message in refused:
        warn(message)
    candidates = complete_checkpoints(base)
    for i, directory in enumerate(candidates):
        problems = verify(directory)
        if not problems:
            step, state = load(directory, model, optimizer, program=program, verified=True)
            return directory, step, state
        then = f"falling back to {candidates[i + 1].name}" if i + 1 < len(candidates) else "no older one"
        warn(f"checkpoint {directory.name} is damaged ({'; '.join(problems[:3])}): {then}")
    if candidates or refused:
        raise CheckpointError(f"{base} holds no intact checkpoint: "
                              + "; ".join(refused + [c.name + " damaged" for c in candidates])
                              + " (remove them, or use another --checkpoint-dir, to start afresh)")
    return None


# --------------------------------------------------------------------------- export


def export_hf(model: nn.Module | Applied, out_dir: str | Path, *, program: Program | None = None,
              dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30,
              overwrite: bool = False,
              rewrite: Callable[[Iterator[tuple[str, torch.Tensor]]],
                                Iterable[tuple[str, torch.Tensor]]] | None = None) -> Path:
    """Write a consolidated Hugging Face directory (see the module docstring).
    `rewrite` maps the stream of (name, full tensor) before it is written (merging
    adapters into their base, `runtime.weights.adapters.export_merged`); it runs on
    every rank and must consume the whole stream."""
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be ≥ 1, got {max_shard_bytes}")
    final = Path(out_dir)
    tmp = final.with_name(f"{final.name}.tmp-export")
    module, fused = model_and_fused(model, program)
    rank, _ = _rank_world()

    _prepare_agreed(final, tmp, overwrite, rank)

    error = None
    try:
        _check_materialized(module)
    except Exception as exc:
        error = _describe(exc)
    _agree(error, f"exporting {final}")

    writer = _ShardWriter(tmp, max_shard_bytes) if rank == 0 else None
    error = None
    # Every rank takes part in every gather, even after rank 0 failed to write.
    stream = full_state_dict(module, program=program, fused=fused)
    for name, tensor in (rewrite(stream) if rewrite is not None else stream):
        if writer is None or error is not None:
            continue
        try:
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            writer.add(name, tensor)
        except Exception as exc:
            error = _describe(exc)
    if writer is not None and error is None:
        try:
            writer.finish()
            _write_config(module, tmp, dtype)
            _replace_dir(tmp, final, overwrite)
        except Exception as exc:
            error = _describe(exc)
    _agree(error, f"exporting {final}")
    return final


def _write_config(module: nn.Module, directory: Path, dtype: torch.dtype | None) -> None:
    config = getattr(module, "config", None)
    to_json: Callable[..., Any] | None = getattr(config, "to_json_file", None)
    if config is None or to_json is None:
        return
    if dtype is not None:
        config = copy.deepcopy(config)
        config.dtype = dtype
        to_json = config.to_json_file
    to_json(str(directory / "config.json"))


class _ShardWriter:
    """Accumulates tensors into safetensors files of at most `limit` bytes (a tensor
    larger than the limit gets a file of its own)."""

    def __init__(self, directory: Path, limit: int) -> None:
        self.directory, self.limit = directory, limit
        self.current: dict[str, torch.Tensor] = {}
        self.size = 0
        self.total = 0
        self.files: list[tuple[Path, list[str]]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.current and self.size + nbytes > self.limit:
            self._flush()
        self.current[name] = tensor.contiguous()
        self.size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        path = self.directory / f"part-{len(self.files):05d}.safetensors"
        save_file(self.current, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.current)))
        self.current, self.size = {}, 0

    def finish(self) -> None:
        if self.current or not self.files:
            self._flush()
        if len(self.files) == 1:
            os.replace(self.files[0][0], self.directory / SINGLE_FILE)
            return
        n = len(self.files)
        weight_map = {}
        for i, (path, names) in enumerate(self.files):
            target = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.directory / target)
            weight_map.update(dict.fromkeys(names, target))
        _write_json(self.directory / INDEX_FILE,
                    {"metadata": {"total_size": self.total}, "weight_map": weight_map})
