"""`plan explain` at scale, timed beside importing torch and transformers, in one run.

    python bench/explain.py [--quick]

Each measurement runs in a fresh subprocess (no shared cache):
- `import torch, transformers` alone: the fixed cost every command pays;
- compile + explain of plans/llama.plan for Llama-3.1-405B at 16384 ranks (tp 8) and for
  Llama-3.1-70B at 512 ranks (tp 4), at the plan's sequence length, after the same
  imports (outside the clock): building the graph, the reduced dry run (one block per
  kind and step pattern, rank classes), the traced step on fake tensors, the scaling;
- `plan explain` for the 405B as a whole command (process start and imports included).
Goal: the 405B explain ≤ 3 × the import time. Prints a table and writes
bench/results/explain.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

EXPLAIN = """
import json, time
import torch, transformers
from meshplan.planner import compile_plan
from meshplan.planner.models import resolve_model
from meshplan.runtime.explain import explain
resolve_model({model!r})  # imports the model class: paid by every command, outside the clock
t = time.perf_counter()
compiled = compile_plan({plan!r}, {model!r}, {world}, {overrides!r})
t_compile = time.perf_counter() - t
ex = explain(compiled, seq_len={seq_len}, micro_batch=1)
total = time.perf_counter() - t
m = ex.memory[0]
print(json.dumps({{"compile_s": t_compile, "explain_s": total, "classes": len(ex.classes),
                  "kept_layers": list(ex.reduction.kept), "peak_bytes": m.peak,
                  "parameters_bytes": m.parameters, "activations_bytes": m.activations,
                  "comm_bytes": sum(r.bytes for r in ex.comm)}}))
"""


def in_process(code: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=ROOT, check=True,
                         capture_output=True, text=True)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="llama-3.2-1b at 64 ranks instead (smoke test)")
    args = parser.parse_args()
    plan = str(ROOT / "plans" / "llama.plan")
    cases = ([("llama-3.2-1b", 64, ["tp=4"])] if args.quick else
             [("llama-3.1-405b", 16384, ["tp=8"]), ("llama-3.1-70b", 512, ["tp=4"])])
    t_import = timed([sys.executable, "-c", "import torch, transformers"])
    rows = []
    for model, world, overrides in cases:
        figures = in_process(EXPLAIN.format(plan=plan, model=model, world=world, overrides=overrides,
                                            seq_len=4096))
        rows.append((model, world, overrides, figures))
    big, big_world, big_overrides, _ = cases[0], cases[0][1], cases[0][2], None
    cli = [sys.executable, "-W", "ignore", "-m", "meshplan.cli.main", "explain", plan, "--model", big[0],
           "--world-size", str(big_world), *[a for o in big_overrides for a in ("--set", o)], "--json"]
    t_cli = timed(cli)

    print(f"{'what':34} {'model':16} {'ranks':>6} {'seconds':>8}")
    print(f"{'import torch, transformers':34} {'':16} {'':>6} {t_import:8.2f}")
    for model, world, _, f in rows:
        print(f"{'compile_plan':34} {model:16} {world:>6} {f['compile_s']:8.2f}")
        print(f"{'compile + explain':34} {model:16} {world:>6} {f['explain_s']:8.2f}   "
              f"(layers {f['kept_layers']} traced, {f['classes']} rank classes)")
    print(f"{'plan explain --json, whole command':34} {big[0]:16} {big_world:>6} {t_cli:8.2f}")
    ratio = rows[0][3]["explain_s"] / t_import
    print(f"\n{big[0]}@{big_world} explain / import = {ratio:.2f} (goal ≤ 3)")
    out = ROOT / "bench" / "results" / "explain.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "import_torch_transformers_s": t_import,
        "cases": [{"model": m, "world_size": w, "overrides": o, **f} for m, w, o, f in rows],
        "cli_explain_s": t_cli,
        "explain_over_import": ratio,
    }, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
