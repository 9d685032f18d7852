"""Syntax tree → canonical plan text.

Canonical means: two-space indentation; one blank line between top-level statements
except within a run of `param`s and after `mesh` among `submesh`es; aligned `=` in a
run of submeshes and aligned `:` in a `tensor_parallel` body; `key = value` with
spaces; comments kept where they were (before a line, or at its end). A body written
on one line stays on one line when it holds only settings and no comments; anything
else is one entry per line.

Guarantees: `format(parse(format(t))) == format(t)` (idempotent) and
`parse(format(t)) == t` (spans aside).
"""

from __future__ import annotations

from . import ast
from .schema import shown

INDENT = "  "
MAX_INLINE = 100
# Separates a line from its trailing comment until `_align` pads the comments of
# consecutive commented lines to one column.
_MARK = "\x00"


def format_plan(plan: ast.Plan) -> str:
    lines: list[str] = []
    previous: ast.Statement | None = None
    widths = _submesh_widths(plan)
    for statement in plan.statements:
        if previous is not None and _blank_between(previous, statement):
            lines.append("")
        lines.extend(_statement(statement, widths))
        previous = statement
    if plan.end_comments:
        if lines:
            lines.append("")
        lines.extend(_comment(c) for c in plan.end_comments)
    return "\n".join(_align(lines)) + "\n" if lines else ""


def _align(lines: list[str]) -> list[str]:
    out: list[str] = []
    run: list[str] = []
    for line in [*lines, ""]:
        if _MARK in line:
            run.append(line)
            continue
        if run:
            width = max(len(r.split(_MARK)[0]) for r in run)
            out.extend(code.ljust(width) + "  " + comment for code, comment in (r.split(_MARK) for r in run))
            run = []
        out.append(line)
    return out[:-1]


def _blank_between(a: ast.Statement, b: ast.Statement) -> bool:
    if isinstance(a, ast.Param) and isinstance(b, ast.Param):
        return bool(b.leading)
    if isinstance(a, ast.Mesh | ast.Submesh) and isinstance(b, ast.Submesh):
        return bool(b.leading)
    return True


def _comment(text: str) -> str:
    return "# " + text if text else "#"


def _with_comments(node: ast.Line, indent: str, body: list[str]) -> list[str]:
    """Leading comments above, the trailing comment at the end of the node's first line."""
    out = [indent + _comment(c) for c in node.leading]
    if node.trailing is not None:
        body = [body[0] + _MARK + _comment(node.trailing), *body[1:]]
    return out + body


def _value(v: ast.Value) -> str:
    return shown(v)


def _style(style: ast.Style) -> str:
    if not style.args:
        return style.name
    return f"{style.name}({', '.join(_style_arg(a) for a in style.args)})"


def _style_arg(arg: ast.StyleArg) -> str:
    if isinstance(arg, ast.KeywordArg):
        return f"{arg.name} = {_value(arg.value)}"
    if isinstance(arg, ast.Conversion):
        prefix = f"{arg.name}: " if arg.name else ""
        return f"{prefix}{_value(arg.source)} -> {_value(arg.target)}"
    return _value(arg.value)


def _patterns(patterns: tuple[ast.Pattern, ...]) -> str:
    return ", ".join(p.text for p in patterns)


def _statement(s: ast.Statement, widths: dict[int, int]) -> list[str]:
    if isinstance(s, ast.Header):
        return _with_comments(s, "", [f"plan {s.name} for {', '.join(s.archs)}"])
    if isinstance(s, ast.Param):
        return _with_comments(s, "", [f"param {s.name} = {_value(s.value)}"])
    if isinstance(s, ast.Mesh):
        inner = [line for d in s.dims
                 for line in _with_comments(d, INDENT, [f"{INDENT}{d.name} = {_value(d.value)}"])]
        inner += [INDENT + _comment(c) for c in s.end_comments]
        return _with_comments(s, "", ["mesh {", *inner, "}"])
    if isinstance(s, ast.Submesh):
        # Align `=` across the run of submeshes this one belongs to.
        width = widths.get(id(s), len(s.name))
        return _with_comments(s, "", [f"submesh {s.name.ljust(width)} = {' * '.join(d.name for d in s.dims)}"])
    head = s.kind
    if s.on:
        names = [r.name for r in s.on]
        head += f" on ({', '.join(names)})" if s.on_group or len(names) > 1 else f" on {names[0]}"
    if s.patterns:
        head += " " + _patterns(s.patterns)
    return _with_comments(s, "", _with_body(head, s.body, "", inline_ok=True))


def _submesh_widths(plan: ast.Plan) -> dict[int, int]:
    """The name width each submesh is aligned to, keyed by `id()`: one pass over the plan.

    A run is consecutive `submesh` statements; a leading comment starts a new run (the
    blank line the formatter puts before it separates them).
    """
    widths: dict[int, int] = {}
    run: list[ast.Submesh] = []

    def close() -> None:
        width = max((len(x.name) for x in run), default=0)
        widths.update((id(x), width) for x in run)
        run.clear()

    for statement in plan.statements:
        if not isinstance(statement, ast.Submesh):
            close()
            continue
        if statement.leading and run:
            close()
        run.append(statement)
    close()
    return widths


def _inline(body: ast.Body) -> str | None:
    """`{ a = 1, b = 2 }` when the body holds only comment-free settings, else None."""
    if body.end_comments or not body.entries:
        return None if body.end_comments else "{}"
    parts = []
    for entry in body.entries:
        if not isinstance(entry, ast.Setting) or entry.leading or entry.trailing is not None:
            return None
        parts.append(f"{entry.key} = {_value(entry.value)}")
    return "{ " + ", ".join(parts) + " }"


def _with_body(head: str, body: ast.Body | None, indent: str, *, inline_ok: bool) -> list[str]:
    if body is None:
        return [indent + head]
    inline = _inline(body)
    written_on_one_line = body.span.line == body.span.end_line
    if inline is not None and written_on_one_line and inline_ok:
        line = f"{indent}{head} {inline}"
        if len(line) <= MAX_INLINE:
            return [line]
    inner = indent + INDENT
    rule_width = max((len(_patterns(e.patterns)) for e in body.entries if isinstance(e, ast.Rule)), default=0)
    lines = [f"{indent}{head} {{"]
    for entry in body.entries:
        if isinstance(entry, ast.Setting):
            text = [f"{inner}{entry.key} = {_value(entry.value)}"]
        elif isinstance(entry, ast.Rule):
            text = [f"{inner}{_patterns(entry.patterns).ljust(rule_width)} : {_style(entry.style)}"]
        else:
            item_head = entry.keyword + (" " + _patterns(entry.patterns) if entry.patterns else "")
            text = _with_body(item_head, entry.body, inner, inline_ok=True)
        lines.extend(_with_comments(entry, inner, text))
    lines.extend(inner + _comment(c) for c in body.end_comments)
    lines.append(indent + "}")
    return lines
