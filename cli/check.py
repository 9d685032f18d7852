"""`plan check FILE…`: parse and check plans without a model. Imports no torch."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from meshplan.dsl import check, parse
from meshplan.dsl.errors import PlanError, PlanRejected, Span
from meshplan.dsl.parser import decode

from .console import Terminal, summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", metavar="FILE", help="plan files (`-`: standard input)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                   help="override a param (or a mesh dimension: mesh.DIM=N); repeatable")
    p.add_argument("--json", action="store_true", help="print diagnostics as a JSON list")


def read_plan(path: str, term: Terminal) -> tuple[str | None, list[PlanError]]:
    """A plan file's text, or the E104 diagnostic saying why it cannot be read."""
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as e:
        return None, [PlanError(Span(path, 0, 0, 0, 0), "E104", e.strerror or str(e))]
    except AttributeError:  # a text-only stdin (tests, embedding): already decoded
        data = sys.stdin.read().encode("utf-8", "surrogateescape")
    return decode_plan(data, "<stdin>" if path == "-" else path, term)


def decode_plan(data: bytes, name: str, term: Terminal) -> tuple[str | None, list[PlanError]]:
    """Plan bytes as text; not UTF-8: the E104 at the bad byte (its line quoted, lossily)."""
    try:
        text = decode(data, name)
    except PlanRejected as e:
        term.remember(name, data.decode("utf-8", "replace"))
        return None, list(e.diagnostics)
    term.remember(name, text)
    return text, []


def diagnose(path: str, overrides: list[str], term: Terminal) -> list[PlanError]:
    text, problems = read_plan(path, term)
    if text is None:
        return problems
    try:
        tree = parse(text, "<stdin>" if path == "-" else path)
    except PlanRejected as e:
        return list(e.diagnostics)
    return list(check(tree, overrides).diagnostics)


def run(args: argparse.Namespace, term: Terminal) -> int:
    missing = [f for f in args.files if f != "-" and not Path(f).exists()]
    if missing:
        return term.usage_error("check", f"no such file: {missing[0]}")
    results = {path: diagnose(path, args.overrides, term) for path in dict.fromkeys(args.files)}
    every = [d for ds in results.values() for d in ds]
    rejected = [p for p, ds in results.items() if any(d.severity == "error" for d in ds)]
    if args.json:
        term.print(json.dumps([d.to_json() for d in sorted(every, key=PlanError.sort_key)], indent=2))
    else:
        term.diagnostics(every)
        errors = sum(d.severity == "error" for d in every)
        warnings = len(every) - errors
        counts = summary({"error": errors, "warning": warnings})
        n = len(results)
        files = f"{n} file" if n == 1 else f"{n} files"
        if rejected:
            term.note(f"{files} checked, {len(rejected)} rejected ({counts})")
        else:
            term.note(f"{files} checked, all good" + (f" ({counts})" if counts else ""))
    return 1 if rejected else 0
