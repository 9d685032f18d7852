"""Planner passes: each checks one promise of the compiler, in its own file.

A pass is a small class with a `name` and one `apply(ctx)`; its docstring states what
it guarantees once it reports no error. Passes read the checked plan and the model
graph from the `Context`, record what later passes need (the mesh, which modules each
rule matched), and report problems with `ctx.error(...)` — they never raise for user
mistakes. `planner.compile` runs them in order; a pass whose inputs an earlier pass
could not establish (say, no valid mesh) skips silently, because the earlier error
already explains the problem.
"""

from __future__ import annotations

from .context import Context, Pass, ResolvedUnit

__all__ = ["Context", "Pass", "ResolvedUnit"]
