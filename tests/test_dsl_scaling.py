"""Parse, check and format do work linear in the plan's size.

Not a timing test (timings on a shared machine say little): it counts the Python lines
the language's modules and lark (the parser they drive) execute, with `sys.settrace`, for
a plan and for one four times as long. Linear work grows 4×; the quadratic steps this guards against (the
formatter scanning the whole plan for each submesh's run, comments filtered per node)
grew 16×. `bench/dsl_scaling.py` prints the seconds.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import lark
import pytest

from meshplan.dsl import check, format_plan, parse

COUNTED = (str(Path(__file__).resolve().parent.parent / "dsl"), str(Path(lark.__file__).parent))
HEAD = "plan scale for LlamaForCausalLM\n\nmesh {\n  dp_shard = auto\n  tp = 2\n}\n"

SHAPES: dict[str, Callable[[int], str]] = {
    "submesh": lambda n: HEAD + "".join(f"submesh s{i} = dp_shard * tp  # group {i}\n" for i in range(n)),
    "param": lambda n: HEAD + "".join(f"# value {i}\nparam p{i} = {i}\n" for i in range(n)),
    "tp rules": lambda n: HEAD + "tensor_parallel on tp {\n" + "".join(
        f"  model.layers.{i}.mlp.down_proj : rowwise(output = shard(1))  # rule {i}\n"
        for i in range(n)) + "}\n",
    "fsdp units": lambda n: HEAD + "fully_shard on dp_shard {\n" + "".join(
        f"  unit model.layers.{i}  # unit {i}\n" for i in range(n)) + "  root\n}\n",
}


def _lines_executed(work: Callable[[], object]) -> int:
    """Lines of dsl/ and of lark run by `work()` (the standard library's are not counted)."""
    count = 0

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal count
        if event == "line":
            count += 1
        return local

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        return local if frame.f_code.co_filename.startswith(COUNTED) else None

    sys.settrace(tracer)
    try:
        work()
    finally:
        sys.settrace(None)
    return count


def _work(text: str) -> Callable[[], object]:
    def run() -> object:
        tree = parse(text, "scale.plan")
        check(tree)
        return format_plan(tree)
    return run


@pytest.mark.parametrize("shape", SHAPES)
def test_work_grows_linearly(shape: str) -> None:
    parse(HEAD)  # the grammar is built once, outside the count
    small = _lines_executed(_work(SHAPES[shape](200)))
    large = _lines_executed(_work(SHAPES[shape](800)))
    assert large / small < 5, (shape, small, large)


def test_the_shapes_format_as_expected() -> None:
    # The counted work is the real thing: the plans parse, check and format.
    for make in SHAPES.values():
        text = make(3)
        assert check(parse(text)).errors == []
        assert format_plan(parse(format_plan(parse(text)))) == format_plan(parse(text))
    out = format_plan(parse(SHAPES["submesh"](12)))
    assert "submesh s1  = dp_shard * tp  # group 1\n" in out
