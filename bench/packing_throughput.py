"""Packed vs padded training throughput on a small Llama, against the padding limit.

    python bench/packing_throughput.py [--quick]

Sequences are drawn from the real SQuAD 1.1 length histogram (shipped) and trained
(forward + backward, fp32, CPU, one thread) two ways on the same model:
- padded: one row per sequence, right-padded to seq_len (384), the usual baseline;
- packed: FFD bins of seq_len tokens, one bin per step (`varlen`, meshplan_sdpa).
Useful tokens/s is real (non-padding) tokens per second. Packing can at most remove the
padding, so its speed-up is bounded by 1 / (1 − padding fraction of the padded
batches); the ratio to that limit shows how much of it is realised. Prints a table and
writes bench/results/packing_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from meshplan.runtime.attention import forward_kwargs, use_backend
from meshplan.runtime.packing import SQUAD11_HISTOGRAM, collate_padded, collate_varlen, pack
from meshplan.runtime.train.loss import loss_sum_and_count

ROOT = Path(__file__).resolve().parent.parent
HISTOGRAM = SQUAD11_HISTOGRAM
OUT = ROOT / "bench" / "results" / "packing_throughput.json"


def model(hidden: int, layers: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, use_cache=False)
    return LlamaForCausalLM(config)


def step(m: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    logits = m(**forward_kwargs(batch)).logits
    total, count = loss_sum_and_count(logits, batch["labels"])
    (total / count).backward()
    return int((batch["labels"] != -100).sum()) + int(batch["labels"].shape[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer sequences (smoke test)")
    parser.add_argument("--seq-len", type=int, default=384)
    args = parser.parse_args()
    torch.set_num_threads(1)
    counts = json.loads(HISTOGRAM.read_text())["counts"]
    lengths_all = np.repeat(np.arange(1, len(counts) + 1), counts)
    rng = np.random.default_rng(0)
    n = 64 if args.quick else 256
    lengths = rng.choice(lengths_all, size=n, replace=False).astype(np.int64)
    seqs = [torch.randint(0, 1024, (int(k),)) for k in lengths]
    useful = int(lengths.sum())

    net = model(128, 2)
    # Padded: batches of 8 sequences, each padded to seq_len.
    padded_batches = [collate_padded(seqs[i:i + 8], max_len=args.seq_len) for i in range(0, n, 8)]
    padded_tokens = sum(b["input_ids"].numel() for b in padded_batches)
    # Packed: FFD bins of seq_len tokens, one bin per step.
    packed = pack(lengths, args.seq_len, "ffd")
    bins = [collate_varlen([seqs[int(j)] for j in packed.indices[packed.offsets[b]:packed.offsets[b + 1]]],
                           seq_len=args.seq_len) for b in range(packed.n_bins)]
    runs = {"padded": ("sdpa", padded_batches), "packed": ("meshplan_sdpa", bins)}
    for backend, batches in runs.values():  # warm up both paths before timing either
        use_backend(net, backend)
        step(net, batches[0])
    results = {name: float("inf") for name in runs}
    for _ in range(1 if args.quick else 2):  # alternate, keep the best
        for name, (backend, batches) in runs.items():
            use_backend(net, backend)
            start = time.perf_counter()
            for b in batches:
                step(net, b)
            results[name] = min(results[name], time.perf_counter() - start)

    padding = 1 - useful / padded_tokens
    limit = 1 / (1 - padding)
    speedup = results["padded"] / results["packed"]
    print(f"{n} SQuAD sequences, {useful:,} useful tokens; padded batches carry {padded_tokens:,} tokens "
          f"({100 * padding:.1f} % padding); packed: {packed.n_bins} bins at {100 * packed.efficiency:.1f} %")
    print(f"{'layout':8} {'seconds':>8} {'useful tokens/s':>16}")
    for name in ("padded", "packed"):
        print(f"{name:8} {results[name]:8.2f} {useful / results[name]:16,.0f}")
    print(f"speed-up {speedup:.2f}× of a limit 1/(1 − padding) = {limit:.2f}× ({100 * speedup / limit:.0f} % of it)")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"sequences": n, "useful_tokens": useful, "padded_tokens": padded_tokens,
                               "padding_fraction": padding, "seconds": results, "speedup": speedup,
                               "limit": limit, "packing_efficiency": packed.efficiency}, indent=2) + "\n")


if __name__ == "__main__":
    main()
