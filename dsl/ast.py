"""The syntax tree of a `.plan` file.

Frozen, keyword-only dataclasses. The tree is faithful to the text (it is what
`plan fmt` prints back), not yet interpreted: section kinds, setting keys and style
names are strings here and are checked against the schema by `dsl.checks`, which turns
a tree into a `dsl.spec.PlanSpec`.

Every node has a `span`; spans are excluded from equality so that
`parse(format(tree)) == tree` holds. Line-level nodes also keep the comments written
before them (`leading`) and at the end of their line (`trailing`), so formatting never
drops a comment.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import NOWHERE, Span


@dataclass(frozen=True, kw_only=True)
class Node:
    span: Span = field(default=NOWHERE, compare=False, repr=False)

    def head(self, text: str) -> Span:
        """The span of `text` written at the start of this node (a key, a keyword)."""
        s = self.span
        return Span(s.file, s.line, s.column, s.line, s.column + len(text))


@dataclass(frozen=True, kw_only=True)
class Line(Node):
    """A node that starts a line of its own and may carry comments."""

    leading: tuple[str, ...] = ()
    trailing: str | None = None


# ---------------------------------------------------------------------------- values


@dataclass(frozen=True, kw_only=True)
class Int(Node):
    value: int


@dataclass(frozen=True, kw_only=True)
class Float(Node):
    """A number written with a fractional part (`0.05`); `plan fmt` writes it canonically."""

    value: float


@dataclass(frozen=True, kw_only=True)
class Bool(Node):
    value: bool


@dataclass(frozen=True, kw_only=True)
class Str(Node):
    value: str


@dataclass(frozen=True, kw_only=True)
class Name(Node):
    """A bare word: a dtype, an enum member, a placement, `auto`, or a `param` name."""

    name: str


@dataclass(frozen=True, kw_only=True)
class Call(Node):
    """`shard(1)`: a word applied to arguments."""

    name: str
    args: tuple[Value, ...]


Value = Int | Float | Bool | Str | Name | Call


@dataclass(frozen=True, kw_only=True)
class Ref(Node):
    """A name that refers to something declared elsewhere (a mesh dimension, a submesh)."""

    name: str


@dataclass(frozen=True, kw_only=True)
class Pattern(Node):
    """A module glob over `named_modules()` FQNs; see `dsl.patterns`."""

    text: str


# ------------------------------------------------------------------------ styles


@dataclass(frozen=True, kw_only=True)
class KeywordArg(Node):
    """`output = shard(1)`."""

    name: str
    value: Value


@dataclass(frozen=True, kw_only=True)
class Conversion(Node):
    """`shard(1) -> replicate`, optionally for one named input: `hidden_states: … -> …`."""

    name: str | None
    source: Value
    target: Value


@dataclass(frozen=True, kw_only=True)
class PositionalArg(Node):
    value: Value


StyleArg = KeywordArg | Conversion | PositionalArg


@dataclass(frozen=True, kw_only=True)
class Style(Node):
    name: str
    args: tuple[StyleArg, ...] = ()


# ------------------------------------------------------------------ section bodies


@dataclass(frozen=True, kw_only=True)
class Setting(Line):
    """`key = value`."""

    key: str
    value: Value


@dataclass(frozen=True, kw_only=True)
class Rule(Line):
    """`pattern : style` (tensor_parallel)."""

    patterns: tuple[Pattern, ...]
    style: Style


@dataclass(frozen=True, kw_only=True)
class Item(Line):
    """`keyword [patterns] [{ body }]`: `unit a, b { … }`, `root`, `attention p`, `mixed_precision { … }`."""

    keyword: str
    patterns: tuple[Pattern, ...] = ()
    body: Body | None = None


Entry = Setting | Rule | Item


@dataclass(frozen=True, kw_only=True)
class Body(Node):
    entries: tuple[Entry, ...] = ()
    # Comments after the last entry, before the closing brace.
    end_comments: tuple[str, ...] = ()


# ------------------------------------------------------------------- statements


@dataclass(frozen=True, kw_only=True)
class Header(Line):
    """`plan NAME for ARCH, …`."""

    name: str
    archs: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class Param(Line):
    """`param NAME = VALUE`: a typed constant that `--set NAME=VALUE` overrides."""

    name: str
    value: Value


@dataclass(frozen=True, kw_only=True)
class MeshDim(Line):
    name: str
    value: Value


@dataclass(frozen=True, kw_only=True)
class Mesh(Line):
    dims: tuple[MeshDim, ...]
    end_comments: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Submesh(Line):
    """`submesh NAME = DIM * DIM …`: a flattened group of mesh dimensions."""

    name: str
    dims: tuple[Ref, ...]


@dataclass(frozen=True, kw_only=True)
class Section(Line):
    """`KIND [on TARGETS] [patterns] [{ body }]`: every other top-level statement."""

    kind: str
    on: tuple[Ref, ...] = ()
    # Written as `on (a, b)` rather than `on a`; kept so formatting is faithful.
    on_group: bool = False
    patterns: tuple[Pattern, ...] = ()
    body: Body | None = None


Statement = Header | Param | Mesh | Submesh | Section


@dataclass(frozen=True, kw_only=True)
class Plan(Node):
    file: str = field(default="<plan>", compare=False)
    statements: tuple[Statement, ...] = ()
    end_comments: tuple[str, ...] = ()

    @property
    def header(self) -> Header | None:
        return next((s for s in self.statements if isinstance(s, Header)), None)

    @property
    def params(self) -> tuple[Param, ...]:
        return tuple(s for s in self.statements if isinstance(s, Param))

    @property
    def mesh(self) -> Mesh | None:
        return next((s for s in self.statements if isinstance(s, Mesh)), None)

    @property
    def submeshes(self) -> tuple[Submesh, ...]:
        return tuple(s for s in self.statements if isinstance(s, Submesh))

    @property
    def sections(self) -> tuple[Section, ...]:
        return tuple(s for s in self.statements if isinstance(s, Section))
