"""Re-measure the truth of every recorded case (`tests/plans/truth.json`).

    python bench/truth.py [--only SUBSTRING] [--unmeasured] [--record] [--json PATH]

For each broken-plan case and shipped plan: the compiler's verdict (as `plan compile`
gives it for the case's model, world and overrides) and the measured truth (`tests/truth.py`:
the plan applied on gloo ranks against one process). Prints a table (case, compiler,
recorded, measured, seconds), flags a measured truth that differs from the recorded one,
and writes the rows as JSON (default bench/results/truth.json). `--record` writes the
measured verdicts back into tests/plans/truth.json. One rank pool per world size.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def measure(cases: list[Any], pools: dict[int, Any]) -> list[dict[str, Any]]:
    from tests.truth_cases import compiler_verdict
    from tests.truth_cases import measure as measure_case

    rows = []
    for case in cases:
        start = time.perf_counter()
        verdict = compiler_verdict(case).verdict
        truth = measure_case(case, pools)
        seconds = time.perf_counter() - start
        rows.append({"case": case.id, "compiler": verdict, "recorded": case.truth, "measured": truth.truth,
                     "error": truth.error if math.isfinite(truth.error) else "inf", "detail": truth.detail,
                     "seconds": round(seconds, 2)})
        flag = "" if case.truth == truth.truth else "  (recorded " + case.truth + ")"
        print(f"{case.id:<52} {verdict:<22} {truth.truth:<6} {seconds:6.1f}s  {truth.detail[:90]}{flag}",
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--only", default="", help="measure the cases whose id contains this")
    parser.add_argument("--unmeasured", action="store_true", help="measure only cases recorded as `?`")
    parser.add_argument("--record", action="store_true", help="write the verdicts to tests/plans/truth.json")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "truth.json")
    args = parser.parse_args(argv)

    import torch

    from tests.truth_cases import cases, load_table, measured, write_table

    torch.set_num_threads(1)
    table = load_table()
    chosen = [c for c in cases(table) if args.only in c.id and (c.truth == "?" or not args.unmeasured)]
    pools: dict[int, Any] = {}
    try:
        rows = measure(chosen, pools)
    finally:
        for pool in pools.values():
            pool.close()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    changed = [r for r in rows if r["recorded"] != r["measured"]]
    print(f"\n{len(rows)} cases, {len(changed)} measured differently from the record; "
          f"{sum(r['seconds'] for r in rows):.0f} s; rows in {args.json}")
    if args.record:
        by_id = {c.id: c for c in chosen}
        for r in rows:
            error = float(r["error"]) if r["error"] != "inf" else math.inf
            table[r["case"]] = measured(by_id[r["case"]], r["measured"], error, r["detail"]).record()
        write_table(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
