"""Compile time against tracing the whole model, side by side in one run.

    python bench/compile.py [--quick]

Each measurement runs in a fresh subprocess (no shared cache), after the same imports
(torch, transformers, the model's class) so that both sides pay the same fixed cost
outside the clock:
- `compile_plan(plans/llama.plan, llama-3.1-70b, 512)`: build the graph (one traced
  block), run every pass, lower;
- `torch.export.export` of the whole 70B model on the meta device: what tracing every
  layer would cost;
- the same compile for llama-3.1-405b at 16384 ranks (tp 8);
- and, for reference, `plan compile` end to end as a command (process start and
  imports included) and `import torch, transformers` alone.
Goal: compile ≤ 0.25 × the full trace, and 405B at 16384 ranks in the same order of
time as 70B. Prints a table and writes bench/results/compile.json.

`--net` measures only the dry-run net's budget, side by side (alternating, best of
`--repeat`): `plan compile plans/llama.plan --model llama-3.1-70b --world-size 512` as a
whole command, with the net and with `--no-dry-run`, against
`python -c "import torch; from transformers import LlamaForCausalLM"`.
Goal: the command with the net ≤ 1.25 × that import.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bytecode import compile_bytecode

ROOT = Path(__file__).resolve().parent.parent

FULL_TRACE = """
import time, torch
from meshplan.planner.models import build_meta_model, resolve_model
src = resolve_model({model!r})
t = time.perf_counter()
model = build_meta_model(src)
ids = torch.zeros(2, 48, dtype=torch.long, device="meta")
with torch.no_grad():
    torch.export.export(model, (), {{"input_ids": ids, "use_cache": False}}, strict=False)
print(time.perf_counter() - t)
"""

COMPILE = """
import time
from meshplan.planner import compile_plan
from meshplan.planner.models import resolve_model
resolve_model({model!r})  # imports the model class: paid by both sides, outside the clock
t = time.perf_counter()
compile_plan({plan!r}, {model!r}, {world}, {overrides!r})
print(time.perf_counter() - t)
"""


def in_process(code: str) -> float:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


NET_GOAL = 1.25


def net_budget(repeat: int) -> None:
    """The dry-run net's budget (see the module docstring): alternating runs, best of each."""
    plan = str(ROOT / "plans" / "llama.plan")
    base = [sys.executable, "-m", "meshplan.cli.main", "compile", plan, "--model", "llama-3.1-70b",
            "--world-size", "512", "-o", "/dev/null"]
    import os
    import tempfile

    runs: dict[str, list[float]] = {"import": [], "net_cold": [], "net_verified": [], "no_net": []}
    with tempfile.TemporaryDirectory() as warm:
        for _ in range(repeat):
            runs["import"].append(timed([sys.executable, "-c",
                                         "import torch; from transformers import LlamaForCausalLM"]))
            with tempfile.TemporaryDirectory() as cold:  # nothing verified yet: the net runs
                runs["net_cold"].append(timed(base, {**os.environ, "MESHPLAN_CACHE": cold}))
            timed(base, {**os.environ, "MESHPLAN_CACHE": warm})  # (verifies the block kinds once)
            runs["net_verified"].append(timed(base, {**os.environ, "MESHPLAN_CACHE": warm}))
            runs["no_net"].append(timed([*base, "--no-dry-run"]))
    best = {k: min(v) for k, v in runs.items()}
    rows = (("import torch; from transformers import LlamaForCausalLM", "import"),
            ("plan compile 70B @512, net runs (nothing verified)", "net_cold"),
            ("plan compile 70B @512, block kinds already verified", "net_verified"),
            ("plan compile 70B @512, --no-dry-run", "no_net"))
    print(f"{'what':56} {'seconds (best of ' + str(repeat) + ')':>22} {'× import':>9}")
    for what, key in rows:
        print(f"{what:56} {best[key]:22.2f} {best[key] / best['import']:9.2f}")
    ratio = best["net_cold"] / best["import"]
    print(f"\ncompile with the net running / import = {ratio:.2f} (goal ≤ {NET_GOAL}); "
          f"the net costs {best['net_cold'] - best['no_net']:.2f} s")
    out = ROOT / "bench" / "results" / "compile_net.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs_s": runs, "best_s": best, "net_cold_over_import": ratio,
                               "net_verified_over_import": best["net_verified"] / best["import"],
                               "goal": NET_GOAL}, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="trace llama-3.2-1b instead of the 70B (smoke test)")
    parser.add_argument("--net", action="store_true", help="only the dry-run net's budget (see above)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each command for --net")
    args = parser.parse_args()
    compile_bytecode()
    if args.net:
        net_budget(args.repeat)
        return
    big = "llama-3.2-1b" if args.quick else "llama-3.1-70b"
    plan = str(ROOT / "plans" / "llama.plan")
    compile_cmd = [sys.executable, "-m", "meshplan.cli.main", "compile", plan, "--model", big,
                   "--world-size", "512", "-o", "/dev/null"]
    rows = []
    t_compile = in_process(COMPILE.format(plan=plan, model=big, world=512, overrides=[]))
    rows.append(("compile_plan (llama.plan)", big, 512, t_compile))
    t_trace = in_process(FULL_TRACE.format(model=big))
    rows.append(("torch.export, every layer", big, 0, t_trace))
    t_405 = in_process(COMPILE.format(plan=plan, model="llama-3.1-405b", world=16384, overrides=["tp=8"]))
    rows.append(("compile_plan (llama.plan)", "llama-3.1-405b", 16384, t_405))
    t_cli = timed(compile_cmd)
    rows.append(("plan compile, whole command", big, 512, t_cli))
    t_import = timed([sys.executable, "-c", "import torch, transformers"])
    rows.append(("import torch, transformers", "", 0, t_import))

    print(f"{'what':32} {'model':16} {'ranks':>6} {'seconds':>9}")
    for what, model, ranks, seconds in rows:
        print(f"{what:32} {model:16} {ranks or '':>6} {seconds:9.2f}")
    ratio = t_compile / t_trace
    print(f"\ncompile / full trace = {ratio:.3f} (goal ≤ 0.25)")
    print(f"405B@16384 / {big}@512 compile = {t_405 / t_compile:.2f}")
    out = ROOT / "bench" / "results" / "compile.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "model": big, "compile_s": t_compile, "cli_compile_s": t_cli, "import_torch_transformers_s": t_import,
        "full_trace_s": t_trace, "compile_405b_16384_s": t_405, "compile_over_trace": ratio,
        "compile_405b_over_70b": t_405 / t_compile,
    }, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
