"""The planner: model graph, passes, and the Program IR.

`meshplan.planner.compile(plan, model, world_size, overrides=None) -> Program`.
Importing this package is cheap; torch and transformers load when a model is built.
"""

from __future__ import annotations

from .compile import Compiled, compile, compile_plan
from .program import Program

__all__ = ["Compiled", "Program", "compile", "compile_plan"]
