"""Parallelism at run time: what a Program's steps do to a real model.

Owns: the device mesh and its named submeshes (`mesh`), `apply` walking a Program's
steps through one dispatch table (`apply`), the ParallelStyles torch lacks (`styles`),
and how a batch is cut over the context-parallel ranks (`context`).

May import: torch, `meshplan.planner` (the Program, the style registry),
`runtime.attention` (the ContextParallel step installs its attention). Nothing here
imports `train`, `weights` or `explain`.
"""
