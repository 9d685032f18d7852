"""LoRA and QLoRA against full fine-tuning on this machine: step time and per-rank memory.

    python bench/adapters.py [--steps N] [--quick] [--out PATH]

Four CPU ranks under gloo (`bench/ranks.py`: spawned, one thread each), FSDP2 over all four,
full activation checkpointing, fp32 (CPUs without bf16 matmul kernels would time the
casts). One model, a small Llama (hidden 512, 4 layers, 8 query / 4 key-value heads,
MLP 1024, vocabulary 8192: widths whose NF4 blocks split over 4 ranks), built by the
runtime (`build_applied`: meta → Program → local shards → seeded weights) and trained by
`runtime.train.train_step` with AdamW, three ways:

- full: `plans/llama_lora.plan` without its adapters section — every weight trains;
- LoRA: the plan as shipped (rank 16 on q, k, v, o, gate, up, down; the base frozen);
- QLoRA: `plans/llama_qlora.plan`, the adapted bases in NF4 (torchao), computed in fp32.

Each variant runs in its own set of ranks, one after the other. Reported per variant:
the median step time (rank 0, between barriers, after warm-up), real tokens per second,
and per rank: parameter bytes (local shards; NF4 bases by their packed tensors), gradient
bytes (one per trainable shard; frozen parameters get none), optimizer-state bytes, and
the process's peak resident memory. The memory figures
are counted from the tensors each rank holds after the last step, not estimated. Prints a
table and writes bench/results/adapters.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import resource
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "adapters.json"
WORLD = 4
MODEL = {"hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 8,
         "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 8192, "tie_word_embeddings": False}
QUICK = {**MODEL, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "head_dim": 32}
VARIANTS = ("full", "LoRA", "QLoRA")


def _model_source(quick: bool) -> Any:
    import copy

    import torch

    from meshplan.planner.models import resolve_model

    src = resolve_model("tiny-llama")
    config = copy.deepcopy(src.config)
    for k, v in (QUICK if quick else MODEL).items():
        setattr(config, k, v)
    assert src.model_class is not None
    with torch.device("meta"):
        return src.model_class(config)


def plan_text(variant: str, quick: bool = False) -> str:
    """The plan a variant runs, fp32 (mixed precision removed; QLoRA computes in fp32;
    --quick's narrower widths need smaller NF4 scaler blocks to split over 4 ranks)."""
    name = "llama_qlora.plan" if variant == "QLoRA" else "llama_lora.plan"
    text = (ROOT / "plans" / name).read_text(encoding="utf-8")
    text = re.sub(r"^\s*mixed_precision\s*\{[^}]*\}.*$", "", text, flags=re.M)
    if variant == "full":
        text = re.sub(r"^adapters \{.*?^\}\n", "", text, flags=re.M | re.S)
    return text.replace("compute = bf16", "compute = fp32" + (", scaler_block_size = 64" if quick else ""))


def _tensor_bytes(t: Any) -> int:
    """Bytes a rank holds for `t`: its local shard; an NF4 tensor's packed inner tensors."""
    from torch.distributed.tensor import DTensor

    local = t.to_local() if isinstance(t, DTensor) else t
    inner = getattr(local, "__tensor_flatten__", None)
    if inner is not None and type(local).__name__ == "NF4Tensor":
        names, _ = inner()
        return sum(int(getattr(local, n).nbytes) for n in names)
    return int(local.numel() * local.element_size())


def _local_numel(t: Any) -> int:
    from torch.distributed.tensor import DTensor

    return int((t.to_local() if isinstance(t, DTensor) else t).numel())


def _measure(rank: int, args: dict[str, Any]) -> dict[str, Any] | None:
    import torch
    import torch.distributed as dist

    from meshplan.planner.program import Program
    from meshplan.runtime.train.build import build_applied
    from meshplan.runtime.train.data import PackedData, synthetic_sequences
    from meshplan.runtime.train.loop import TrainConfig, make_optimizer, train_step
    from meshplan.runtime.train.topology import Topology

    program = Program.from_json(args["program"])
    applied, _, _ = build_applied(program, _model_source(args["quick"]), seed=0)
    topology = Topology.of(applied)
    model = applied.model
    optimizer = make_optimizer(model, TrainConfig(steps=1, lr=1e-4, max_grad_norm=1.0))
    seq_len, micro = args["seq_len"], args["micro_batch"]
    vocab = int(model.config.vocab_size)
    data = PackedData.build(synthetic_sequences(400, vocab, min_len=seq_len // 8, max_len=seq_len, seed=1),
                            seq_len)
    batches = iter(data.loader(topology.dp_rank, topology.dp_size, micro_batch=micro, seed=0))
    times: list[float] = []
    tokens: list[int] = []
    for i in range(args["warmup"] + args["steps"]):
        step = next(batches)
        dist.barrier()
        start = time.perf_counter()
        stats = train_step(model, optimizer, step, topology, max_grad_norm=1.0)
        dist.barrier()
        if i >= args["warmup"]:
            times.append(time.perf_counter() - start)
            tokens.append(stats.tokens)
    params = list(model.parameters())
    memory = {
        "parameters": sum(_tensor_bytes(p) for p in params),
        "trainable_parameters": sum(_tensor_bytes(p) for p in params if p.requires_grad),
        # train_step frees the gradients after the optimizer step; each trainable shard
        # had one gradient of its own size (FSDP2's reduce-scattered shard), none frozen.
        "gradients": sum(_tensor_bytes(p) for p in params if p.requires_grad),
        "optimizer": sum(_tensor_bytes(v) for state in optimizer.state.values() for v in state.values()
                         if isinstance(v, torch.Tensor) and v.dim() > 0),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    gathered: list[Any] = [None] * WORLD
    dist.all_gather_object(gathered, memory)
    return {"times": times, "tokens": tokens, "memory": gathered,
            "trainable": sum(_local_numel(p) for p in params if p.requires_grad)}


def _run(variant: str, args: dict[str, Any]) -> dict[str, Any]:
    from ranks import run_ranks

    from meshplan.planner.compile import compile_plan

    overrides = [f"seq_len={args['seq_len']}", "dropout=0.0"]
    if variant != "QLoRA":
        overrides.append("tp=1")
    program = compile_plan(plan_text(variant, args["quick"]), _model_source(args["quick"]), WORLD, overrides).program
    return run_ranks(_measure, {**args, "program": program.to_json()}, WORLD)


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="hidden 256, 2 layers, bins of 128, 4 steps")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 8, quick 4)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ns = parser.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table

    quick = bool(ns.quick)
    steps = ns.steps or (4 if quick else 8)
    seq_len, micro = (128, 1) if quick else (512, 2)
    args = {"quick": quick, "steps": steps, "warmup": 2, "seq_len": seq_len, "micro_batch": micro}
    results = {v: _run(v, args) for v in VARIANTS}
    figures: dict[str, Any] = {
        "model": {"preset": "tiny-llama", **(QUICK if quick else MODEL)},
        "plans": {"full": "plans/llama_lora.plan without adapters", "LoRA": "plans/llama_lora.plan",
                  "QLoRA": "plans/llama_qlora.plan (compute fp32)"},
        "overrides": "tp=1, dropout=0.0, mixed precision removed (fp32)",
        "world_size": WORLD, "mesh": "dp_shard 4 (FSDP2)", "backend": "gloo", "threads_per_rank": 1,
        "seq_len": seq_len, "bins_per_rank_per_step": micro, "timed_steps": steps,
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "variants": {},
    }
    for variant, measured in results.items():
        memory = measured["memory"]
        step = statistics.median(measured["times"])
        figures["variants"][variant] = {
            "step_s_median": step, "step_s": measured["times"],
            "tokens_per_s": statistics.mean(measured["tokens"]) / step,
            "trainable_parameters_rank0": measured["trainable"],
            "per_rank_bytes": {k: [m[k] for m in memory] for k in memory[0]},
            "max_rank_bytes": {k: max(m[k] for m in memory) for k in memory[0]},
        }
    full_step = figures["variants"]["full"]["step_s_median"]
    table = Table(title=f"LoRA / QLoRA vs full fine-tuning: FSDP2 over {WORLD} gloo ranks, {steps} steps each, "
                        "fp32; memory is the largest rank's")
    table.add_column("figure")
    for v in VARIANTS:
        table.add_column(v, justify="right")
    rows: list[tuple[str, Any]] = [
        ("step time (median)", lambda f: f"{f['step_s_median'] * 1000:.0f} ms"),
        ("  vs full", lambda f: f"{f['step_s_median'] / full_step:.2f}×"),
        ("tokens/s", lambda f: f"{f['tokens_per_s']:,.0f}"),
        ("trainable parameters (rank 0's shards)", lambda f: f"{f['trainable_parameters_rank0']:,}"),
        ("parameters", lambda f: _mib(f["max_rank_bytes"]["parameters"])),
        ("gradients", lambda f: _mib(f["max_rank_bytes"]["gradients"])),
        ("optimizer state", lambda f: _mib(f["max_rank_bytes"]["optimizer"])),
        ("peak resident memory", lambda f: _mib(f["max_rank_bytes"]["peak_rss"])),
    ]
    for name, cell in rows:
        table.add_row(name, *(cell(figures["variants"][v]) for v in VARIANTS))
    Console().print(table)
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {ns.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
