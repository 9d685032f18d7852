"""Expert-parallelism benchmark: dispatch bytes per step, all-to-all against all-gather,
and step time at ep 2 against ep 1 on this machine.

    python bench/experts.py [--model tiny-qwen3-moe] [--tokens 512] [--steps 6] [--out PATH]

1. Dispatch bytes per step (per rank, fp32 activations), from the model's real routing
   of a fixed random batch (seeded weights, `--tokens` tokens per rank, ep = 2, 4, 8
   where the experts divide): what `runtime.parallel.experts` sends to OTHER ranks of
   its ep group in one forward and backward —
   - alltoall: each (token, k) row goes to the rank owning its expert and comes back
     (dispatch + combine), and the same two exchanges run again in backward: 4 × rows
     sent away × hidden × 4 bytes, plus the counts (ep × E/ep int64) once;
   - allgather: every rank's rows go to every other rank (ep − 1 copies) and the combine
     sends each source its rows back from every rank: 4 × (ep − 1) × rows × hidden × 4.
   Rows sent away are counted from the routing itself (top-k of the router's scores),
   so uneven routing shows.
2. Step time (forward + backward of one batch per rank, fp32, one thread per process):
   ep 2 over 2 gloo processes (dp_shard 2, FSDP, the experts' own units) with alltoall
   and with allgather, against ep 1: one process, the same per-rank batch, the plan
   compiled for 1 rank (FSDP over one rank). Median over `--steps` after 2 warm-up steps;
   the variants of one world size take turns step by step.
   On a CPU the exchanges are memory copies through loopback TCP, so ep 2 is slower
   than ep 1 here: the figure is a measurement of this runtime's overhead, not of a
   cluster's speed-up.

Prints both tables side by side and writes bench/results/experts.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PLAN = """\
plan bench for {arch}
mesh {{
  dp_shard = auto
{ep}}}
fully_shard on dp_shard {{
  unit model.layers.*
  root
}}
{section}"""
SECTION = "expert_parallel on ep {{\n  experts model.layers.*.mlp.experts\n  dispatch = {dispatch}\n}}\n"


def plan_text(arch: str, ep: int, dispatch: str = "alltoall") -> str:
    return PLAN.format(arch=arch, ep=f"  ep = {ep}\n" if ep > 1 else "",
                       section=SECTION.format(dispatch=dispatch) if ep > 1 else "")


# ------------------------------------------------------------------------- bytes


def _routing(model_name: str, tokens: int, seed: int) -> tuple[list[torch.Tensor], int, int, int]:
    """Per MoE layer, the top-k expert indices of one rank's batch; experts, hidden, k."""
    from meshplan.runtime import build_model

    model = build_model(model_name, seed=0)
    config = model.config
    indices: list[torch.Tensor] = []

    def grab(module: torch.nn.Module, args: tuple[Any, ...], out: Any) -> None:
        indices.append(args[1].detach().clone())

    hooks = [m.register_forward_hook(grab) for n, m in model.named_modules() if n.endswith("mlp.experts")]
    ids = torch.randint(0, int(config.vocab_size), (1, tokens), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    experts = int(getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
                  or config.n_routed_experts)
    return indices, experts, int(config.hidden_size), int(config.num_experts_per_tok)


def dispatch_bytes(model_name: str, tokens: int) -> list[dict[str, Any]]:
    indices, experts, hidden, _ = _routing(model_name, tokens, seed=1)
    rows_out: list[dict[str, Any]] = []
    for ep in (2, 4, 8):
        if experts % ep:
            continue
        local = experts // ep
        # This rank is ep rank 0: rows whose expert lives elsewhere leave the rank.
        away = sum(int((idx.reshape(-1) >= local).sum()) for idx in indices)
        rows = sum(idx.numel() for idx in indices)
        row_bytes = hidden * 4
        counts = len(indices) * experts * 8
        alltoall = 4 * away * row_bytes + counts
        allgather = 4 * (ep - 1) * rows * row_bytes + len(indices) * ep * experts * 8
        rows_out.append({"ep": ep, "layers": len(indices), "rows": rows, "rows_away": away,
                         "alltoall_bytes": alltoall, "allgather_bytes": allgather,
                         "ratio": allgather / alltoall})
    return rows_out


# ---------------------------------------------------------------------- step time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _build(program_json: str, model_name: str) -> torch.nn.Module:
    from meshplan.planner.program import Program
    from meshplan.runtime import build_applied

    applied, _, _ = build_applied(Program.from_json(program_json), model_name, seed=0)
    return applied.model


def _step(model: torch.nn.Module, ids: torch.Tensor) -> float:
    dist.barrier()
    start = time.perf_counter()
    out = model(input_ids=ids)
    out.logits.float().square().mean().backward()
    dist.barrier()
    return time.perf_counter() - start


def _worker(rank: int, world: int, port: int, jobs: list[tuple[str, str]], model_name: str, tokens: int,
            steps: int, out_dir: str) -> None:
    """Every variant is built first; then they take turns, one step each per round (the
    order reversed every other round), so that load from other processes on a shared
    machine hits every variant alike. The first 2 rounds warm up."""
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        models = {name: _build(program, model_name) for name, program in jobs}
        vocab = int(next(iter(models.values())).config.vocab_size)
        g = torch.Generator().manual_seed(100 + rank)
        times: dict[str, list[float]] = {name: [] for name in models}
        for round_ in range(steps + 2):
            ids = torch.randint(0, vocab, (1, tokens), generator=g)
            order = list(models) if round_ % 2 == 0 else list(reversed(models))
            for name in order:
                elapsed = _step(models[name], ids)
                if round_ >= 2:
                    times[name].append(elapsed)
        if rank == 0:
            Path(out_dir, f"times-{world}.json").write_text(json.dumps(times), encoding="utf-8")
    finally:
        dist.destroy_process_group()


def step_times(model_name: str, arch: str, tokens: int, steps: int) -> dict[str, float]:
    from meshplan.planner.compile import compile

    runs = {1: [("ep 1", compile(plan_text(arch, 1), model_name, 1).to_json())],
            2: [(f"ep 2 {d}", compile(plan_text(arch, 2, d), model_name, 2).to_json())
                for d in ("alltoall", "allgather")]}
    medians: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world, jobs in runs.items():
            mp.start_processes(_worker, args=(world, _free_port(), jobs, model_name, tokens, steps, tmp),
                               nprocs=world, start_method="spawn")
            times = json.loads(Path(tmp, f"times-{world}.json").read_text(encoding="utf-8"))
            medians.update({name: statistics.median(t) for name, t in times.items()})
    return medians


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-qwen3-moe")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per rank")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "experts.json"))
    args = parser.parse_args(argv)
    from meshplan.planner.models import resolve_model

    arch = str(resolve_model(args.model).config.architectures[0])
    torch.set_num_threads(1)
    sizes = dispatch_bytes(args.model, args.tokens)
    times = step_times(args.model, arch, args.tokens, args.steps)
    print(f"{args.model}, {args.tokens} tokens per rank, fp32, {os.cpu_count()} cores")
    print(f"{'ep':>3} {'rows':>7} {'away':>7} {'alltoall':>12} {'allgather':>12} {'ratio':>6}   "
          f"{'step':<16} {'median s':>9} {'vs ep 1':>8}")
    names = list(times)
    for i in range(max(len(sizes), len(names))):
        left = (f"{sizes[i]['ep']:>3} {sizes[i]['rows']:>7} {sizes[i]['rows_away']:>7} "
                f"{sizes[i]['alltoall_bytes']:>12,} {sizes[i]['allgather_bytes']:>12,} {sizes[i]['ratio']:>6.2f}"
                if i < len(sizes) else " " * 51)
        right = (f"{names[i]:<16} {times[names[i]]:>9.4f} {times[names[i]] / times['ep 1']:>7.2f}×"
                 if i < len(names) else "")
        print(f"{left}   {right}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "tokens_per_rank": args.tokens, "cores": os.cpu_count(),
                               "dispatch_bytes": sizes, "step_seconds": times}, indent=2) + "\n",
                   encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
