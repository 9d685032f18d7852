"""Sequence-packing benchmark: efficiency, distance to the L2 bound, and speed.

    python bench/packing.py [--quick] [--histogram PATH] [--out PATH] [--repeat R]

Datasets
- SQuAD 1.1 (real): the token-length histogram of its 88,641 training sequences at max
  length 384 (shipped: `runtime/packing/data/squad11_len384_histogram.json`), packed at
  seq_len 384 and 2048.
- SQuAD 16M (resampled): 16M lengths drawn with replacement from those 88,641 (numpy
  PCG64 seed 0), packed at 384 (about 2.2 sequences per bin, 7.3M bins: the many-bins
  case) and 2048. --quick uses 1M.
- chat (synthetic, long-tailed): 16M lengths drawn from a log-normal distribution,
  exp(N(mu=6.2, sigma=1.1)) rounded (median ≈ 490 tokens, mean ≈ 900), clipped to
  [16, 8192], numpy PCG64 seed 0; packed at 8192 and at 4096 (there with
  overlong="truncate": the 2.7 % of sequences above 4096 keep their first 4096 tokens).
  --quick uses 1M sequences.

Rows, side by side on each dataset: our `ffd`, `bfd` and `greedy` (the order-preserving
NeMo-style baseline) on the whole dataset, and `python-ffd`, a plain-Python first-fit
decreasing written here as the naive baseline. That one scans every open bin for every
sequence, O(n * bins), so it only runs on a random subsample (20,000 sequences; --quick
2,000), next to our `ffd` on the very same subsample for a like-for-like time. Times are
the best of --repeat runs (default 3, --quick 1; the runs of the different algorithms and
of argsort interleaved, so that load from other processes hits them alike, in an order
that rotates every round, so that none always runs first after another's free), after one
warm-up call that loads the numba kernels from their on-disk cache (or compiles them,
once per machine).

For the 16M runs (SQuAD resampled and chat) the bench also times `numpy.argsort` of the
same lengths, interleaved with the packs: the goal is a whole-dataset pack, indices
included, faster than merely sorting the lengths.

Results go to the terminal (a table) and to `bench/results/packing.json`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import numba
import numpy as np
from rich.console import Console
from rich.table import Table

from meshplan.runtime.packing import (
    SQUAD11_HISTOGRAM,
    PackResult,
    load_lengths,
    lower_bound_l2,
    lower_bound_trivial,
    pack,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_HISTOGRAM = SQUAD11_HISTOGRAM
DEFAULT_OUT = ROOT / "bench" / "results" / "packing.json"

CHAT_MU, CHAT_SIGMA, CHAT_MIN, CHAT_MAX, CHAT_SEED = 6.2, 1.1, 16, 8192, 0
RESAMPLE_SEED = 0


def python_first_fit_decreasing(lengths: list[int], seq_len: int) -> list[list[int]]:
    """The naive baseline: sort, then put each sequence into the first bin with room,
    scanning the bins one by one. Plain Python, no clever data structure."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)
    rooms: list[int] = []
    bins: list[list[int]] = []
    for i in order:
        need = lengths[i]
        for b, room in enumerate(rooms):
            if room >= need:
                rooms[b] = room - need
                bins[b].append(i)
                break
        else:
            rooms.append(seq_len - need)
            bins.append([i])
    return bins


def best_time(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def chat_lengths(n: int) -> np.ndarray:
    rng = np.random.default_rng(CHAT_SEED)
    raw = np.rint(rng.lognormal(CHAT_MU, CHAT_SIGMA, n))
    return np.clip(raw, CHAT_MIN, CHAT_MAX).astype(np.int64)


def resampled(lengths: np.ndarray, n: int) -> np.ndarray:
    """n lengths drawn with replacement from `lengths`."""
    return np.random.default_rng(RESAMPLE_SEED).choice(lengths, n)


def against_argsort(
    rows: list[dict[str, Any]], dataset: str, seq_len: int, n: int, argsort_s: float
) -> list[dict[str, Any]]:
    """The whole-dataset rows of one dataset and seq_len, timed against argsort."""
    return [
        {
            "dataset": dataset,
            "seq_len": seq_len,
            "algorithm": r["algorithm"],
            "n": n,
            "pack_seconds": r["seconds"],
            "argsort_seconds": argsort_s,
            "pack_over_argsort": r["seconds"] / argsort_s,
        }
        for r in rows
        if r["dataset"] == dataset and r["seq_len"] == seq_len and r["n"] == n
    ]


def row(
    dataset: str,
    algorithm: str,
    seq_len: int,
    n: int,
    bins: int,
    tokens: int,
    packed_lengths: np.ndarray,
    seconds: float,
    note: str = "",
) -> dict[str, Any]:
    l2 = lower_bound_l2(packed_lengths, seq_len)
    return {
        "dataset": dataset,
        "algorithm": algorithm,
        "seq_len": seq_len,
        "n": n,
        "bins": bins,
        "sequences_per_bin": n / bins,
        "tokens": tokens,
        "efficiency": tokens / (bins * seq_len),
        "l1_bound": lower_bound_trivial(packed_lengths, seq_len),
        "l2_bound": l2,
        "gap_to_l2": bins - l2,
        "gap_to_l2_pct": 100.0 * (bins - l2) / l2,
        "seconds": seconds,
        "note": note,
    }


def run_dataset(
    name: str,
    lengths: np.ndarray,
    seq_len: int,
    *,
    overlong: str,
    python_n: int,
    repeat: int,
    rng: np.random.Generator,
    with_argsort: bool = False,
) -> tuple[list[dict[str, Any]], float]:
    """The rows of one dataset at one seq_len, and (with_argsort) the time of
    numpy.argsort of the same lengths. The timed runs are interleaved — ffd, bfd, greedy,
    argsort, then again — so that a burst of load on a shared machine hits all alike, and
    the order rotates every round: the first run after another's large free pays for
    fresh memory (page faults and, with memory fragmented by other processes, compaction
    for huge pages: up to seconds at 16M), and no variant should be the one that always
    pays."""
    rows = []
    n = int(lengths.shape[0])
    algorithms = ("ffd", "bfd", "greedy")
    timed = [*algorithms, "argsort"] if with_argsort else list(algorithms)
    best = dict.fromkeys(timed, float("inf"))
    figures: dict[str, dict[str, Any]] = {}
    for k in range(repeat):
        shift = k % len(timed)
        for what in timed[shift:] + timed[:shift]:
            if what == "argsort":
                seconds, _ = best_time(partial(np.argsort, lengths), 1)
                best["argsort"] = min(best["argsort"], seconds)
                continue
            seconds, r = best_time(partial(pack, lengths, seq_len, what, overlong=overlong), 1)
            assert isinstance(r, PackResult)
            best[what] = min(best[what], seconds)
            if what not in figures:  # the result is the same every time
                note = f"{r.n_truncated:,} truncated" if r.n_truncated else ""
                figures[what] = row(
                    name, what, seq_len, n, r.n_bins, r.tokens, r.lengths, 0.0, note
                )
            del r  # free it before the next run, as a training job would
    for algorithm in algorithms:
        rows.append(figures[algorithm] | {"seconds": best[algorithm]})

    # Like for like on a subsample: the plain-Python baseline and our ffd.
    m = min(python_n, n)
    sub = lengths if m == n else lengths[rng.choice(n, m, replace=False)]
    sub = np.minimum(sub, seq_len)  # the baseline has no overlong policy: truncate first
    note = "whole dataset" if m == n else f"random subsample of {m:,}"
    sub_list = sub.tolist()
    seconds, bins = best_time(lambda: python_first_fit_decreasing(sub_list, seq_len), 1)
    assert isinstance(bins, list)
    rows.append(row(name, "python-ffd", seq_len, m, len(bins), int(sub.sum()), sub, seconds, note))
    seconds, r = best_time(lambda: pack(sub, seq_len, "ffd"), repeat)
    assert isinstance(r, PackResult) and r.n_bins == len(bins)  # same algorithm, same bins
    rows.append(row(name, "ffd", seq_len, m, r.n_bins, r.tokens, r.lengths, seconds, note))
    return rows, best.get("argsort", float("nan"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat (smoke test)")
    parser.add_argument("--histogram", type=Path, default=DEFAULT_HISTOGRAM)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--repeat", type=int, default=None, help="timing repeats (best of)")
    args = parser.parse_args(argv)
    repeat = args.repeat or (1 if args.quick else 3)
    big_n = 1_000_000 if args.quick else 16_000_000
    python_n = 2_000 if args.quick else 20_000
    console = Console(width=max(Console().width, 150))

    # Warm-up: load (or, on a fresh machine, compile) every kernel outside the timings.
    t0 = time.perf_counter()
    for algorithm in ("ffd", "bfd", "greedy"):
        pack([3, 5, 9], 16, algorithm)
        pack([3, 5, 90], 16, algorithm, overlong="truncate")
    first_call = time.perf_counter() - t0

    squad = load_lengths(args.histogram)
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    for seq_len in (384, 2048):
        rows += run_dataset(
            "squad", squad, seq_len, overlong="error", python_n=python_n, repeat=repeat, rng=rng
        )[0]
    t0 = time.perf_counter()
    big = {
        f"squad-{big_n // 1_000_000}M": (resampled(squad, big_n), (384, 2048)),
        f"chat-{big_n // 1_000_000}M": (chat_lengths(big_n), (4096, 8192)),
    }
    console.print(f"generated 2 x {big_n:,} lengths in {time.perf_counter() - t0:.1f} s")
    versus: list[dict[str, Any]] = []
    for name, (lengths, seq_lens) in big.items():
        for seq_len in seq_lens:
            overlong = "truncate" if seq_len < int(lengths.max()) else "error"
            big_rows, argsort_s = run_dataset(
                name,
                lengths,
                seq_len,
                overlong=overlong,
                python_n=python_n,
                repeat=repeat,
                rng=rng,
                with_argsort=True,
            )
            rows += big_rows
            versus += against_argsort(big_rows, name, seq_len, big_n, argsort_s)

    table = Table(title="Sequence packing: efficiency, gap to the Martello–Toth L2 bound, time")
    for col in (
        "dataset",
        "algorithm",
        "seq_len",
        "n",
        "bins",
        "seqs/bin",
        "efficiency",
        "L2 bound",
    ):
        table.add_column(col, justify="left" if col in ("dataset", "algorithm") else "right")
    table.add_column("gap to L2", justify="right")
    table.add_column("time", justify="right")
    table.add_column("note")
    for r in rows:
        table.add_row(
            r["dataset"],
            r["algorithm"],
            str(r["seq_len"]),
            f"{r['n']:,}",
            f"{r['bins']:,}",
            f"{r['sequences_per_bin']:.2f}",
            f"{100 * r['efficiency']:.3f} %",
            f"{r['l2_bound']:,}",
            f"{r['gap_to_l2']:,} ({r['gap_to_l2_pct']:.2f} %)",
            f"{r['seconds']:.3f} s",
            r["note"],
        )
    console.print(table)
    vs = Table(title=f"{big_n:,} sequences: whole-dataset pack (indices included) vs numpy.argsort")
    vs.add_column("dataset")
    for col in ("seq_len", "algorithm", "pack", "argsort", "pack / argsort"):
        vs.add_column(col, justify="right")
    for v in versus:
        vs.add_row(
            v["dataset"],
            str(v["seq_len"]),
            v["algorithm"],
            f"{v['pack_seconds']:.3f} s",
            f"{v['argsort_seconds']:.3f} s",
            f"{v['pack_over_argsort']:.2f}",
        )
    console.print(vs)
    console.print(
        f"first pack call in this process (numba cache load or compile): {first_call:.2f} s; "
        f"times are the best of {repeat}; python-ffd runs once."
    )

    report = {
        "meta": {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "quick": args.quick,
            "repeat": repeat,
            "python": sys.version.split()[0],
            "numpy": np.__version__,
            "numba": numba.__version__,
            "machine": platform.machine(),
            "processor": platform.processor(),
            "histogram": str(args.histogram),
            "squad_resampled": {
                "n": big_n,
                "distribution": "numpy choice with replacement from the histogram's lengths",
                "seed": RESAMPLE_SEED,
            },
            "chat": {
                "n": big_n,
                "distribution": "round(lognormal(mu, sigma)) clipped to [min, max]",
                "mu": CHAT_MU,
                "sigma": CHAT_SIGMA,
                "min": CHAT_MIN,
                "max": CHAT_MAX,
                "seed": CHAT_SEED,
            },
            "python_ffd_subsample": python_n,
            "first_call_seconds": first_call,
        },
        "rows": rows,
        "pack_vs_argsort": versus,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
