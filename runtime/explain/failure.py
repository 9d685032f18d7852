"""Where a dry run failed: the module that was running, the model's source line, the plan line.

`ModuleStack` keeps the chain of modules executing: a forward pre-hook on every module
pushes its name, its forward hook pops it. When a forward raises, the hooks after it
do not run, so the stack still ends at the innermost module that was executing (a
checkpointed block recomputing in backward runs its hooks again). `TraceFailure` is
the exception `runtime.explain.trace` raises for a step of the model that failed on
fake tensors: that module in full-model names, the innermost frame of the traceback in
the model's own source (the files defining its module classes: transformers'
`modeling_*.py`), and the error. `touching_step` maps the module to the Program step
that touched it, whose span names the plan line.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

from torch import nn

from meshplan.planner.program import (
    Program,
    Step,
)

from ..parallel.apply import StepError, apply
from .reduction import Reduction, inside
from .world import clean_name

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


@dataclass(frozen=True)
class SourceLine:
    file: str
    line: int
    function: str
    text: str

    def __str__(self) -> str:
        return f"{os.path.basename(self.file)}:{self.line} in {self.function}"


class TraceFailure(RuntimeError):
    """The model failed while the dry run applied or traced it (see the module docstring).

    `step` is the step being applied when applying failed; else the failing module's
    step is `touching_step(program, module)`."""

    def __init__(self, module: str, source: SourceLine | None, phase: str, error: BaseException,
                 step: Step | None = None) -> None:
        self.module = module
        self.source = source
        self.phase = phase
        self.step = step
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        self.error = f"{type(error).__name__}: {first}" if first else type(error).__name__
        where = f", {source}" if source else ""
        super().__init__(f"{module or 'the model'} ({phase}{where}): {self.error}")


class ModuleStack:
    """The names (wrappers removed, full-model names) of the modules executing, outermost first."""

    def __init__(self, model: nn.Module, reduction: Reduction) -> None:
        self.model = model
        self.reduction = reduction
        self.names: list[str] = []
        self._handles: list[Any] = []

    def __enter__(self) -> ModuleStack:
        for name, module in self.model.named_modules():
            full = self.reduction.to_full(clean_name(name))
            self._handles.append(module.register_forward_pre_hook(self._push(full)))
            self._handles.append(module.register_forward_hook(self._pop(full)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _push(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            self.names.append(name)

        return hook

    def _pop(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            # Pop down to this module: a wrapper's inner module shares its name.
            while self.names and self.names[-1] != name:
                self.names.pop()
            if self.names:
                self.names.pop()

        return hook

    @property
    def innermost(self) -> str:
        return self.names[-1] if self.names else ""

    def failure(self, error: BaseException, phase: str) -> TraceFailure:
        return TraceFailure(self.innermost, model_frame(error.__traceback__, model_files(self.model)),
                            phase, error)


def apply_each(program: Program, steps: Iterable[Step], model: nn.Module, mesh: DeviceMesh,
               reduction: Reduction | None = None) -> None:
    """`apply` the given steps of `program` (the reduced Program of `reduction`) one at a
    time, so that a step that fails is a `TraceFailure` carrying that step."""
    for step in steps:
        try:
            apply(dataclasses.replace(program, steps=(step,)), model, mesh=mesh)
        except Exception as e:
            cause = e.__cause__ if isinstance(e, StepError) and e.__cause__ is not None else e
            module = ", ".join(reduction.to_full(n) if reduction else n for n in step.targets())
            raise TraceFailure(module, model_frame(cause.__traceback__, model_files(model)),
                               f"applying {step.kind}", cause, step=step) from e


def model_files(model: nn.Module) -> set[str]:
    """The source files of the model's own module classes (not torch's)."""
    files: set[str] = set()
    for module in model.modules():
        cls = type(module)
        if cls.__module__.startswith("torch."):
            continue
        try:
            files.add(os.path.realpath(inspect.getfile(cls)))
        except (TypeError, OSError):
            continue
    return files


def model_frame(tb: TracebackType | None, files: Iterable[str]) -> SourceLine | None:
    """The innermost frame of `tb` in one of `files` (else in a transformers `modeling_*.py`)."""
    wanted = set(files)
    found: SourceLine | None = None
    for frame in traceback.extract_tb(tb):
        path = os.path.realpath(frame.filename)
        if path in wanted or os.path.basename(path).startswith("modeling_"):
            found = SourceLine(frame.filename, frame.lineno or 0, frame.name, (frame.line or "").strip())
    return found


def touching_step(program: Program, fqn: str) -> Step | None:
    """The step touching the innermost module that holds `fqn` (the first, in program
    order, of those touching that module); None when no step touches any of them."""
    best: tuple[int, Step] | None = None
    for step in program.steps:
        for target in step.modules() or ("",):  # a step on no named module is on the root
            if inside(fqn, target):
                depth = target.count(".") + 1 if target else 0
                if best is None or depth > best[0]:
                    best = (depth, step)
    return best[1] if best else None
