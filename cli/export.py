"""`plan export CHECKPOINT (--adapter | --merged) -o OUT`: a checkpoint's adapters in PEFT's
format, or the base model with the adapters merged, as Hugging Face safetensors.

    plan export runs/ckpt --adapter -o out/adapter                      # PeftModel.from_pretrained
    plan export runs/ckpt/step-00000100 --merged --model M -o out/merged   # from_pretrained

CHECKPOINT is a checkpoint directory (`step-00000100`) or a `plan run --checkpoint-dir`,
whose newest complete checkpoint is taken. It runs in one process, without
`torch.distributed`: every rank's shards are read and joined (`runtime.weights.checkpoint
.read_tensors`), after the checksums are verified.

- `--adapter` writes `adapter_model.safetensors` and `adapter_config.json` as
  `PeftModel.save_pretrained` does. It needs nothing but the checkpoint: its marker
  records the adapter's configuration.
- `--merged` writes `model.safetensors` (and `config.json`), each adapter merged into its
  base (W + alpha/r·B·A) under the unadapted model's names. It needs `--model M` (a
  checkpoint records neither the plan nor the model): M's architecture and config, and,
  for an adapter-only checkpoint, M's weights as the base (seeded random weights, drawn
  as `plan run --seed` drew them, when M has none).

OUT is written as `OUT.tmp-export` and renamed when complete: nothing is half-written.
Exit codes: 0 written; 1 the checkpoint holds no adapters, is damaged, or does not fit
M; 2 usage (no such checkpoint, OUT exists without --force, --merged without --model, a
--model that names no model).
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Any

from .console import Terminal

COMMAND = "export"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a checkpoint directory, or a --checkpoint-dir (its newest complete checkpoint)")
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument("--adapter", action="store_true",
                      help="write PEFT's adapter files (adapter_model.safetensors, adapter_config.json)")
    kind.add_argument("--merged", action="store_true",
                      help="write the base with the adapters merged (model.safetensors, config.json)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="the directory to write")
    p.add_argument("--model", metavar="M",
                   help="the base model (a preset or a Hugging Face directory); needed by --merged")
    p.add_argument("--seed", type=int, default=0,
                   help="with --merged and a model without weights: the seed plan run drew them with (default 0)")
    p.add_argument("--base-model-name", metavar="NAME",
                   help="base_model_name_or_path in adapter_config.json (default: the recorded one, "
                        "else --model)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                   help="with --merged: cast floating-point tensors to this dtype (default: as stored)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


class _Stop(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _checkpoint(path: Path, term: Terminal) -> Path:
    """The checkpoint directory CHECKPOINT names (itself, or the newest one under it)."""
    from meshplan.runtime.weights.checkpoint import MARKER, complete_checkpoints, read_marker

    if not path.exists():
        raise _Stop(2, f"no such checkpoint directory: {path}")
    if not path.is_dir():
        raise _Stop(2, f"{path}: not a directory")
    if read_marker(path) is not None and ".tmp-" not in path.name:
        return path
    if (path / MARKER).exists():
        raise _Stop(1, f"{path}: its {MARKER} marker is not valid (damaged, or another format)")
    found = complete_checkpoints(path)
    if not found:
        raise _Stop(2, f"{path} is not a complete meshplan checkpoint and holds none (an "
                       "interrupted save leaves no marker)")
    term.note(f"plan export: using {found[0]}, the newest complete checkpoint in {path}")
    return found[0]


def _output_problem(out: Path, force: bool) -> str | None:
    if out.exists() or out.is_symlink():
        if not force:
            return f"-o {out}: exists (--force replaces it)"
        if not out.is_dir():
            return f"-o {out}: exists and is not a directory"
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return f"-o {out}: cannot write in {parent}"
    return None


def run(args: argparse.Namespace, term: Terminal) -> int:
    try:
        return _run(args, term)
    except _Stop as stop:
        if stop.code == 2:
            return term.usage_error(COMMAND, str(stop))
        term.note(f"plan {COMMAND}: error: {stop}")
        return stop.code


def _run(args: argparse.Namespace, term: Terminal) -> int:
    out = Path(args.output)
    problem = _output_problem(out, args.force)
    if problem:
        raise _Stop(2, problem)
    if args.dtype and not args.merged:
        raise _Stop(2, "--dtype applies to --merged only (the adapter files keep the trained dtype)")
    if args.merged and not args.model:
        raise _Stop(2, "--merged needs --model M: the base's architecture and config (and its weights, "
                       "for an adapter-only checkpoint); a checkpoint records neither")
    directory = _checkpoint(Path(args.checkpoint), term)

    from meshplan.runtime.weights.adapters import AdapterError, recorded
    from meshplan.runtime.weights.checkpoint import CheckpointError, read_marker

    marker = read_marker(directory) or {}
    try:
        record = recorded(directory)
    except AdapterError as e:
        raise _Stop(1, f"{e}: nothing to export") from None
    except CheckpointError as e:
        raise _Stop(1, str(e)) from None
    try:
        if args.adapter:
            written = _adapter(args, directory, record)
        else:
            written = _merged(args, directory, record, bool(marker.get("adapters_only")), term)
    except CheckpointError as e:  # AdapterError included: damaged, or not fitting --model
        raise _Stop(1, str(e)) from None
    finally:  # a failed export leaves nothing behind (a complete one was renamed already)
        shutil.rmtree(out.with_name(f"{out.name}.tmp-export"), ignore_errors=True)
    term.note(f"plan {COMMAND}: wrote {written}: {', '.join(sorted(p.name for p in written.iterdir()))} "
              f"(step {marker.get('step')}, saved by {marker.get('world_size')} "
              f"rank{'s' if marker.get('world_size') != 1 else ''})")
    return 0


def _adapter(args: argparse.Namespace, directory: Path, record: dict[str, Any]) -> Path:
    from meshplan.runtime.weights.adapters import export_adapter

    config = record["config"]
    name = (args.base_model_name or config.get("base_model_name_or_path") or record.get("name_or_path")
            or args.model)
    return export_adapter(directory, args.output, base_model_name_or_path=name, overwrite=args.force)


def _merged(args: argparse.Namespace, directory: Path, record: dict[str, Any], adapters_only: bool,
            term: Terminal) -> Path:
    import torch

    from meshplan.planner.models import ModelSpecError, resolve_model
    from meshplan.runtime.parallel.apply import DTYPES
    from meshplan.runtime.train.build import build_model
    from meshplan.runtime.train.environment import TrainError
    from meshplan.runtime.weights.adapters import export_merged, inject_recorded, load_tensors
    from meshplan.runtime.weights.checkpoint import read_tensors
    from meshplan.runtime.weights.loading import LoadError, init_random, materialize, meta_model

    try:
        source = resolve_model(args.model)
        if source.config is None or source.model_class is None:
            raise ModelSpecError(f"{args.model} is not a transformers model")
        if adapters_only and source.weights:
            # The base's own weights, then the adapters around them (PEFT keeps them as base_layer).
            model = build_model(source, seed=args.seed)
            inject_recorded(model, record)
            term.note(f"plan {COMMAND}: base weights from {source.path or args.model}")
        else:
            # Adapters first, then the values: as `plan run` builds (meta → adapters → shards →
            # weights), so that seeded random weights are drawn under the same names.
            model = meta_model(source)
            inject_recorded(model, record)
            materialize(model, "cpu")
            if adapters_only:
                init_random(model, args.seed)
                term.note(f"plan {COMMAND}: {args.model} has no weights: base weights random "
                          f"(seed {args.seed}), as plan run --seed {args.seed} drew them")
    except ModelSpecError as e:
        raise _Stop(2, f"--model {args.model}: {e}") from None
    except (LoadError, TrainError) as e:
        raise _Stop(2, f"--model {args.model}: {e}") from None
    with torch.no_grad():
        load_tensors(model, read_tensors(directory), adapters_only=adapters_only)
    dtype = DTYPES[args.dtype] if args.dtype else None
    return export_merged(model, args.output, dtype=dtype, overwrite=args.force)
