"""`plan import hf MODEL [-o FILE]`: a plan from the model's own transformers TP plan.

MODEL is a preset name, a Hugging Face directory holding config.json, or a config class
name / model_type (its defaults, made tiny: the plan's rules do not depend on sizes).
The plan goes to stdout, or atomically to FILE. Exit 0 with a plan; 1 when the model's
plan cannot be written in meshplan (a style with no equivalent yet, named), or the model
ships none; 2 for a model that cannot be resolved or built.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .console import Terminal


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="source", metavar="SOURCE", required=True)
    hf = sub.add_parser("hf", help="from transformers' tensor-parallel plan of MODEL",
                        description="Write a plan from a transformers model's own tensor-parallel plan.")
    hf.add_argument("model", metavar="MODEL",
                    help="preset name, Hugging Face directory, or config class / model_type")
    hf.add_argument("-o", "--output", type=Path, metavar="FILE", help="write the plan here (default: stdout)")
    hf.add_argument("--tp", type=int, default=2, help="the plan's default `param tp` (default 2)")
    hf.add_argument("--name", help="the plan's name (default: <model_type>_hf)")


def run(args: argparse.Namespace, term: Terminal) -> int:
    from meshplan.planner.hf_import import HfImportError, hf_source, import_hf
    from meshplan.planner.models import ModelSpecError, build_meta_model

    if args.tp < 1:
        return term.usage_error("import hf", f"--tp must be ≥ 1, got {args.tp}")
    from .outputs import OutputError, check_outputs

    try:  # before any work: a bad output path costs nothing
        check_outputs({"-o": None if args.output is None else str(args.output)})
    except OutputError as e:
        return term.usage_error("import hf", str(e))
    try:
        model = build_meta_model(hf_source(args.model))
    except ModelSpecError as e:
        return term.usage_error("import hf", str(e))
    try:
        imported = import_hf(model, name=args.name, tp=args.tp)
    except HfImportError as e:
        term.note(f"plan import hf: error: {args.model}: {e}")
        return 1
    if args.output is None:
        term.out.file.write(imported.text)
        return 0
    from .outputs import write_atomically

    write_atomically(args.output, imported.text)
    term.note(f"wrote {args.output}: plan `{imported.name}` for {imported.architecture}, "
              f"{len(imported.rules)} tensor-parallel rules")
    return 0
