"""`plan pack LENGTHS --seq-len N`: pack a length distribution, report efficiency and balance."""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from rich.table import Table

from meshplan.dsl.errors import visible

from .console import Terminal, plural
from .options import MAX_SEQ_LEN, int_in_range

ALGORITHMS = ("ffd", "bfd", "greedy")
# Dealing bins to K ranks costs more than linear in K: beyond this a report takes minutes.
MAX_DP = 2**16


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("lengths", metavar="LENGTHS",
                   help="a .npy array of lengths, a JSON histogram {\"counts\": [...]} (counts[i] sequences "
                        "of length i+1), or a JSONL of token-id lists")
    p.add_argument("--seq-len", type=int_in_range(1, MAX_SEQ_LEN, "tokens per bin"), required=True,
                   metavar="N", help=f"tokens per bin (1 to {MAX_SEQ_LEN:,})")
    p.add_argument("--algorithm", choices=ALGORITHMS, default="ffd",
                   help="first-fit decreasing, best-fit decreasing, or in order like NeMo (default ffd)")
    p.add_argument("--dp", type=int_in_range(1, MAX_DP, "data-parallel ranks"), default=1, metavar="K",
                   help=f"data-parallel ranks to deal bins to, at most {MAX_DP:,} (default 1)")
    p.add_argument("--overlong", choices=("error", "drop", "truncate", "split"), default="error",
                   help="what to do with sequences longer than --seq-len (default error)")
    p.add_argument("--window", type=int_in_range(1, 2**20, "steps"), default=16, metavar="W",
                   help="balance ranks over windows of W steps; bins are dealt heaviest first (default 16)")
    p.add_argument("--seed", type=int_in_range(0, 2**63 - 1, "a 64-bit seed"), default=0, metavar="S",
                   help="shuffling seed (default 0)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")


def cli_words(message: str) -> str:
    """A packing message in the command line's words: `overlong='drop'` → `--overlong drop`."""
    def choices(m: re.Match[str]) -> str:
        values = re.findall(r"'(\w+)'", m.group(0))
        listed = values[0] if len(values) == 1 else ", ".join(values[:-1]) + " or " + values[-1]
        return f"--{m.group(1).replace('_', '-')} {listed}"

    message = re.sub(r"\b(overlong|algorithm)='\w+'(?:, '\w+')*(?: or '\w+')?", choices, message)
    message = re.sub(r"\b(seq_len|window|seed)=(-?\d+)", lambda m: f"--{m.group(1).replace('_', '-')} {m.group(2)}",
                     message)
    return re.sub(r"\braise seq_len\b", "raise --seq-len", message)



def run(args: argparse.Namespace, term: Terminal) -> int:
    import numpy as np

    from meshplan.runtime.packing import PackedSampler, PackingError, load_lengths, pack

    if not Path(args.lengths).exists():
        return term.usage_error("pack", f"no such file: {args.lengths}")
    try:
        lengths = load_lengths(args.lengths)
        # Load (or compile, once per machine) the kernels on two sequences first: the time
        # reported is the packing's, not numba's.
        warm = np.array([1, args.seq_len + 1] if args.overlong != "error" else [1], dtype=np.int64)
        pack(warm, args.seq_len, args.algorithm, overlong=args.overlong, seed=args.seed)
        start = time.perf_counter()
        result = pack(lengths, args.seq_len, args.algorithm, overlong=args.overlong, seed=args.seed)
        seconds = time.perf_counter() - start
    except PackingError as e:
        term.note(f"plan pack: {cli_words(str(e))}")
        return 1
    figures = result.summary()
    figures["seconds"] = seconds  # the packing alone: the kernels were warmed up first
    figures["dp"] = args.dp
    figures["window"] = args.window
    if args.dp > 1 and result.n_bins:
        sampler = PackedSampler(result, 0, args.dp, seed=args.seed, window=args.window)
        figures["imbalance"] = sampler.imbalance().summary()
        figures["imbalance_round_robin"] = sampler.imbalance(naive=True).summary()
        remainder = sampler.remainder()
        figures["steps_per_epoch"] = remainder.steps
        figures["padding_bins"] = remainder.padding_bins
    if args.json:
        term.print(json.dumps(figures, indent=2))
        return 0
    n = figures['n_input']
    table = Table(title=f"{visible(args.lengths)}: {n:,} sequence{'s' if n != 1 else ''} packed into bins of {args.seq_len} tokens")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("algorithm", args.algorithm)
    table.add_row("bins", f"{figures['n_bins']:,}")
    table.add_row("efficiency", f"{100 * figures['efficiency']:.2f} %")
    table.add_row("padding tokens", f"{figures['padding_tokens']:,}")
    table.add_row("L2 lower bound (bins)", f"{figures['l2_bound']:,}")
    gap = figures["gap_to_l2"]
    table.add_row("gap to L2", f"{plural(gap, 'bin')} ({100 * gap / max(figures['l2_bound'], 1):.2f} %)")
    for key, label in (("n_dropped", "dropped"), ("n_truncated", "truncated"), ("n_split", "split")):
        if figures[key]:
            table.add_row(label, f"{figures[key]:,}")
    if "imbalance" in figures:
        balanced, naive = figures["imbalance"], figures["imbalance_round_robin"]
        table.add_row(f"steps per epoch on {args.dp} ranks", f"{figures['steps_per_epoch']:,}"
                      + (f" (+{plural(figures['padding_bins'], 'empty bin')})" if figures["padding_bins"] else ""))
        table.add_row("tokens max/mean per step (worst, mean)",
                      f"{balanced['tokens_worst']:.3f}, {balanced['tokens_mean']:.3f}")
        table.add_row("attention Σlen² max/mean (worst, mean)",
                      f"{balanced['attention_worst']:.3f}, {balanced['attention_mean']:.3f}")
        table.add_row("  in shuffled order, for comparison",
                      f"{naive['attention_worst']:.3f}, {naive['attention_mean']:.3f}")
    table.add_row("time (after JIT warm-up)", f"{seconds * 1000:.1f} ms")
    term.out.print(table)
    return 0
