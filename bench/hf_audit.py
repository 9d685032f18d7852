"""Audit transformers' own tensor-parallel plans: import, compile at world 4, measure.

    python bench/hf_audit.py [--only FAMILY,FAMILY] [--json PATH] [--plans DIR]

For every config class of the installed transformers whose model ships a TP plan
(`tests/truth_audit.py`): a tiny config from the class defaults (2 layers, small
widths), `plan import hf`, `plan compile` at world 4 (dp_shard 2 × tp 2), and the
truth (`tests/truth.py`: the plan on 4 gloo ranks against one process). Prints a table
(family, compiler, truth, seconds, detail) with a summary, and writes the rows as JSON
(default bench/results/hf_audit.json); `--plans DIR` also keeps the imported plans.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--only", default="", help="comma-separated model_types (default: all)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "hf_audit.json")
    parser.add_argument("--plans", type=Path, help="write each imported plan here")
    args = parser.parse_args(argv)

    import torch

    from tests.distributed import RankPool
    from tests.truth_audit import WORLD, audit_family, families_with_tp_plans

    torch.set_num_threads(1)
    families = [f for f in args.only.split(",") if f] or families_with_tp_plans()
    rows: list[dict[str, Any]] = []
    args.json.parent.mkdir(parents=True, exist_ok=True)
    if args.plans:
        args.plans.mkdir(parents=True, exist_ok=True)
    with RankPool(WORLD, timeout=180.0) as pool:
        for family in families:
            try:
                row, text = audit_family(pool, family)
            except Exception as e:  # the audit must go on: record what broke
                rows.append({"family": family, "stage": "audit", "compiler": "-", "truth": "-",
                             "detail": f"{type(e).__name__}: {e}"[:300], "seconds": 0})
                print(f"{family:<36} audit failed: {type(e).__name__}: {e}"[:200], flush=True)
                continue
            rows.append(row.as_dict())
            if text is not None and args.plans:
                (args.plans / f"{family}.plan").write_text(text, encoding="utf-8")
            print(f"{family:<36} {row.stage:<8} {row.compiler:<22} {row.truth:<6} {row.seconds:6.1f}s  "
                  f"{row.detail[:110]}", flush=True)
            args.json.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")  # as it goes
    print()
    by_stage = collections.Counter(r["stage"] for r in rows)
    print("stages:", ", ".join(f"{k} {v}" for k, v in sorted(by_stage.items())))
    measured = [r for r in rows if r["stage"] == "truth"]
    print("truth:", ", ".join(f"{k} {v}" for k, v in sorted(collections.Counter(r["truth"] for r in measured).items())))
    agree = sum((r["compiler"] == "accept") == (r["truth"] == "exact") for r in measured)
    print(f"compiler agrees with the truth on {agree} of {len(measured)} measured families")
    for r in measured:
        if r["truth"] != "exact":
            print(f"  {r['family']}: {r['truth']} — {r['detail'][:150]}")
    print(f"rows in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
