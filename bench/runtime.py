"""Step time of a Program applied by the runtime against the same torch calls by hand.

    python bench/runtime.py [--quick] [--steps N] [--out PATH]

Four CPU ranks under gloo (`bench/ranks.py`: spawned, one thread each), one mesh
(`plans/llama.plan --set tp=2`: dp_shard 2 × tp 2, with its sequence parallelism, loss
parallelism, full activation checkpointing of every block and FSDP2 units, fp32 — the
plan's bf16 mixed precision removed, since CPUs without bf16 matmul kernels would time
the casts rather than the runtime). Two copies of the same model on that same mesh:

- runtime: `build_applied(program, …)` (meta → `apply` → shards allocated and filled)
  trained with `runtime.train.train_step`: the global token count all-reduced over the
  loss group, loss-parallel cross-entropy, gradient norm over every mesh the gradients
  live on, clipping, AdamW, the logged loss all-reduced;
- by hand: `parallelize_module` / `checkpoint_wrapper` / `fully_shard` written out the
  way torchtitan-style code does (same styles, same units, same reshard flags), and a
  hand-written step doing the same work with plain torch (`loss_parallel()`,
  `clip_grad_norm_`, AdamW, the same two all-reduces).

Both see the same batches (packed synthetic data, meshplan's attention backend), and
their steps alternate A B B A … after warm-up, so that load from other processes hits
both alike. Reported: median step time of each (rank 0, between barriers), the ratio
of the medians runtime / by-hand (goal ≤ 1.01), the median of the per-pair ratios, and
tokens/s (real tokens of the global batch per second). Default model: a small Llama (hidden 256,
4 layers, 8 query / 4 key-value heads, vocabulary 8192), bins of 512 tokens, 2 per rank
and step; --quick: the tiny-llama preset, bins of 128. Prints a table and writes
bench/results/runtime.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "runtime.json"
WORLD = 4
SMALL = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8,
         "num_key_value_heads": 4, "vocab_size": 8192}


def _model_source(quick: bool) -> Any:
    import copy

    import torch

    from meshplan.planner.models import resolve_model

    src = resolve_model("tiny-llama")
    if quick:
        return "tiny-llama"
    config = copy.deepcopy(src.config)
    for k, v in SMALL.items():
        setattr(config, k, v)
    assert src.model_class is not None
    with torch.device("meta"):
        return src.model_class(config)


def _hand_parallelize(model: Any, mesh: Any) -> None:
    """What the Program does, written out with torch's own calls."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    tp, dp = mesh["tp"], mesh[("dp_replicate", "fsdp")]
    parallelize_module(model, tp, {
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "model.norm": SequenceParallel(use_local_output=True),
        "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False),
    })
    layers = model.model.layers
    for block in layers:
        parallelize_module(block, tp, {
            "input_layernorm": SequenceParallel(use_local_output=True),
            "self_attn": PrepareModuleInput(input_kwarg_layouts={"hidden_states": Shard(1)},
                                            desired_input_kwarg_layouts={"hidden_states": Replicate()}),
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
            "post_attention_layernorm": SequenceParallel(use_local_output=True),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
        })
    for i, block in enumerate(list(layers)):  # activation checkpointing: after TP, before FSDP
        layers.register_module(str(i), checkpoint_wrapper(block, preserve_rng_state=False))
    for i, block in enumerate(layers):
        fully_shard(block, mesh=dp, reshard_after_forward=i < len(layers) - 1)
    fully_shard([model.model.embed_tokens, model.model.norm, model.lm_head], mesh=dp,
                reshard_after_forward=False)
    fully_shard(model, mesh=dp)


def _hand_step(model: Any, optimizer: Any, batches: list[dict[str, Any]], group: Any, divisor: int) -> None:
    """One step written with plain torch: global token count, loss-parallel CE, clip, AdamW."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.tensor.parallel import loss_parallel

    count = torch.tensor([float(sum(int((b["labels"] != -100).sum()) for b in batches))])
    dist.all_reduce(count, group=group)
    total = torch.zeros(())
    for i, b in enumerate(batches):
        model.set_requires_gradient_sync(i == len(batches) - 1)
        with loss_parallel():
            logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"],
                           cu_seq_lens_q=b["cu_seqlens"], cu_seq_lens_k=b["cu_seqlens"],
                           max_length_q=b["max_seqlen"], max_length_k=b["max_seqlen"]).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), b["labels"].flatten(),
                                   ignore_index=-100, reduction="sum").full_tensor()
            (loss * (divisor / count)).backward()
        total += loss.detach()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    dist.all_reduce(total, group=group)


def _measure(rank: int, args: dict[str, Any]) -> dict[str, Any] | None:
    import torch
    import torch.distributed as dist

    from meshplan.planner.program import Program
    from meshplan.runtime.attention import use_backend
    from meshplan.runtime.train.build import build_applied, build_model
    from meshplan.runtime.train.data import PackedData, synthetic_sequences
    from meshplan.runtime.train.loop import TrainConfig, make_optimizer, train_step
    from meshplan.runtime.train.topology import Topology

    program = Program.from_json(args["program"])
    source = _model_source(args["quick"])
    applied, backend, _ = build_applied(program, source, seed=0)
    topology = Topology.of(applied)
    hand = build_model(source, seed=0)
    use_backend(hand, backend)
    _hand_parallelize(hand, applied.mesh)
    config = TrainConfig(steps=1, lr=1e-4, max_grad_norm=1.0)
    opt_runtime = make_optimizer(applied.model, config)
    opt_hand = torch.optim.AdamW(hand.parameters(), lr=1e-4, betas=config.betas, weight_decay=0.0)
    seq_len, micro = args["seq_len"], args["micro_batch"]
    vocab = int(applied.model.config.vocab_size)
    data = PackedData.build(synthetic_sequences(400, vocab, min_len=seq_len // 8, max_len=seq_len, seed=1),
                            seq_len)
    batches = iter(data.loader(topology.dp_rank, topology.dp_size, micro_batch=micro, seed=0))
    group = topology.loss_group
    times: dict[str, list[float]] = {"runtime": [], "hand": []}
    tokens: list[int] = []

    def timed(which: str, step: list[dict[str, Any]]) -> float:
        dist.barrier()
        start = time.perf_counter()
        if which == "runtime":
            stats = train_step(applied.model, opt_runtime, step, topology, max_grad_norm=1.0)
            tokens.append(stats.tokens)
        else:
            _hand_step(hand, opt_hand, step, group, topology.grad_divisor)
        dist.barrier()
        return time.perf_counter() - start

    for i in range(args["warmup"] + args["steps"]):
        step = next(batches)
        order = ("runtime", "hand") if i % 2 == 0 else ("hand", "runtime")
        for which in order:
            seconds = timed(which, step)
            if i >= args["warmup"]:
                times[which].append(seconds)
    return {"times": times, "tokens": tokens[args["warmup"]:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny-llama, bins of 128, 6 steps")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per side (default 16, quick 6)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ns = parser.parse_args()

    import torch
    from ranks import run_ranks
    from rich.console import Console
    from rich.table import Table

    from meshplan.planner.compile import compile_plan

    quick = bool(ns.quick)
    steps = ns.steps or (6 if quick else 16)
    seq_len, micro = (128, 1) if quick else (512, 2)
    text = (ROOT / "plans" / "llama.plan").read_text(encoding="utf-8")
    text = re.sub(r"^\s*mixed_precision\s*\{[^}]*\}.*$", "", text, flags=re.M)
    program = compile_plan(text, _model_source(quick), WORLD, ["tp=2", f"seq_len={seq_len}"]).program
    args = {"program": program.to_json(), "quick": quick, "steps": steps, "warmup": 2,
            "seq_len": seq_len, "micro_batch": micro}
    measured = run_ranks(_measure, args, WORLD)
    runtime, hand = measured["times"]["runtime"], measured["times"]["hand"]
    med_runtime, med_hand = statistics.median(runtime), statistics.median(hand)
    step_tokens = statistics.mean(measured["tokens"])
    figures = {
        "model": "tiny-llama" if quick else {"preset": "tiny-llama", **SMALL},
        "plan": "plans/llama.plan --set tp=2 (fp32: mixed_precision removed)",
        "mesh": dict(zip(program.mesh.names, program.mesh.shape, strict=True)),
        "world_size": WORLD, "backend": "gloo", "threads_per_rank": 1,
        "seq_len": seq_len, "bins_per_rank_per_step": micro, "timed_steps": steps,
        "tokens_per_step": step_tokens,
        "runtime_step_s_median": med_runtime, "hand_step_s_median": med_hand,
        "runtime_step_s": runtime, "hand_step_s": hand,
        "ratio_runtime_over_hand": med_runtime / med_hand,
        # Steps alternate in pairs (A B, B A, …): the median of the per-pair ratios
        # cancels load that changes between pairs.
        "ratio_paired_median": statistics.median(a / b for a, b in zip(runtime, hand, strict=True)),
        "runtime_tokens_per_s": step_tokens / med_runtime, "hand_tokens_per_s": step_tokens / med_hand,
        "goal_ratio": 1.01,
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    table = Table(title=f"runtime vs hand-written torch: {figures['mesh']}, {steps} alternating steps each")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("step time, runtime (median)", f"{med_runtime * 1000:.1f} ms")
    table.add_row("step time, by hand (median)", f"{med_hand * 1000:.1f} ms")
    table.add_row("ratio runtime / by hand", f"{figures['ratio_runtime_over_hand']:.3f} (goal ≤ 1.01)")
    table.add_row("  median of per-pair ratios", f"{figures['ratio_paired_median']:.3f}")
    table.add_row("tokens/s, runtime", f"{figures['runtime_tokens_per_s']:,.0f}")
    table.add_row("tokens/s, by hand", f"{figures['hand_tokens_per_s']:,.0f}")
    Console().print(table)
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {ns.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
