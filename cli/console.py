"""The one terminal wrapper every command prints through.

Two rich Consoles (stdout for results, stderr for diagnostics and summaries). Colour
only on a terminal; never wrapped or cropped, so piped output and golden tests see
exactly the text. Diagnostics are rendered here and nowhere else.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import TextIO

from rich.console import Console
from rich.text import Text

from meshplan.dsl.errors import PlanError, Span


class Terminal:
    def __init__(self, stdout: TextIO | None = None, stderr: TextIO | None = None) -> None:
        self.out = _console(stdout or sys.stdout)
        self.err = _console(stderr or sys.stderr)
        self._sources: dict[str, list[str]] = {}

    def remember(self, file: str, text: str) -> None:
        """Keep a file's text so diagnostics can quote its lines."""
        self._sources[file] = text.split("\n")

    def print(self, *parts: str | Text, style: str | None = None) -> None:
        self.out.print(*parts, style=style, markup=False)

    def note(self, *parts: str | Text, style: str | None = None) -> None:
        self.err.print(*parts, style=style, markup=False)

    def usage_error(self, command: str, message: str) -> int:
        self.err.print(Text(f"plan {command}: error: {message}"), markup=False)
        return 2

    def diagnostics(self, diagnostics: Iterable[PlanError]) -> None:
        for d in sorted(diagnostics, key=PlanError.sort_key):
            self._diagnostic(d)

    def _diagnostic(self, d: PlanError) -> None:
        colour = "bold red" if d.severity == "error" else "bold yellow"
        head = Text()
        location = str(d.span) if d.span.line > 0 else d.span.file
        head.append(f"{location}: ", style="bold")
        head.append(f"{d.severity}[{d.code}]", style=colour)
        head.append(f": {d.message}", style="bold")
        self.err.print(head, markup=False)
        self._excerpt(d.span, colour)
        for span, message in d.related:
            self.err.print(Text(f"  note: {span}: {message}"), markup=False)
            self._excerpt(span, "bold cyan")
        if d.hint:
            hint = Text("  hint: ", style="bold cyan")
            hint.append(d.hint)
            self.err.print(hint, markup=False)

    def _excerpt(self, span: Span, colour: str) -> None:
        lines = self._sources.get(span.file)
        if not lines or not 0 < span.line <= len(lines):
            return
        source = lines[span.line - 1].replace("\t", " ").rstrip("\r")
        gutter = str(span.line)
        pad = " " * len(gutter)
        start = max(span.column, 1)
        end = span.end_column if span.end_line == span.line else len(source) + 1
        width = max(1, min(end, len(source) + 1) - start)
        self.err.print(Text(f"  {gutter} | {source}"), markup=False)
        caret = Text(f"  {pad} | " + " " * (start - 1))
        caret.append("^" * width, style=colour)
        self.err.print(caret, markup=False)


def _console(stream: TextIO) -> Console:
    # Decided by the stream alone (not FORCE_COLOR & co.): piped output is plain text.
    tty = stream.isatty()
    return Console(file=stream, soft_wrap=True, highlight=False, force_terminal=tty,
                   color_system="auto" if tty else None)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def summary(counts: Mapping[str, int]) -> str:
    return ", ".join(plural(v, k) for k, v in counts.items() if v)
