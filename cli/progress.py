"""The progress display of `plan run`: rank 0's view of training, over the terminal."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    pass

from meshplan.runtime.train.loop import StepStats

__all__ = [
    "Phases",
    "ProgressDisplay",
]


@dataclass
class Phases:
    """One line as each phase before training begins (compile, build, data, resume,
    first step), with the seconds since the run started: the first step can be a
    minute away, and a silent terminal looks like a hang."""

    say: Callable[[str], None]
    start: float = field(default_factory=time.perf_counter)

    def __call__(self, what: str) -> None:
        self.say(f"[{time.perf_counter() - self.start:6.1f} s] {what} …")


@dataclass
class ProgressDisplay:
    """Rank 0's view of a run: a rich progress bar with loss and tokens/s on a terminal,
    and one plain line per logged step (on a terminal above the bar; in logs alone)."""

    total: int
    stream: TextIO | None = None
    log_every: int = 1
    enabled: bool = True
    _progress: Any = field(default=None, repr=False)
    _task: Any = field(default=None, repr=False)

    def __enter__(self) -> ProgressDisplay:
        if not self.enabled:
            return self
        import sys

        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        stream = self.stream or sys.stderr
        tty = stream.isatty()
        console = Console(file=stream, soft_wrap=True, highlight=False, force_terminal=tty,
                          color_system="auto" if tty else None)
        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} tokens/s"),
            TimeElapsedColumn(), console=console, disable=not tty, transient=False,
        )
        self._task = self._progress.add_task("train", total=self.total, loss="-", rate="-")
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def checkpoint(self, path: Path, step: int, seconds: float) -> None:
        """One line per checkpoint saved."""
        if self._progress is None:
            return
        self._progress.console.print(f"checkpoint: step {step} saved in {path} ({seconds:.1f} s)",
                                     markup=False, highlight=False)

    def __call__(self, stats: StepStats) -> None:
        if self._progress is None:
            return
        self._progress.update(self._task, completed=stats.step, loss=f"{stats.loss:.4f}",
                              rate=f"{stats.tokens_per_second:,.0f}")
        if stats.step % self.log_every == 0 or stats.step == self.total:
            self._progress.console.print(
                f"step {stats.step}/{self.total}  loss {stats.loss:.4f}  "
                f"grad-norm {stats.grad_norm:.3f}  tokens {stats.tokens:,}  "
                f"{stats.tokens_per_second:,.0f} tokens/s  {stats.seconds * 1000:.0f} ms",
                markup=False, highlight=False)
