"""Compile meshplan's bytecode before a timed command, as installing a wheel does.

    from bytecode import compile_bytecode   # (bench/ is the script's directory)

An editable checkout compiles each module the first time it is imported and keeps the
bytecode, unless the environment says not to (`PYTHONDONTWRITEBYTECODE`, set on this
project's CI machine): then every run would compile meshplan's ~120 modules again
(about 0.3 s on two cores) while torch and transformers, installed from wheels, load
theirs. Benchmarks that time whole commands against the imports call this first, so
both sides load bytecode.
"""

from __future__ import annotations

import compileall
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("dsl", "planner", "runtime", "cli")


def compile_bytecode() -> None:
    for layer in LAYERS:
        compileall.compile_dir(ROOT / layer, quiet=1)
