"""Plan text → syntax tree. The only module that imports lark.

`parse()` returns a `dsl.ast.Plan` or raises `PlanRejected` carrying every error it
found: the first syntax error (LALR cannot go on past it meaningfully), or all the
malformed names and patterns of a file that parsed. Lark's exceptions never escape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import lark
from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from . import ast
from .errors import PlanError, PlanRejected, Span, quote
from .patterns import PatternSyntaxError, compile_pattern

_GRAMMAR = Path(__file__).with_name("grammar.lark")
# Deepest nesting of `{ … }` and `( … )` accepted (see `_check_nesting`).
MAX_NESTING = 32
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Values may start with digits (`schedule = 1f1b`); the lexer ensures a letter follows.
_VALUE_WORD = re.compile(r"[A-Za-z0-9_]+")
# How a terminal is described in "expected …" messages.
_TERMINAL_WORDS = {
    "WORD": "a name or pattern",
    "INT": "an integer",
    "FLOAT": "a number",
    "STRING": "a string",
    "_NL": "end of line",
    "$END": "end of file",
}


@cache
def _parser() -> Lark:
    return Lark(
        _GRAMMAR.read_text(encoding="utf-8"),
        parser="lalr",
        lexer="contextual",
        propagate_positions=True,
        maybe_placeholders=False,
        start=["start", "value"],
    )


def parse(text: str, file: str = "<plan>") -> ast.Plan:
    """Parse plan text. Raises PlanRejected (never a lark exception)."""
    text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
    tree = _lark_parse(text, file, "start")
    builder = _Builder(file)
    plan = builder.transform(tree)
    if builder.errors:
        raise PlanRejected(builder.errors)
    assert isinstance(plan, ast.Plan)
    return _attach_comments(plan, _comments(text))


def parse_file(path: str | Path) -> ast.Plan:
    """Read and parse a file; unreadable or non-UTF-8 files are E104 diagnostics."""
    name = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise PlanRejected([PlanError(Span(name, 0, 0, 0, 0), "E104", e.strerror or str(e))]) from None
    return parse(decode(data, name), name)


def decode(data: bytes, file: str) -> str:
    """Plan bytes → text. Not UTF-8: PlanRejected with E104 at the first bad byte's line and column."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        line = data.count(b"\n", 0, e.start) + 1
        # The bytes before the first bad one decode: count the column in characters.
        column = len(data[line_start : e.start].decode("utf-8")) + 1
        span = Span(file, line, column, line, column + 1)
        raise PlanRejected([PlanError(span, "E104", f"not UTF-8 text ({e.reason} at byte {e.start})",
                                      "save the plan as UTF-8")]) from None


def parse_value(text: str, origin: str) -> ast.Value:
    """Parse one value (for `--set NAME=VALUE`); `origin` names it in diagnostics."""
    tree = _lark_parse(text, origin, "value")
    builder = _Builder(origin)
    value = builder.transform(tree)
    if builder.errors:
        raise PlanRejected(builder.errors)
    return _as_value(value)


def _lark_parse(text: str, file: str, start: str) -> lark.Tree[Any]:
    if "\x00" in text:
        before = text[: text.index("\x00")]
        line = before.count("\n") + 1
        column = len(before) - (before.rfind("\n") + 1) + 1
        raise PlanRejected([PlanError(Span.point(file, line, column), "E102", "NUL byte in plan text")])
    _check_nesting(text, file)
    try:
        # A final line end makes every statement end the same way.
        return _parser().parse(text + "\n" if start == "start" else text, start=start)
    except UnexpectedInput as e:
        raise PlanRejected([_syntax_error(e, file, text)]) from None


def _check_nesting(text: str, file: str) -> None:
    """Refuse brackets nested deeper than MAX_NESTING, at the bracket that goes too deep.

    Every later phase (the tree builder, checks, formatting, equality of nodes) walks the
    tree recursively; bounding the depth here, in one linear pass, keeps them all far
    from Python's recursion limit whatever the input.
    """
    if text.count("(") + text.count("{") <= MAX_NESTING:
        return
    depth = 0
    line = column = 1
    in_string = in_comment = False
    for ch in text:
        if ch == "\n":
            line, column = line + 1, 1
            in_string = in_comment = False
            continue
        if in_comment:
            pass
        elif ch == '"':
            in_string = not in_string
        elif in_string:
            pass
        elif ch == "#":
            in_comment = True
        elif ch in "({":
            depth += 1
            if depth > MAX_NESTING:
                raise PlanRejected([PlanError(
                    Span.point(file, line, column), "E101",
                    f"`{ch}` nested more than {MAX_NESTING} levels deep",
                    "plans need only a few levels of `{ … }` and `( … )`")])
        elif ch in ")}":
            depth = max(depth - 1, 0)
        column += 1


def _describe(name: str) -> str:
    if name in _TERMINAL_WORDS:
        return _TERMINAL_WORDS[name]
    try:
        pattern = _parser().get_terminal(name).pattern
    except KeyError:
        return name.lower()
    return f"`{pattern.value}`" if isinstance(pattern, lark.lexer.PatternStr) else name.lower()


def _expected(names: set[str]) -> str:
    if {"WORD", "INT", "STRING"} <= names:
        names = (set(names) - {"WORD", "INT", "FLOAT", "STRING"}) | {"VALUE"}
    words = sorted({"a value" if n == "VALUE" else _describe(n) for n in names})
    if len(words) > 6:
        words = [*words[:6], "…"]
    return ", ".join(words)


def _token_text(token: Token) -> str:
    if token.type == "_NL":
        return "end of line"
    if token.type == "$END":
        return "end of file"
    return f"`{quote(str(token.value))}`"


def _syntax_error(e: UnexpectedInput, file: str, text: str) -> PlanError:
    error = _syntax_error_bare(e, file, text)
    lines = text.split("\n")
    at_top = 0 < error.span.line <= len(lines) and not lines[error.span.line - 1][:1].isspace()
    # An unclosed brace shows up later, at a statement that looks out of place.
    hint = error.hint or (_unclosed_brace(text, error.span.line, error.span.column)
                          if error.code == "E103" or at_top else None)
    return PlanError(error.span, error.code, error.message, hint)


def _unclosed_brace(text: str, line: int, column: int) -> str | None:
    """Name the `{` still open before an error, the usual cause of a confusing one."""
    open_lines: list[int] = []
    lines = text.split("\n")[: max(line, 0)]
    if lines:
        lines[-1] = lines[-1][: max(column - 1, 0)]
    for number, content in enumerate(lines, start=1):
        in_string = False
        for ch in content:
            if ch == '"':
                in_string = not in_string
            elif in_string:
                continue
            elif ch == "#":
                break
            elif ch == "{":
                open_lines.append(number)
            elif ch == "}" and open_lines:
                open_lines.pop()
    if open_lines:
        return f"the `{{` opened at line {open_lines[-1]} is not closed"
    return None


def _syntax_error_bare(e: UnexpectedInput, file: str, text: str) -> PlanError:
    line = getattr(e, "line", 0) or 0
    column = getattr(e, "column", 0) or 0
    if isinstance(e, UnexpectedToken):
        expected = e.accepts or e.expected
        token = e.token
        if token.type == "$END" or line <= 0:
            last = text.rstrip("\n").split("\n")
            line, column = len(last), len(last[-1]) + 1
            return PlanError(
                Span.point(file, line, column), "E103",
                f"unexpected end of file, expected {_expected(expected)}",
            )
        if token.type == "_NL":
            # Point at the end of the line rather than at the line break's next line.
            end = Span.point(file, token.line or line, token.column or column)
            return PlanError(end, "E101", f"unexpected end of line, expected {_expected(expected)}")
        width = max(1, len(str(token.value).split("\n")[0]))
        span = Span(file, line, column, line, column + width)
        hint = None
        before = text.split("\n")[line - 1][: column - 1] if 0 < line <= text.count("\n") + 1 else ""
        if token.type == "COMMA" and " on " in f" {before}" and "(" not in before:
            hint = "several dimensions are written `on (A, B)`"
        elif token.type == "WORD" and "COLON" in expected:
            hint = "a rule is written `PATTERN : STYLE`"
        return PlanError(span, "E101", f"unexpected {_token_text(token)}, expected {_expected(expected)}", hint)
    if isinstance(e, UnexpectedCharacters):
        pos = e.pos_in_stream or 0
        char = text[pos] if pos < len(text) else ""
        shown = repr(char)[1:-1] if char.isprintable() else f"U+{ord(char):04X}" if char else "?"
        hint = None
        if char in "\"'":
            hint = "strings are written in double quotes on one line"
        elif char == "=":
            hint = "`=` must follow a name"
        return PlanError(Span.point(file, line, column), "E102", f"unexpected character `{shown}`", hint)
    if isinstance(e, UnexpectedEOF):
        last = text.rstrip("\n").split("\n")
        return PlanError(
            Span.point(file, len(last), len(last[-1]) + 1), "E103",
            f"unexpected end of file, expected {_expected(set(e.expected))}",
        )
    return PlanError(Span.point(file, line, column), "E101", str(e).split("\n")[0])


# ----------------------------------------------------------------- tree → AST


def _span(file: str, meta: Any) -> Span:
    return Span(file, meta.line, meta.column, meta.end_line, meta.end_column)


def _tspan(file: str, t: Token) -> Span:
    return Span(file, t.line or 0, t.column or 0, t.end_line or 0, t.end_column or 0)


def _as_value(v: object) -> ast.Value:
    if isinstance(v, ast.Int | ast.Float | ast.Bool | ast.Str | ast.Name | ast.Call):
        return v
    raise TypeError(f"not a value: {v!r}")  # grammar guarantees it; kept for the type checker


N = TypeVar("N", bound=ast.Node)


@v_args(meta=True, inline=True)
class _Builder(Transformer[Token, Any]):
    def __init__(self, file: str) -> None:
        super().__init__()
        self.file = file
        self.errors: list[PlanError] = []

    # -- helpers
    def _name(self, t: Token, what: str, form: re.Pattern[str] = _IDENT) -> str:
        text = str(t)
        if not form.fullmatch(text):
            self.errors.append(
                PlanError(_tspan(self.file, t), "E101", f"expected {what}, found `{quote(text)}`",
                          "names are letters, digits and `_`, not starting with a digit")
            )
        return text

    def _pattern(self, t: Token) -> ast.Pattern:
        text = str(t)
        try:
            compile_pattern(text)
        except PatternSyntaxError as e:
            self.errors.append(PlanError(_tspan(self.file, t), "E105", str(e)))
        return ast.Pattern(text=text, span=_tspan(self.file, t))

    def _ref(self, t: Token, what: str) -> ast.Ref:
        return ast.Ref(name=self._name(t, what), span=_tspan(self.file, t))

    # -- values
    def int_value(self, meta: Any, t: Token) -> ast.Int:
        text = str(t)
        # Beyond 64 bits no size or count makes sense (and Python's int() has a digit limit).
        if len(text.lstrip("-")) > 19 or not -(2**63) <= int(text) < 2**63:
            self.errors.append(PlanError(_span(self.file, meta), "E303",
                                         f"integer `{text[:24]}{'…' if len(text) > 24 else ''}` is out of range",
                                         "integers must fit in 64 bits"))
            return ast.Int(value=0, span=_span(self.file, meta))
        return ast.Int(value=int(text), span=_span(self.file, meta))

    def float_value(self, meta: Any, t: Token) -> ast.Float:
        text = str(t)
        value = float(text)
        # Beyond float range the text reads as infinity: no setting means that.
        if value in (float("inf"), float("-inf")):
            self.errors.append(PlanError(_span(self.file, meta), "E303",
                                         f"number `{text[:24]}{'…' if len(text) > 24 else ''}` is out of range",
                                         "numbers must fit in a 64-bit float"))
            return ast.Float(value=0.0, span=_span(self.file, meta))
        return ast.Float(value=value, span=_span(self.file, meta))

    def string_value(self, meta: Any, t: Token) -> ast.Str:
        return ast.Str(value=str(t)[1:-1], span=_span(self.file, meta))

    def word_value(self, meta: Any, t: Token) -> ast.Value:
        span = _span(self.file, meta)
        text = str(t)
        if text in ("true", "false"):
            return ast.Bool(value=text == "true", span=span)
        return ast.Name(name=self._name(t, "a value", _VALUE_WORD), span=span)

    def call_value(self, meta: Any, t: Token, *args: ast.Value) -> ast.Call:
        return ast.Call(name=self._name(t, "a name"), args=tuple(args), span=_span(self.file, meta))

    # -- styles
    def keyword_arg(self, meta: Any, t: Token, value: ast.Value) -> ast.KeywordArg:
        return ast.KeywordArg(name=self._name(t, "an argument name"), value=value, span=_span(self.file, meta))

    def named_conversion(self, meta: Any, t: Token, src: ast.Value, dst: ast.Value) -> ast.Conversion:
        return ast.Conversion(name=self._name(t, "an input name"), source=src, target=dst,
                              span=_span(self.file, meta))

    def conversion(self, meta: Any, src: ast.Value, dst: ast.Value) -> ast.Conversion:
        return ast.Conversion(name=None, source=src, target=dst, span=_span(self.file, meta))

    def positional_arg(self, meta: Any, value: ast.Value) -> ast.PositionalArg:
        return ast.PositionalArg(value=value, span=_span(self.file, meta))

    def style(self, meta: Any, t: Token, *args: ast.StyleArg) -> ast.Style:
        return ast.Style(name=self._name(t, "a style name"), args=tuple(args), span=_span(self.file, meta))

    # -- bodies
    def patterns(self, meta: Any, *tokens: Token) -> tuple[ast.Pattern, ...]:
        return tuple(self._pattern(t) for t in tokens)

    def setting(self, meta: Any, t: Token, value: ast.Value) -> ast.Setting:
        return ast.Setting(key=self._name(t, "a setting name"), value=value, span=_span(self.file, meta))

    def rule(self, meta: Any, patterns: tuple[ast.Pattern, ...], style: ast.Style) -> ast.Rule:
        return ast.Rule(patterns=patterns, style=style, span=_span(self.file, meta))

    def item(self, meta: Any, t: Token, *rest: Any) -> ast.Item:
        patterns = next((r for r in rest if isinstance(r, tuple)), ())
        body = next((r for r in rest if isinstance(r, ast.Body)), None)
        return ast.Item(keyword=str(t), patterns=patterns, body=body,
                        span=_span(self.file, meta))

    def body(self, meta: Any, *entries: ast.Entry) -> ast.Body:
        return ast.Body(entries=entries, span=_span(self.file, meta))

    # -- statements
    def header(self, meta: Any, name: Token, *archs: Token) -> ast.Header:
        return ast.Header(name=self._name(name, "a plan name"),
                          archs=tuple(self._name(a, "an architecture name") for a in archs),
                          span=_span(self.file, meta))

    def param(self, meta: Any, name: Token, value: ast.Value) -> ast.Param:
        return ast.Param(name=self._name(name, "a parameter name"), value=value, span=_span(self.file, meta))

    def mesh_dim(self, meta: Any, name: Token, value: ast.Value) -> ast.MeshDim:
        return ast.MeshDim(name=self._name(name, "a mesh dimension"), value=value, span=_span(self.file, meta))

    def mesh(self, meta: Any, *dims: ast.MeshDim) -> ast.Mesh:
        return ast.Mesh(dims=dims, span=_span(self.file, meta))

    def submesh(self, meta: Any, name: Token, *dims: Token) -> ast.Submesh:
        refs: list[ast.Ref] = []
        for t in dims:
            # `a*b` without spaces lexes as one word (it is also a valid pattern).
            column = t.column or 0
            for piece in str(t).split("*"):
                span = Span(self.file, t.line or 0, column, t.line or 0, column + len(piece))
                if piece:
                    refs.append(ast.Ref(name=piece, span=span))
                    if not _IDENT.fullmatch(piece):
                        self.errors.append(PlanError(span, "E101", f"expected a mesh dimension, found `{quote(piece)}`"))
                column += len(piece) + 1
        return ast.Submesh(name=self._name(name, "a submesh name"), dims=tuple(refs), span=_span(self.file, meta))

    def on_single(self, meta: Any, t: Token) -> tuple[bool, tuple[ast.Ref, ...]]:
        return (False, (self._ref(t, "a mesh dimension or submesh"),))

    def on_group(self, meta: Any, *tokens: Token) -> tuple[bool, tuple[ast.Ref, ...]]:
        return (True, tuple(self._ref(t, "a mesh dimension or submesh") for t in tokens))

    def section(self, meta: Any, kind: Token, *rest: Any) -> ast.Section:
        on: tuple[ast.Ref, ...] = ()
        group = False
        patterns: tuple[ast.Pattern, ...] = ()
        body = None
        for r in rest:
            if isinstance(r, ast.Body):
                body = r
            elif isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], bool):
                group, on = r
            elif isinstance(r, tuple):
                patterns = r
        return ast.Section(kind=self._name(kind, "a section name"), on=on, on_group=group,
                           patterns=patterns, body=body, span=_span(self.file, meta))

    def start(self, meta: Any, *statements: ast.Statement) -> ast.Plan:
        span = _span(self.file, meta) if not meta.empty else Span.point(self.file)
        return ast.Plan(file=self.file, statements=statements, span=span)


# ------------------------------------------------------------------- comments


@dataclass(frozen=True)
class _Comment:
    line: int
    text: str
    own_line: bool


def _comments(text: str) -> list[_Comment]:
    """Every `#` comment outside a string, with whether it stands on a line of its own."""
    found = []
    for number, line in enumerate(text.split("\n"), start=1):
        in_string = False
        for i, ch in enumerate(line):
            if ch == '"':
                in_string = not in_string
            elif ch == "#" and not in_string:
                body = line[i + 1 :].rstrip()
                body = body[1:] if body.startswith(" ") else body
                found.append(_Comment(number, body, not line[:i].strip()))
                break
    return found


def _attach_comments(plan: ast.Plan, comments: list[_Comment]) -> ast.Plan:
    statements, rest = _attach_list(plan.statements, comments)
    return replace(plan, statements=tuple(statements), end_comments=tuple(c.text for c in rest))


def _attach_list(nodes: tuple[N, ...], comments: list[_Comment]) -> tuple[list[N], list[_Comment]]:
    """Give each line node the comments before it and the one at the end of its first line.

    A comment at the end of a line that starts no node (a closing brace) is treated as
    one standing on its own line there: it is kept, never dropped.
    """
    # Nodes and comments are both in line order: one cursor walks the comments, so the
    # work is linear in nodes + comments (a plan of thousands of lines stays fast).
    out: list[N] = []
    i = 0
    for node in nodes:
        start, end = node.span.line, node.span.end_line
        j = i
        while j < len(comments) and comments[j].line < start:
            j += 1
        k = j
        while k < len(comments) and comments[k].line <= end:
            k += 1
        before, within = comments[i:j], comments[j:k]
        trailing = next((c for c in within if c.line == start and not c.own_line), None)
        inside = [c for c in within if c is not trailing]
        i = k
        node = _attach_inside(node, inside)
        if isinstance(node, ast.Line):
            node = replace(node, leading=tuple(c.text for c in before),
                           trailing=trailing.text if trailing else None)
        out.append(node)
    return out, comments[i:]


def _attach_inside(node: N, comments: list[_Comment]) -> N:
    if isinstance(node, ast.Mesh):
        dims, rest = _attach_list(node.dims, comments)
        return replace(node, dims=tuple(dims), end_comments=tuple(c.text for c in rest))
    if isinstance(node, ast.Section | ast.Item) and node.body is not None:
        entries, rest = _attach_list(node.body.entries, comments)
        body = replace(node.body, entries=tuple(entries), end_comments=tuple(c.text for c in rest))
        return replace(node, body=body)
    return node
