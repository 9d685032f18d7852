"""Checkpoints: atomic save / resume with `torch.distributed.checkpoint` (DCP), and
export of a consolidated Hugging Face directory.

    save(checkpoint_dir(root, step), applied, optimizer, step, sampler.state_dict())
    step, loader_state = load(latest(root), applied, optimizer)
    export_hf(applied, "out/hf")

Guarantees:

- `save(directory, model, optimizer, step, dataloader_state)` writes the model and
  optimizer state as DCP shards (`get_state_dict`: each rank writes only its own
  shards), the step, and each rank's data-loader state. It is atomic: everything is
  written into `<directory>.tmp-<step>`; only after *every* rank reported success does
  rank 0 write the completion marker `COMPLETE` (to a temporary name, fsynced, then
  renamed) and rename the directory to its final name (fsyncing the parent). Success is
  agreed with one all-gather per phase, so an error on one rank makes every rank raise
  `CheckpointError` (naming the failed ranks) instead of hanging. A crash or error at
  any earlier point leaves at most a `*.tmp-<step>` directory without a marker: never a
  directory that `latest()` or `load()` accepts.
- `latest(root)` returns the complete checkpoint (final name, parseable marker) with
  the highest step under `root`, or `None`.
- `load(directory, model, optimizer)` refuses a directory without a valid marker,
  restores the model's and the optimizer's state in place (bitwise; DCP reshards onto
  another mesh or world size) and returns `(step, this rank's data-loader state)`.
  Parameters holding fused rows are stored rank-major for the tensor-parallel size
  that saved them; the marker records that layout and `load` refuses a model whose
  fused layout differs (convert through `export_hf` + `load_sharded` instead).
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
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from meshplan.planner.program import Program

from ..parallel.apply import Applied
from .loading import INDEX_FILE, SINGLE_FILE, FusedRows, full_state_dict, model_and_fused

__all__ = [
    "FORMAT",
    "MARKER",
    "CheckpointError",
    "checkpoint_dir",
    "export_hf",
    "is_complete",
    "latest",
    "load",
    "read_marker",
    "save",
]

MARKER = "COMPLETE"
FORMAT = "meshplan-dcp/1"
_LOADER_DIR = "dataloader"


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


def _failures(error: str | None) -> list[tuple[int, str]]:
    """Every rank's error from this phase (an all-gather: every rank must call it)."""
    if not _distributed():
        return [(0, error)] if error else []
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, error)
    return [(r, e) for r, e in enumerate(gathered) if e]


def _agree(error: str | None, what: str) -> None:
    """Raise `CheckpointError` on every rank if this phase failed on any rank."""
    failed = _failures(error)
    if failed:
        detail = "; ".join(f"rank {r}: {e}" for r, e in failed[:4])
        raise CheckpointError(f"{what} failed on rank(s) {[r for r, _ in failed]}: {detail}")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


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


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write `path` durably: a temporary file, fsync, rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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


# --------------------------------------------------------------------------- locating


def checkpoint_dir(root: str | Path, step: int) -> Path:
    """The conventional name of the checkpoint of `step` under `root`."""
    return Path(root) / f"step-{step:08d}"


def read_marker(directory: str | Path) -> dict[str, Any] | None:
    """The completion marker of `directory`, or None when it is absent or unreadable."""
    path = Path(directory) / MARKER
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("step"), int):
        return None
    return data


def is_complete(directory: str | Path) -> bool:
    d = Path(directory)
    return ".tmp-" not in d.name and read_marker(d) is not None


def latest(root: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under `root` (None if there is none)."""
    base = Path(root)
    if not base.is_dir():
        return None
    best: tuple[int, str, Path] | None = None
    for child in base.iterdir():
        if not child.is_dir() or not is_complete(child):
            continue
        marker = read_marker(child)
        assert marker is not None
        key = (int(marker["step"]), child.name, child)
        if best is None or key[:2] > best[:2]:
            best = key
    return best[2] if best is not None else None


# --------------------------------------------------------------------------- save / load


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


def _write_rank(tmp: Path, state: dict[str, Any], dataloader_state: Any, rank: int) -> None:
    """This rank's part of a save: its DCP shards (a collective), then its loader state."""
    with _single_process_quietly():
        dcp.save(state, checkpoint_id=str(tmp), no_dist=not _distributed())
    loader_dir = tmp / _LOADER_DIR
    loader_dir.mkdir(exist_ok=True)
    path = loader_dir / f"rank-{rank:05d}.pt"
    with open(path, "wb") as f:
        torch.save(dataloader_state, f)
        f.flush()
        os.fsync(f.fileno())


def save(directory: str | Path, model: nn.Module | Applied, optimizer: torch.optim.Optimizer | None,
         step: int, dataloader_state: Any = None, *, program: Program | None = None,
         overwrite: bool = False) -> Path:
    """Save atomically (see the module docstring); returns the final directory."""
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer ≥ 0, got {step!r}")
    final = Path(directory)
    if ".tmp-" in final.name:
        raise ValueError(f"{final}: a checkpoint's name must not contain '.tmp-' (temporaries' mark)")
    tmp = final.with_name(f"{final.name}.tmp-{step}")
    module, fused = model_and_fused(model, program)
    rank, world = _rank_world()

    _prepare_agreed(final, tmp, overwrite, rank)

    error = None
    try:
        _check_materialized(module)
        state = _state(module, optimizer)
    except Exception as exc:
        error = _describe(exc)
    _agree(error, f"collecting the state to save in {final}")

    error = None
    try:
        _write_rank(tmp, state, dataloader_state, rank)
    except Exception as exc:
        error = _describe(exc)
    # Every rank has written (or failed): only now may the checkpoint be committed.
    _agree(error, f"writing {tmp} (nothing was committed)")

    error = None
    if rank == 0:
        try:
            _write_json(tmp / MARKER, {
                "format": FORMAT, "step": step, "world_size": world, "time": time.time(),
                "optimizer": optimizer is not None, "fused": _fused_json(fused),
            })
            _replace_dir(tmp, final, overwrite)
        except Exception as exc:
            error = _describe(exc)
    _agree(error, f"committing {final}")
    return final


def load(directory: str | Path, model: nn.Module | Applied,
         optimizer: torch.optim.Optimizer | None = None, *, program: Program | None = None,
         strict: bool = True) -> tuple[int, Any]:
    """Restore model (and optimizer) state in place; returns (step, loader state)."""
    d = Path(directory)
    marker = read_marker(d) if ".tmp-" not in d.name else None
    if marker is None:
        raise CheckpointError(f"{d} is not a complete checkpoint (no valid {MARKER} marker: the "
                              "save was interrupted, or this is not a meshplan checkpoint)")
    module, fused = model_and_fused(model, program)
    saved_fused = marker.get("fused", {})
    if saved_fused != _fused_json(fused):
        raise CheckpointError(
            f"{d} stores fused rows for the layout {saved_fused or 'none'}, but this model's is "
            f"{_fused_json(fused) or 'none'}: resume with the same tensor-parallel size, or go "
            "through export_hf + load_sharded")
    if optimizer is not None and not marker.get("optimizer", False):
        raise CheckpointError(f"{d} holds no optimizer state")
    _check_materialized(module)
    state = _state(module, optimizer)
    with _single_process_quietly():
        dcp.load(state, checkpoint_id=str(d), no_dist=not _distributed())
    options = StateDictOptions(strict=strict)
    if optimizer is None:
        set_model_state_dict(module, state["model"], options=options)
    else:
        set_state_dict(module, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"], options=options)
    rank, _ = _rank_world()
    path = d / _LOADER_DIR / f"rank-{rank:05d}.pt"
    if not path.is_file():
        raise CheckpointError(f"{d} has no data-loader state for rank {rank} (saved by "
                              f"{marker.get('world_size')} ranks)")
    loader_state = torch.load(path, map_location="cpu", weights_only=True)
    return int(marker["step"]), loader_state


# --------------------------------------------------------------------------- export


def export_hf(model: nn.Module | Applied, out_dir: str | Path, *, program: Program | None = None,
              dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30,
              overwrite: bool = False) -> Path:
    """Write a consolidated Hugging Face directory (see the module docstring)."""
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
    for name, tensor in full_state_dict(module, program=program, fused=fused):
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
