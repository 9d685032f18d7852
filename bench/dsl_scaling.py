"""The language's cost against plan size: parse, check and format stay linear.

    python bench/dsl_scaling.py [--sizes 2000,8000,32000] [--out PATH]

For each shape of plan — many `submesh` lines, many `param`s, a tensor_parallel section
of many rules, one FSDP `unit` per line, each with a trailing comment — and each size
(lines), it times `parse`, `check` and `format_plan` (best of 3, after one warm-up that
builds the grammar) and prints seconds and the growth factor from one size to the next
next to the size factor: a linear phase grows like the size, a quadratic one like its
square. `plan fmt` used to take 2.5 / 9.3 / 36 s at 4k / 8k / 16k submesh lines
(the formatter looked for each submesh's run by scanning the whole plan, and comments
were attached to nodes by filtering every pending comment per node).

Results go to the terminal and to `bench/results/dsl_scaling.json`.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

from meshplan.dsl import check, format_plan, parse

HEAD = "plan bench for LlamaForCausalLM\n\nmesh {\n  dp_shard = auto\n  tp = 2\n}\n"


def _submesh(n: int) -> str:
    return HEAD + "".join(f"submesh s{i} = dp_shard * tp  # group {i}\n" for i in range(n))


def _params(n: int) -> str:
    return HEAD + "".join(f"param p{i} = {i}  # value {i}\n" for i in range(n))


def _rules(n: int) -> str:
    rules = "".join(f"  model.layers.{i}.mlp.down_proj : rowwise(output = shard(1))  # rule {i}\n"
                    for i in range(n))
    return HEAD + "tensor_parallel on tp {\n" + rules + "}\n"


def _units(n: int) -> str:
    units = "".join(f"  unit model.layers.{i}  # unit {i}\n" for i in range(n))
    return HEAD + "fully_shard on dp_shard {\n" + units + "  root\n}\n"


SHAPES: dict[str, Callable[[int], str]] = {
    "submesh": _submesh, "param": _params, "tp rules": _rules, "fsdp units": _units,
}


def _best(f: Callable[[], object], repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="2000,8000,32000")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "dsl_scaling.json"))
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    parse(HEAD)  # builds the grammar once
    rows = []
    print(f"{'shape':<12}{'lines':>8}{'parse s':>10}{'check s':>10}{'format s':>10}{'growth':>22}")
    for shape, make in SHAPES.items():
        previous: tuple[int, float] | None = None
        for n in sizes:
            text = make(n)
            tree = parse(text, "bench.plan")
            t_parse = _best(lambda text=text: parse(text, "bench.plan"))
            t_check = _best(lambda tree=tree: check(tree))
            t_format = _best(lambda tree=tree: format_plan(tree))
            total = t_parse + t_check + t_format
            growth = ""
            if previous:
                growth = f"×{total / previous[1]:.1f} for ×{n / previous[0]:.0f} lines"
            previous = (n, total)
            rows.append({"shape": shape, "lines": n, "parse_s": t_parse, "check_s": t_check,
                         "format_s": t_format})
            print(f"{shape:<12}{n:>8}{t_parse:>10.3f}{t_check:>10.3f}{t_format:>10.3f}{growth:>22}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
