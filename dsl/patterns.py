"""Module patterns: globs over the FQNs of `model.named_modules()`.

A pattern is a dot-separated path. Within one segment, `*` matches any run of
characters (so a lone `*` is exactly one segment: `model.layers.*`) and `{a,b}`
matches either alternative (`{q,k,v}_proj`). A whole segment `**` matches zero or
more segments (`**.mlp` is every `mlp` at any depth). Matching is on the whole FQN;
the root module (FQN "") is never matched — the `root` keyword names it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

_SEGMENT = re.compile(r"(?:[A-Za-z0-9_*]|\{[A-Za-z0-9_*,]+\})+")


class PatternSyntaxError(ValueError):
    """A malformed pattern; the message says what is wrong and is shown to users."""


def _segment_regex(segment: str, text: str) -> str:
    if not _SEGMENT.fullmatch(segment):
        raise PatternSyntaxError(f"`{segment}` is not a valid segment of pattern `{text}`")
    if "**" in segment:
        raise PatternSyntaxError(
            f"`**` must be a whole segment in `{text}` (write `a.**.b`, not `a**b`)"
        )
    out = []
    for m in re.finditer(r"\{([^}]*)\}|\*|[^{*]+", segment):
        token = m.group(0)
        if token == "*":
            out.append(r"[^.]*")
        elif token.startswith("{"):
            options = token[1:-1].split(",")
            if any(not o for o in options):
                raise PatternSyntaxError(f"empty alternative in `{token}` of pattern `{text}`")
            out.append("(?:" + "|".join(_segment_regex(o, text) for o in options) + ")")
        else:
            out.append(re.escape(token))
    return "".join(out)


@lru_cache(maxsize=4096)
def compile_pattern(text: str) -> re.Pattern[str]:
    """The regex for a pattern; raises PatternSyntaxError with a user-facing message."""
    parts = text.split(".")
    if any(p == "" for p in parts):
        raise PatternSyntaxError(f"empty segment in pattern `{text}` (a stray `.`)")
    regex = ""
    previous_globstar = False
    for i, part in enumerate(parts):
        if part == "**":
            if previous_globstar:
                raise PatternSyntaxError(f"`**.**` in pattern `{text}` is the same as `**`")
            if len(parts) == 1:
                regex = r"[^.]+(?:\.[^.]+)*"
            elif i == 0:
                regex += r"(?:[^.]+\.)*"
            else:
                regex += r"(?:\.[^.]+)*"
            previous_globstar = True
            continue
        segment = _segment_regex(part, text)
        regex += segment if i == 0 or (i == 1 and previous_globstar) else r"\." + segment
        previous_globstar = False
    return re.compile(regex)


def is_literal(text: str) -> bool:
    """True when the pattern has no wildcard: it names exactly one FQN."""
    return not any(c in text for c in "*{")


def matches(text: str, fqn: str) -> bool:
    return fqn != "" and compile_pattern(text).fullmatch(fqn) is not None


def select(text: str, fqns: Iterable[str]) -> list[str]:
    """The FQNs a pattern matches, in the given order."""
    regex = compile_pattern(text)
    return [f for f in fqns if f and regex.fullmatch(f)]
