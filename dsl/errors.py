"""Spans and diagnostics.

Every AST node carries a `Span`; every problem the language or the planner finds is a
`PlanError` (or a warning) with a stable code, a span, a message and an optional hint.
Errors are collected, never raised one at a time to the user: a phase returns all it
found and the CLI renders them once, sorted, with a caret under the span.

The catalogue below is the single list of codes. A code, once published, keeps its
meaning: tests, editors and CI scripts match on it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True, order=True)
class Span:
    """A region of plan text: 1-based lines and columns, end exclusive (as lark counts)."""

    file: str
    line: int
    column: int
    end_line: int
    end_column: int

    @staticmethod
    def point(file: str, line: int = 1, column: int = 1) -> Span:
        return Span(file, line, column, line, column + 1)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


# A span that compares equal to every other: AST equality ignores spans (fields are
# declared with compare=False), this is only the default for nodes built by hand.
NOWHERE = Span("<none>", 0, 0, 0, 0)


CATALOGUE: dict[str, str] = {
    # E1xx: text that is not the language
    "E101": "syntax error",
    "E102": "unexpected character",
    "E103": "unexpected end of file",
    "E104": "file cannot be read",
    "E105": "malformed pattern",
    # E2xx: names that do not exist
    "E201": "unknown section",
    "E202": "unknown style",
    "E203": "unknown argument or setting",
    "E204": "unknown dtype",
    "E205": "unknown placement",
    "E206": "unknown mesh dimension",
    "E207": "unknown mesh dimension or submesh",
    "E208": "unknown name",
    "E209": "unknown parameter in --set",
    "E210": "unknown item",
    # E3xx: values of the wrong type or out of range
    "E301": "wrong value type",
    "E302": "ill-typed --set value",
    "E303": "value out of range",
    "E304": "malformed --set",
    # E4xx: structure
    "E401": "duplicate mesh dimension",
    "E402": "more than one auto dimension",
    "E403": "duplicate section",
    "E404": "duplicate rule",
    "E405": "duplicate setting",
    "E406": "duplicate parameter",
    "E407": "mesh dimensions out of order",
    "E408": "missing declaration",
    "E409": "invalid submesh",
    "E410": "duplicate submesh",
    "E411": "not allowed here",
    "E412": "missing required setting",
    "E413": "duplicate header",
    "E414": "settings that cannot go together",
    # E5xx (planner): the plan against the mesh and the model
    "E501": "mesh does not match the world size",
    "E502": "pattern matches no module",
    "E503": "overlapping rules",
    "E504": "style does not fit the module",
    "E505": "size does not divide",
    "E506": "layout mismatch",
    "E507": "unreduced partial value",
    "E508": "invalid FSDP structure",
    "E509": "mesh dimensions overlap",
    "E510": "model cannot be used",
    "E511": "unsupported feature",
    "E512": "pipeline cannot run as planned",
    "E513": "module cannot carry an adapter",
    "E514": "quantized base does not fit the plan",
    # W: accepted, but probably not what was meant
    "W101": "unused parameter",
    "W102": "dimension of size 1",
    "W103": "model is not one the plan is written for",
    "W104": "uneven pipeline stages",
    "W105": "FSDP resharding under a pipeline",
    "W106": "implicit redistribution",
    "W107": "uneven tensor-parallel split",
    "W108": "adapter on a tied weight",
    # E6xx / W2xx (plan explain): the plan applied to the model on a fake process group
    "E601": "dry run failed in the model",
    "W201": "uneven shards",
    "W202": "idle ranks",
    "W203": "collective over a dimension of size 1",
    "W204": "estimated memory exceeds --gpu-memory",
    "W205": "pipeline figures not modelled by the dry run",
}


@dataclass(frozen=True)
class PlanError(Exception):
    """One diagnostic. Raised only inside a phase; users see it rendered."""

    span: Span
    code: str
    message: str
    hint: str | None = None
    severity: Severity = "error"
    # Other plan lines involved (e.g. the producer of a mismatched layout).
    related: tuple[tuple[Span, str], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.code not in CATALOGUE:
            raise ValueError(f"unknown diagnostic code {self.code!r}")

    def __str__(self) -> str:
        return f"{self.span}: {self.severity}[{self.code}]: {self.message}"

    def sort_key(self) -> tuple[str, int, int, str]:
        return (self.span.file, self.span.line, self.span.column, self.code)

    def to_json(self) -> dict[str, object]:
        return {
            "file": self.span.file,
            "line": self.span.line,
            "column": self.span.column,
            "end_line": self.span.end_line,
            "end_column": self.span.end_column,
            "severity": self.severity,
            "code": self.code,
            "message": self.message,
            "hint": self.hint,
            "related": [
                {"file": s.file, "line": s.line, "column": s.column, "message": m}
                for s, m in self.related
            ],
        }


class PlanRejected(Exception):
    """Raised by an API entry point after a phase found errors; carries all of them."""

    def __init__(self, diagnostics: Iterable[PlanError]) -> None:
        self.diagnostics = sorted(diagnostics, key=PlanError.sort_key)
        first = self.diagnostics[0] if self.diagnostics else None
        super().__init__(str(first) if first else "plan rejected")

    @property
    def errors(self) -> list[PlanError]:
        return [d for d in self.diagnostics if d.severity == "error"]


def visible(text: str) -> str:
    """`text` with every character that is not printable escaped as `\\u{hex}` (as rustc does).

    Not printable means Unicode's control, format, surrogate, private-use, unassigned
    and separator characters, save the plain space: C0/C1 controls and ESC sequences,
    DEL, bidi overrides (U+202E), zero-width characters, line separators. Diagnostics
    quote plan text through this, so a plan cannot drive the reader's terminal.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\u{{{ord(c):x}}}" for c in text)


def quote(text: str, limit: int = 60) -> str:
    """Plan text for a message: escaped (see `visible`) and cut to `limit` characters."""
    cut = len(text) > limit
    return visible(text[:limit]) + ("…" if cut else "")


def did_you_mean(word: str, candidates: Iterable[str], *, n: int = 1) -> str | None:
    """A hint naming the closest candidates, or None when nothing is close."""
    close = difflib.get_close_matches(word, sorted(set(candidates)), n=n, cutoff=0.6)
    if not close:
        return None
    return "did you mean " + " or ".join(f"`{c}`" for c in close) + "?"


def one_of(candidates: Iterable[str]) -> str:
    """`a`, `b` or `c` — for hints listing every legal value."""
    items = [f"`{c}`" for c in candidates]
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " or " + items[-1]
