"""The planner: model graph, passes, and the Program IR.

`meshplan.planner.compile_plan(plan, model, world_size, overrides=None)` -> `Compiled` (the
Program, the model graph and the warnings); `meshplan.planner.compile.compile` returns the
Program alone. Importing this package is cheap; torch and transformers load when a model
is built.
"""

from __future__ import annotations

from .compile import Compiled, compile_plan
from .program import Program

__all__ = ["Compiled", "Program", "compile_plan"]
