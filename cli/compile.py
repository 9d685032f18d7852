"""`plan compile FILE --model M --world-size N`: check a plan against a model, emit the Program."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from meshplan.dsl.errors import PlanError, PlanRejected

from .check import read_plan
from .console import Terminal
from .options import MAX_WORLD_SIZE, world_size_arg
from .outputs import OutputError, check_outputs, write_outputs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="the plan")
    add_model_arguments(p)
    p.add_argument("-o", "--output", metavar="OUT", help="write the program here (atomically) instead of stdout")
    p.add_argument("--emit", choices=("json", "python"), default="json",
                   help="the program as JSON or as a standalone torch script (default json)")
    p.add_argument("--json", action="store_true", help="print diagnostics as a JSON list")
    p.add_argument("--no-dry-run", dest="dry_run", action="store_false",
                   help="skip the dry run (one training step of each block kind on fake tensors under "
                        "the program's layouts) that catches a model whose code does not fit the plan")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments every model-aware command shares (compile, explain, run)."""
    p.add_argument("--model", required=True, metavar="M",
                   help="a preset (`plan models` lists them), a local Hugging Face directory with "
                        "config.json, or package.module:factory (runs that code); nothing is downloaded")
    p.add_argument("--world-size", type=world_size_arg, required=True, metavar="N",
                   help=f"number of ranks (1 to {MAX_WORLD_SIZE:,})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                   help="override a param (or a mesh dimension: mesh.DIM=N); repeatable")



def compile_for_cli(args: argparse.Namespace, term: Terminal, command: str) -> tuple[object | None, int]:
    """Compile as the CLI does: (Compiled, 0), or (None, exit code) after printing why."""
    from meshplan.planner import compile_plan
    from meshplan.planner.graph import GraphError
    from meshplan.planner.models import ModelConfigError, ModelSpecError

    if not Path(args.file).exists():
        return None, term.usage_error(command, f"no such file: {args.file}")
    text, problems = read_plan(args.file, term)
    if text is None:
        _report(term, problems, getattr(args, "json", False))
        return None, 1
    try:
        return compile_plan(Path(args.file), args.model, args.world_size, args.overrides), 0
    except PlanRejected as e:
        _report(term, e.diagnostics, getattr(args, "json", False))
        return None, 1
    except ModelConfigError as e:  # the model is named right but cannot be built: rejected, not misused
        term.note(f"plan {command}: error: --model {args.model}: {e}")
        return None, 1
    except (ModelSpecError, GraphError) as e:
        return None, term.usage_error(command, f"--model {args.model}: {e}")


def _report(term: Terminal, diagnostics: list[PlanError], as_json: bool) -> None:
    if as_json:
        term.print(json.dumps([d.to_json() for d in sorted(diagnostics, key=PlanError.sort_key)], indent=2))
        return
    term.diagnostics(diagnostics)
    errors = sum(d.severity == "error" for d in diagnostics)
    if errors:
        term.note(f"plan rejected ({errors} error{'s' if errors != 1 else ''})")


def dry_run_net(compiled: object, args: argparse.Namespace) -> list[PlanError]:
    """The dry-run net (`runtime.explain.net`): the errors of a model that does not run
    under the accepted Program, at the plan's sequence length where it declares one."""
    from meshplan.runtime.explain.net import check_runs
    from meshplan.runtime.explain.report import plan_seq_len

    return check_runs(compiled, seq_len=plan_seq_len(Path(args.file), args.overrides))


def run(args: argparse.Namespace, term: Terminal) -> int:
    from meshplan.planner import Compiled
    from meshplan.planner.emit import to_python

    try:  # before any work: a bad output path costs nothing
        check_outputs({"-o": args.output})
    except OutputError as e:
        return term.usage_error("compile", str(e))
    compiled, code = compile_for_cli(args, term, "compile")
    if not isinstance(compiled, Compiled):
        return code
    if args.dry_run:
        failed = dry_run_net(compiled, args)
        if failed:
            _report(term, [*compiled.warnings, *failed], args.json)
            return 1
    program = compiled.program
    try:
        text = program.to_json() + "\n" if args.emit == "json" else to_python(program)
    except ValueError as e:  # a step kind the script cannot spell (the message says which)
        return term.usage_error("compile", str(e))
    if not args.json:
        term.diagnostics(compiled.warnings)
    if args.output:
        write_outputs({Path(args.output): text})
    else:
        term.out.file.write(text)
    mesh = " × ".join(f"{n} {s}" for n, s in zip(program.mesh.names, program.mesh.shape, strict=True))
    kinds = Counter(step.kind for step in program.steps)
    steps = ", ".join(f"{n} {k}" for k, n in kinds.items()) or "no steps"
    term.note(f"compiled {program.source} for {program.model} on {program.world_size} ranks")
    term.note(f"  mesh: {mesh}" + "".join(f"; {n} = {' × '.join(d)}" for n, d in program.mesh.submeshes))
    term.note(f"  steps: {steps}" + (f" → {args.output}" if args.output else ""))
    return 0
