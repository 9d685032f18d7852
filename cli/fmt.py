"""`plan fmt FILE…`: rewrite plans in canonical form, atomically; `--check` only reports."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from meshplan.dsl import format_plan, parse
from meshplan.dsl.errors import PlanRejected

from .check import read_plan
from .console import Terminal


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", metavar="FILE", help="plan files (`-`: stdin to stdout)")
    p.add_argument("--check", action="store_true",
                   help="change nothing; exit 1 if any file is not formatted")


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` so that readers see the old or the new file, never a part of one."""
    if path.exists():
        mode = path.stat().st_mode & 0o7777
    else:  # a new file gets the permissions open() would give it, not mkstemp's 0600
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
