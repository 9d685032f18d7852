"""`plan fmt FILE…`: rewrite plans in canonical form, atomically; `--check` only reports."""

from __future__ import annotations

import argparse
from pathlib import Path

from meshplan.dsl import format_plan, parse
from meshplan.dsl.errors import PlanRejected

from .check import read_plan
from .console import Terminal
from .outputs import write_atomically


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", metavar="FILE", help="plan files (`-`: stdin to stdout)")
    p.add_argument("--check", action="store_true",
                   help="change nothing; exit 1 if any file is not formatted")


def run(args: argparse.Namespace, term: Terminal) -> int:
    files = list(dict.fromkeys(args.files))
    missing = [f for f in files if f != "-" and not Path(f).exists()]
    if missing:
        return term.usage_error("fmt", f"no such file: {missing[0]}")
    failed = changed = 0
    for path in files:
        text, problems = read_plan(path, term)
        if text is None:
            term.diagnostics(problems)
            failed += 1
            continue
        try:
            formatted = format_plan(parse(text, "<stdin>" if path == "-" else path))
        except PlanRejected as e:
            term.diagnostics(e.diagnostics)
            failed += 1
            continue
        if path == "-":
            term.out.file.write(formatted)
            continue
        if formatted == text:
            continue
        changed += 1
        if args.check:
            term.note(f"would reformat {path}")
        else:
            write_atomically(Path(path), formatted)
            term.note(f"reformatted {path}")
    real = [f for f in files if f != "-"]
    if real:
        verb = "would be reformatted" if args.check else "reformatted"
        unchanged = len(real) - changed - failed
        parts = [f"{changed} {verb}" if changed else "", f"{unchanged} unchanged" if unchanged else "",
                 f"{failed} could not be parsed" if failed else ""]
        term.note(", ".join(p for p in parts if p) or "nothing to do")
    return 1 if failed or (args.check and changed) else 0
