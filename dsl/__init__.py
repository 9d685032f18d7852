"""The plan language: grammar, syntax tree, diagnostics, model-free checks, formatting.

Nothing here imports torch: `plan check` and `plan fmt` stay fast.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .checks import CheckResult, check
from .errors import PlanError, PlanRejected, Span
from .format import format_plan
from .parser import parse, parse_file
from .spec import PlanSpec


def _version() -> str:
    # The one place the version is written is pyproject.toml; the installed metadata
    # carries it here.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("meshplan")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


__version__ = _version()

__all__ = [
    "CheckResult",
    "PlanError",
    "PlanRejected",
    "PlanSpec",
    "Span",
    "__version__",
    "check",
    "format_plan",
    "load",
    "parse",
    "parse_file",
]


def load(plan: str | Path, overrides: Iterable[str] = ()) -> tuple[PlanSpec, list[PlanError]]:
    """Parse and check a plan given as a path or as plan text.

    Returns the checked plan and its warnings; raises PlanRejected with every error.
    A `str` that names an existing file, or ends in `.plan`, is read as a path.
    """
    if isinstance(plan, Path) or (("\n" not in plan) and (plan.endswith(".plan") or Path(plan).is_file())):
        tree = parse_file(plan)
    else:
        tree = parse(plan, "<plan>")
    result = check(tree, overrides)
    if result.spec is None:
        raise PlanRejected(result.diagnostics)
    return result.spec, result.warnings
