"""Activation checkpointing.

Guarantees: no checkpointed module lies inside another checkpointed module (the inner
recomputation would run twice in backward, for nothing).
"""

from __future__ import annotations

import itertools

from .context import Context


class Checkpoints:
    name = "checkpoints"

    def apply(self, ctx: Context) -> None:
        fqns = sorted(ctx.checkpoints)
        for outer, inner in itertools.pairwise(fqns):
            if inner.startswith(outer + "."):
                span = ctx.checkpoints[inner].span
                ctx.error(span, "E503",
                          f"`{inner}` is checkpointed inside checkpointed `{outer}` "
                          f"(line {ctx.checkpoints[outer].span.line})",
                          "checkpoint either the block or its parts, not both",
                          related=((ctx.checkpoints[outer].span, "outer checkpoint"),))
                return
