"""Pipeline schedules on this machine: measured step time against each schedule's ideal.

    python bench/pipeline.py [--pp 2] [--microbatches 4] [--steps 5] [--json PATH]

A Llama-style decoder (8 layers, hidden 256, random weights) is cut into stages by
meshplan's runtime (`runtime.parallel.pipeline`) and trained forward + backward on gloo,
one process and one thread per pipeline rank, for GPipe, 1F1B and interleaved 1F1B (two
stages per rank). The baseline is one process running the whole model on the same batch
(`t1`). A perfect pipeline would take t1 / pp per step; a schedule with bubble fraction b
takes t1 / pp / (1 − b), where b = (pp − 1) / (m + pp − 1) for GPipe and 1F1B and
(pp − 1) / (v·m + pp − 1) for interleaved schedules with v stages per rank (m
microbatches). The table prints the measured step time beside that ideal, and their ratio
(communication and scheduling overhead on top of the bubble). Writes JSON (default
bench/results/pipeline.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
SEQ, BATCH, LAYERS, HIDDEN = 128, 8, 8, 256
SCHEDULES = (("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2))


def _model() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    from meshplan.runtime.attention import use_backend

    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=LAYERS,
                         num_attention_heads=8, num_key_value_heads=4, vocab_size=1024,
                         max_position_embeddings=SEQ, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    use_backend(model, "meshplan_sdpa")
    return model


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1024, (BATCH, SEQ), generator=g)
    positions = torch.arange(SEQ).repeat(BATCH, 1)
    return ids, positions, torch.randint(0, 1024, (BATCH, SEQ), generator=g)


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from meshplan.runtime.train.loss import loss_sum_and_count

    return loss_sum_and_count(logits, labels)[0]


def one_process(steps: int) -> float:
    torch.set_num_threads(1)
    model = _model()
    ids, positions, labels = _batch()
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        (_loss(model(input_ids=ids, position_ids=positions).logits, labels) / labels.numel()).backward()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return statistics.median(times[1:])


def _rank(rank: int, pp: int, schedule: str, virtual: int, microbatches: int, steps: int, port: int,
          out: Any) -> None:
    import torch.distributed as dist

    from meshplan.planner.passes.pipeline import stage_ranks
    from meshplan.runtime.parallel.pipeline import PipelineLoss, build_schedule, stage_module

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=pp)
    try:
        model = _model()
        stages = pp * virtual
        per = LAYERS // stages
        indices = stage_ranks(schedule, pp, stages)[rank]
        modules = [stage_module(model, range(s * per, (s + 1) * per), first=s == 0, last=s == stages - 1)
                   for s in indices]
        loss = PipelineLoss(_loss, 1.0 / (BATCH * SEQ))
        run = build_schedule(schedule, modules, indices, stages, microbatches=microbatches,
                             group=dist.group.WORLD, device=torch.device("cpu"), loss=loss)
        ids, positions, labels = _batch()
        times = []
        for _ in range(steps + 1):
            dist.barrier()
            start = time.perf_counter()
            if 0 in indices:
                run.step(ids, positions, **({"target": labels} if stages - 1 in indices else {}))
            elif stages - 1 in indices:
                run.step(target=labels)
            else:
                run.step()
            dist.barrier()
            times.append(time.perf_counter() - start)
            for m in modules:
                m.zero_grad(set_to_none=True)
        if rank == 0:
            out.put(statistics.median(times[1:]))
    finally:
        dist.destroy_process_group()


def pipelined(pp: int, schedule: str, virtual: int, microbatches: int, steps: int, port: int) -> float:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, pp, schedule, virtual, microbatches, steps, port, out))
             for r in range(pp)]
    for p in procs:
        p.start()
    seconds = float(out.get(timeout=900))
    for p in procs:
        p.join()
    return seconds


def bubble(schedule: str, pp: int, microbatches: int, virtual: int) -> float:
    work = microbatches * (virtual if schedule.startswith("interleaved") else 1)
    return (pp - 1) / (work + pp - 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "pipeline.json")
    args = parser.parse_args()
    t1 = one_process(args.steps)
    rows = []
    print(f"one process, whole model: {t1 * 1000:.0f} ms per step "
          f"({LAYERS} layers, hidden {HIDDEN}, batch {BATCH} × {SEQ}); pp = {args.pp}, "
          f"{args.microbatches} microbatches")
    print(f"{'schedule':<18}{'stages/rank':>12}{'bubble':>9}{'ideal ms':>10}{'measured ms':>13}{'ratio':>8}")
    for i, (schedule, virtual) in enumerate(SCHEDULES):
        b = bubble(schedule, args.pp, args.microbatches, virtual)
        ideal = t1 / args.pp / (1 - b)
        measured = pipelined(args.pp, schedule, virtual, args.microbatches, args.steps, 29620 + i)
        rows.append({"schedule": schedule, "stages_per_rank": virtual, "bubble": round(b, 4),
                     "ideal_ms": round(ideal * 1000, 1), "measured_ms": round(measured * 1000, 1),
                     "ratio": round(measured / ideal, 3)})
        print(f"{schedule:<18}{virtual:>12}{b:>9.1%}{ideal * 1000:>10.0f}{measured * 1000:>13.0f}"
              f"{measured / ideal:>8.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"one_process_ms": round(t1 * 1000, 1), "pp": args.pp,
                                     "microbatches": args.microbatches, "rows": rows}, indent=2) + "\n")
    print(f"→ {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
