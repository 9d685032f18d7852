"""`plan explain` at scale, timed beside the imports it cannot avoid, in one run.

    python bench/explain.py [--quick] [--repeat N]

Each measurement runs in a fresh subprocess (no shared cache), and the measurements
alternate, so that a machine that is slower for a while slows all of them alike:
- `import torch; from transformers import LlamaForCausalLM`: the fixed cost every
  command pays before it can build the model;
- `plan explain plans/llama.plan --json` as a whole command (process start and imports
  included) for Llama-3.1-405B at 16384 ranks (tp 8) and Llama-3.1-70B at 512 ranks
  (tp 4), at the plan's sequence length;
- in-process, after the same imports (outside the clock): compile, then explain —
  building the graph, the reduced dry run (one block per kind and step pattern, rank
  classes), the traced step on fake tensors, the scaling.
Goals: the whole 405B command ≤ 1.5 × the imports, the 70B ≤ 1.25 ×. The medians of
`--repeat` runs (default 3) are compared. Prints a table and writes
bench/results/explain.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bytecode import compile_bytecode

ROOT = Path(__file__).resolve().parent.parent
IMPORTS = "import torch; from transformers import LlamaForCausalLM"
# The same imports, the process ended as `plan explain` ends it (`cli.main.quick_exit`: no
# interpreter teardown, ~2.5 s with torch and transformers loaded): printed beside, so the
# ratio against imports that skip teardown too can be read off.
IMPORTS_NO_TEARDOWN = IMPORTS + "; import os; os._exit(0)"
GOALS = {"llama-3.1-405b": 1.5, "llama-3.1-70b": 1.25}

EXPLAIN = """
import json, time
import torch
from transformers import LlamaForCausalLM
from meshplan.planner import compile_plan
from meshplan.planner.models import resolve_model
from meshplan.runtime.explain.report import explain
resolve_model({model!r})
t = time.perf_counter()
compiled = compile_plan({plan!r}, {model!r}, {world}, {overrides!r})
t_compile = time.perf_counter() - t
ex = explain(compiled, seq_len={seq_len}, micro_batch=1)
total = time.perf_counter() - t
m = ex.memory[0]
print(json.dumps({{"compile_s": t_compile, "explain_s": total - t_compile, "classes": len(ex.classes),
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


def cli(plan: str, model: str, world: int, overrides: list[str]) -> list[str]:
    return [sys.executable, "-W", "ignore", "-m", "meshplan.cli.main", "explain", plan, "--model", model,
            "--world-size", str(world), *[a for o in overrides for a in ("--set", o)], "--json"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="llama-3.2-1b at 64 ranks instead (smoke test)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement (median taken)")
    args = parser.parse_args()
    compile_bytecode()
    plan = str(ROOT / "plans" / "llama.plan")
    cases = ([("llama-3.2-1b", 64, ["tp=4"])] if args.quick else
             [("llama-3.1-405b", 16384, ["tp=8"]), ("llama-3.1-70b", 512, ["tp=4"])])
    imports: list[float] = []
    imports_bare: list[float] = []
    commands: dict[str, list[float]] = {m: [] for m, _, _ in cases}
    figures: dict[str, list[dict[str, float]]] = {m: [] for m, _, _ in cases}
    for _ in range(max(1, args.repeat)):
        imports.append(timed([sys.executable, "-c", IMPORTS]))
        imports_bare.append(timed([sys.executable, "-c", IMPORTS_NO_TEARDOWN]))
        for model, world, overrides in cases:
            commands[model].append(timed(cli(plan, model, world, overrides)))
            figures[model].append(in_process(EXPLAIN.format(plan=plan, model=model, world=world,
                                                            overrides=overrides, seq_len=4096)))
    t_import = statistics.median(imports)
    t_bare = statistics.median(imports_bare)
    rows = []
    for model, world, overrides in cases:
        runs = figures[model]
        rows.append({"model": model, "world_size": world, "overrides": overrides,
                     "command_s": statistics.median(commands[model]),
                     "compile_s": statistics.median(r["compile_s"] for r in runs),
                     "explain_s": statistics.median(r["explain_s"] for r in runs),
                     **{k: v for k, v in runs[-1].items() if k not in ("compile_s", "explain_s")}})

    print(f"{'what':40} {'model':16} {'ranks':>6} {'seconds':>8} {'× imports':>10}")
    print(f"{IMPORTS:40.40} {'':16} {'':>6} {t_import:8.2f} {1:10.2f}")
    print(f"{'  the same, ended without teardown':40} {'':16} {'':>6} {t_bare:8.2f} {t_bare / t_import:10.2f}")
    for r in rows:
        m, w = r["model"], r["world_size"]
        print(f"{'  compile_plan (in process)':40} {m:16} {w:>6} {r['compile_s']:8.2f}")
        print(f"{'  explain (in process)':40} {m:16} {w:>6} {r['explain_s']:8.2f}   "
              f"(layers {r['kept_layers']} traced, {r['classes']} rank classes)")
        ratio = r["command_s"] / t_import
        goal = GOALS.get(str(m))
        print(f"{'plan explain --json, whole command':40} {m:16} {w:>6} {r['command_s']:8.2f} {ratio:10.2f}"
              + (f"   (goal ≤ {goal}; {r['command_s'] / t_bare:.2f} × the imports without teardown)"
                 if goal else ""))
        r["command_over_import"] = ratio
        r["command_over_import_without_teardown"] = r["command_s"] / t_bare
    out = ROOT / "bench" / "results" / "explain.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"imports": IMPORTS, "import_s": t_import, "import_runs_s": imports,
                               "import_without_teardown_s": t_bare, "import_without_teardown_runs_s": imports_bare,
                               "cases": rows, "command_runs_s": commands}, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
