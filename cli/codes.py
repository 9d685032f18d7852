"""`plan explain-code CODE…`: the long explanation of a diagnostic code, with an example
and the fix (as `rustc --explain`); `--list` prints every code with its title."""

from __future__ import annotations

import argparse

from meshplan.dsl.errors import CATALOGUE, did_you_mean
from meshplan.dsl.explanations import explain

from .console import Terminal


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("codes", nargs="*", metavar="CODE", help="diagnostic codes, e.g. E506 or w101")
    p.add_argument("--list", action="store_true", help="list every code with its one-line title")


def run(args: argparse.Namespace, term: Terminal) -> int:
    if args.list or not args.codes:
        for code, title in CATALOGUE.items():
            term.print(f"{code}  {title}")
        return 0
    pages = []
    for code in args.codes:
        page = explain(code)
        if page is None:
            hint = did_you_mean(code.strip().upper(), CATALOGUE)
            return term.usage_error("explain-code", f"no diagnostic code {code!r}"
                                    + (f"; {hint}" if hint else "; `plan explain-code --list` lists them"))
        pages.append(page)
    term.print("\n".join(pages).rstrip("\n"))
    return 0
