"""The one terminal wrapper every command prints through.

Two rich Consoles (stdout for results, stderr for diagnostics and summaries). Colour
only on a terminal; never wrapped or cropped, so piped output and golden tests see
exactly the text. Diagnostics are rendered here and nowhere else.

Plan text is quoted, never echoed: control characters, bidi overrides and other
invisible code points are shown escaped (`\\u{1b}`, as rustc does), so a plan cannot
move the cursor, recolour the terminal or reorder what the reader sees; and a quoted
line is cut to a window around its span, so a megabyte-long line prints one short one.
"""

from __future__ import annotations

import sys
import unicodedata
from collections.abc import Iterable, Mapping
from typing import TextIO

from rich.console import Console
from rich.text import Text

from meshplan.dsl.errors import PlanError, Span, visible

# Columns of a quoted source line shown around a span (the ellipses come on top).
WINDOW = 120
# Columns kept before the span's start when the line is cut.
_LEAD = 40
# Longest message or hint printed; longer ones (a megabyte-long name quoted) are cut.
MAX_MESSAGE = 1000


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
        shown = [_shown(p) if isinstance(p, str) else p for p in parts]
        self.err.print(*shown, style=style, markup=False)

    def usage_error(self, command: str, message: str) -> int:
        self.err.print(Text(_shown(f"plan {command}: error: {message}")), markup=False)
        return 2

    def diagnostics(self, diagnostics: Iterable[PlanError]) -> None:
        for d in sorted(diagnostics, key=PlanError.sort_key):
            self._diagnostic(d)

    def _diagnostic(self, d: PlanError) -> None:
        colour = "bold red" if d.severity == "error" else "bold yellow"
        head = Text()
        location = visible(str(d.span) if d.span.line > 0 else d.span.file)
        head.append(f"{location}: ", style="bold")
        head.append(f"{d.severity}[{d.code}]", style=colour)
        head.append(f": {_shown(d.message)}", style="bold")
        self.err.print(head, markup=False)
        self._excerpt(d.span, colour)
        for span, message in d.related:
            self.err.print(Text(f"  note: {visible(str(span))}: {_shown(message)}"), markup=False)
            self._excerpt(span, "bold cyan")
        if d.hint:
            hint = Text("  hint: ", style="bold cyan")
            hint.append(_shown(d.hint))
            self.err.print(hint, markup=False)

    def _excerpt(self, span: Span, colour: str) -> None:
        lines = self._sources.get(span.file)
        if not lines or not 0 < span.line <= len(lines):
            return
        source = lines[span.line - 1].rstrip("\r")
        start = max(span.column, 1) - 1
        end = span.end_column - 1 if span.end_line == span.line else len(source)
        text, offset, width = quote_line(source, start, end)
        gutter = str(span.line)
        pad = " " * len(gutter)
        self.err.print(Text(f"  {gutter} | {text}"), markup=False)
        caret = Text(f"  {pad} | " + " " * offset)
        caret.append("^" * width, style=colour)
        self.err.print(caret, markup=False)


def _cell(ch: str) -> tuple[str, int]:
    """How one character of a quoted line is shown, and how many columns that takes."""
    if ch == "\t":
        return " ", 1
    shown = visible(ch)
    if shown != ch:
        return shown, len(shown)
    if unicodedata.combining(ch):
        return ch, 0
    return ch, 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def quote_line(source: str, start: int, end: int, window: int = WINDOW) -> tuple[str, int, int]:
    """A source line as shown under a diagnostic: (text, caret offset, caret width).

    `start`/`end` are 0-based character offsets of the span (end exclusive). Characters
    are shown escaped where they are invisible or control the terminal, and the caret is
    measured in shown columns, so it stays under the span. A line wider than `window`
    columns is cut around the span with `…` at the cut ends. Work is proportional to
    the window, not to the line.
    """
    n = len(source)
    start = min(max(start, 0), n)
    end = min(max(end, start + 1), n + 1)
    # Only a bounded stretch of characters can ever be shown: `window` columns need at
    # most `window` characters (each shown character is at least one column, save
    # combining marks, which ride on a neighbour).
    lo = max(0, start - _LEAD - window)
    hi = min(n, start + 2 * window)
    cells = [_cell(ch) for ch in source[lo:hi]]
    total = sum(w for _, w in cells)
    if lo == 0 and hi == n and total <= window:
        first, last = 0, len(cells)
    else:
        # Keep up to _LEAD columns before the span, then fill the window rightwards.
        first = start - lo
        used = 0
        while first > 0 and used + cells[first - 1][1] <= _LEAD:
            first -= 1
            used += cells[first][1]
        last = first
        used = 0
        while last < len(cells) and used + cells[last][1] <= window:
            used += cells[last][1]
            last += 1
        last = max(last, min(start - lo + 1, len(cells)))
        # Near the line's end: use what is left of the window on the left.
        while first > 0 and used + cells[first - 1][1] <= window:
            first -= 1
            used += cells[first][1]
    before = "…" if lo + first > 0 else ""
    after = "…" if lo + last < n else ""
    text = before + "".join(s for s, _ in cells[first:last]) + after
    offset = len(before) + sum(w for _, w in cells[first:start - lo])
    shown_end = min(end - lo, last)
    width = sum(w for _, w in cells[start - lo:shown_end])
    return text, offset, max(1, width)


def _shown(text: str, limit: int = MAX_MESSAGE) -> str:
    """Text for the terminal: escaped, and cut to `limit` characters (looking at no more)."""
    text = visible(text[: limit + 1])
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _console(stream: TextIO) -> Console:
    # Decided by the stream alone (not FORCE_COLOR & co.): piped output is plain text.
    tty = stream.isatty()
    return Console(file=stream, soft_wrap=True, highlight=False, force_terminal=tty,
                   color_system="auto" if tty else None)


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def summary(counts: Mapping[str, int]) -> str:
    return ", ".join(plural(v, k) for k, v in counts.items() if v)
