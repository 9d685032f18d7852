"""Shared test helpers.

Golden files: `MESHPLAN_UPDATE_GOLDEN=1 pytest …` rewrites them from the current
output; review the diff before committing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# CI has two cores, shared by pytest and the ranks it spawns: one thread each keeps tiny
# matmuls from fighting over them.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"
PLANS = ROOT / "plans"


def assert_golden(name: str, actual: str) -> None:
    path = GOLDEN / name
    if os.environ.get("MESHPLAN_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual, encoding="utf-8")
    if not path.exists():
        pytest.fail(f"golden file {path} is missing; run with MESHPLAN_UPDATE_GOLDEN=1 to create it")
    assert actual == path.read_text(encoding="utf-8")
