"""Context-parallelism benchmark: per-rank attention balance, and step time against cp 1.

    python bench/context_parallel.py [--quick] [--step-cp N ...] [--skip-steps] [--out PATH]

1. Attention work balance (no model, only the split; about 10 s).
   The real SQuAD 1.1 length histogram (88,641 sequences, shipped as
   `runtime/packing/data/squad11_len384_histogram.json`) is packed at seq_len 4096 with
   ffd, as the runtime packs for context parallelism over cp = 2, 4, 8 ranks: every
   sequence reserves its length rounded up to 2·cp (`ContextSplit(cp, "headtail")
   .pad_multiple`) and each bin row is its padded sequences, then the tail padding up to
   4096 as one more segment (the `varlen` layout of `collate(..., cp_size=cp)`). Which cp
   rank holds each position of a row is `runtime.parallel.context.owners` — the runtime's own split —
   for `load_balance = headtail` and for `none` (a plain contiguous cut of the row).
   Work of a rank in a bin = the (query, key) pairs that causal attention inside each
   segment computes for the positions it holds: a position at offset o of its segment
   costs o + 1 (what a block-skipping kernel such as flash-attn's varlen does). Counted:
   every packed sequence's segment, its per-sequence cp pads included (they are computed);
   NOT counted: the tail-padding segment (reported separately as "incl. tail"; "useful"
   counts the pairs of real-token queries only, no padding of any kind).
   Balance of a bin = max over ranks / mean over ranks; reported: mean over bins (goal
   for headtail ≤ 1.05) and the worst bin, plus the token balance (positions per rank,
   1.0 by construction) and the real-token balance (non-padding tokens per rank).
   `none` is measured on the very same bins (only the split differs) and also as the
   runtime packs it without head-tail (no per-sequence pads: `pad_multiple` 1).
   Expected: head-tail balances the computed work exactly — chunks r and 2·cp−1−r of a
   segment of 2·cp·s tokens cost s²(2·cp−1) + s(s+1) pairs whatever r — so the figure
   checks that the runtime's split achieves it. The per-sequence pads sit at the end of
   each sequence, in its last chunk (rank 0's) or chunks, which is why head-tail's
   "useful" and real-token balances are not 1.

2. Step time against cp 1 on this machine (the tiny-llama preset, fp32).
   One training step = forward + backward of one packed bin (seq_len 2048, --quick 1024;
   SQuAD lengths sampled with seed 0, random token ids; the same bins for every run,
   collated for the largest cp measured, so every run sees identical full rows).
   - cp = 2 (and 4 when the machine has 4 cores; `--step-cp` to choose): `plans/llama.plan
     --set tp=1 mesh.cp=N seq_len=S` (bf16 mixed precision removed: CPUs would time the
     casts), i.e. context parallelism on every self_attn, full activation checkpointing,
     FSDP2 over dp_shard × cp; `rotate = allgather` and `rotate = ring`, built with
     `build_applied` in a gloo process group of N processes (127.0.0.1), each batch cut
     by `applied.shard_batch` (outside the timing, as the loader does it);
   - cp = 1: one process, the same bins whole: the plain model (`build_model` + `prepare`,
     the reference of the ratios) and the same plan compiled for 1 rank (activation
     checkpointing and a 1-rank FSDP: the like-for-like reference).
   Every process runs ONE thread (`torch.set_num_threads(1)`), the cp 1 process
   included: a per-core comparison. All groups are started at once and take turns (a
   barrier of all processes): at each step every group in turn runs one step of each of
   its variants while the others sleep, the order reversed every other step, so that
   load from other processes on a shared machine hits every variant alike. Step time =
   median over the timed steps after 2 warm-up steps (rank 0, between barriers); ratios
   to cp 1 both of the medians and "paired" (the median of the per-step ratios: step i is
   the same bin for every variant, run in neighbouring turns).
   Perfect scaling would be a ratio of 1/cp. On CPU the attention is dense and masked
   (local queries × all keys): `allgather` makes one SDPA call, `ring` attends each
   block with an explicit float32 log-sum-exp softmax (unfused, and recomputed under
   activation checkpointing), so ring costs more compute here than on GPU kernels.

Prints two tables and writes bench/results/context_parallel.json (with the core count).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meshplan.runtime.packing import SQUAD11_HISTOGRAM, PackResult, load_lengths, pack
from meshplan.runtime.parallel.context import ContextSplit, owners

ROOT = Path(__file__).resolve().parent.parent
HISTOGRAM = SQUAD11_HISTOGRAM
DEFAULT_OUT = ROOT / "bench" / "results" / "context_parallel.json"
PLAN = ROOT / "plans" / "llama.plan"
MODEL = "tiny-llama"

BALANCE_SEQ_LEN = 4096
BALANCE_CP = (2, 4, 8)
BALANCE_GOAL = 1.05


# --------------------------------------------------------------------------- 1. balance


def _segments(result: PackResult, multiple: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """(segment sizes, real lengths) of the rows of bins lo..hi-1, one after the other:
    each bin's sequences padded to `multiple` (what `collate(..., cp_size=cp)` does),
    then its tail padding up to seq_len as one more segment (real length 0)."""
    first, last = int(result.offsets[lo]), int(result.offsets[hi])
    real = result.lengths[first:last].astype(np.int64)
    padded = -(-real // multiple) * multiple
    tails = result.seq_len - np.add.reduceat(padded, result.offsets[lo:hi] - first)
    ends = result.offsets[lo + 1:hi + 1] - first  # a bin's tail goes after its last sequence
    sizes, reals = np.insert(padded, ends, tails), np.insert(real, ends, 0)
    keep = sizes > 0  # a full bin has no tail segment
    return sizes[keep], reals[keep]


def _owners(seg: np.ndarray, rows: int, split: ContextSplit) -> np.ndarray:
    """`runtime.parallel.context.owners` of `rows` rows laid end to end ([rows * T] segment ids).

    headtail cuts every segment on its own, so one call over the rows end to end gives
    each row's split (checked against a one-row call on the first row); `none` cuts each
    row by its length alone: one call on the [rows, T] ids (owners checks that every row
    cuts alike) gives the row, repeated."""
    ids = torch.from_numpy(seg)
    if split.load_balance == "none":
        return np.tile(owners(ids.view(rows, -1), split).numpy(), rows)
    own = owners(ids, split).numpy()
    length = seg.shape[0] // rows
    assert np.array_equal(own[:length], owners(ids[:length], split).numpy())
    return own


def _per_rank(key: np.ndarray, weights: np.ndarray | None, rows: int, cp: int) -> np.ndarray:
    """[rows, cp] sums of `weights` (counts without) by key = row * cp + rank."""
    return np.bincount(key, weights=weights, minlength=rows * cp).reshape(rows, cp)


def balance(lengths: np.ndarray, cp: int, load_balance: str, pack_multiple: int,
            seq_len: int = BALANCE_SEQ_LEN, chunk: int = 256) -> dict[str, Any]:
    """Per-bin attention-work and token balance of the `load_balance` split over `cp`
    ranks, on `lengths` packed (ffd) with every sequence padded to `pack_multiple`."""
    split = ContextSplit(cp, load_balance)  # type: ignore[arg-type]
    result = pack(lengths, seq_len, "ffd", pad_multiple=pack_multiple)
    n = result.n_bins
    work = np.zeros((n, cp))        # pairs, tail padding excluded
    work_tail = np.zeros((n, cp))   # pairs, tail padding included
    tokens = np.zeros((n, cp))      # positions held
    useful = np.zeros((n, cp))      # pairs of real queries only (no pad of any kind)
    real = np.zeros((n, cp))        # non-padding tokens held
    tail_tokens = 0
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        sizes, real_len = _segments(result, pack_multiple, lo, hi)
        seg = np.repeat(np.arange(sizes.shape[0]), sizes)
        position = np.arange(seg.shape[0])
        offset = position - (np.cumsum(sizes) - sizes)[seg]  # within its segment
        pairs = (offset + 1).astype(np.float64)  # causal: keys 0..offset of its segment
        is_tail = real_len[seg] == 0  # only a tail segment has no real token
        own = _owners(seg, hi - lo, split)
        key = (position // seq_len) * cp + own  # (bin in the chunk, rank)
        work[lo:hi] = _per_rank(key, np.where(is_tail, 0.0, pairs), hi - lo, cp)
        work_tail[lo:hi] = _per_rank(key, pairs, hi - lo, cp)
        tokens[lo:hi] = _per_rank(key, None, hi - lo, cp)
        is_real = offset < real_len[seg]
        useful[lo:hi] = _per_rank(key, np.where(is_real, pairs, 0.0), hi - lo, cp)
        real[lo:hi] = _per_rank(key, is_real.astype(np.float64), hi - lo, cp)
        tail_tokens += int(is_tail.sum())
    assert int(real.sum()) == int(result.lengths.sum())

    def ratio(a: np.ndarray) -> np.ndarray:
        return a.max(1) / a.mean(1)

    w, wt, u, t, r = ratio(work), ratio(work_tail), ratio(useful), ratio(tokens), ratio(real)
    worst = int(np.argmax(w))
    return {
        "cp": cp,
        "load_balance": load_balance,
        "pack_pad_multiple": pack_multiple,
        "bins": n,
        "real_tokens": int(result.lengths.sum()),
        "tail_padding_tokens": tail_tokens,
        "cp_pad_tokens": n * seq_len - int(result.lengths.sum()) - tail_tokens,
        "work_balance_mean": float(w.mean()),
        "work_balance_worst": float(w.max()),
        "work_balance_worst_bin": worst,
        "work_balance_worst_bin_per_rank": work[worst].tolist(),
        "work_balance_incl_tail_mean": float(wt.mean()),
        "work_balance_incl_tail_worst": float(wt.max()),
        "useful_work_balance_mean": float(u.mean()),
        "useful_work_balance_worst": float(u.max()),
        "token_balance_mean": float(t.mean()),
        "token_balance_worst": float(t.max()),
        "real_token_balance_mean": float(r.mean()),
        "real_token_balance_worst": float(r.max()),
    }


def run_balance(histogram: Path, cps: tuple[int, ...]) -> tuple[list[dict[str, Any]], float]:
    # Rows of 4096 are far too small for intra-op threads: they only contend (and on a
    # loaded machine they make each owners() call ten times slower).
    torch.set_num_threads(1)
    lengths = load_lengths(histogram)
    pack(lengths[:3], BALANCE_SEQ_LEN, "ffd")  # load the numba kernels outside the timing
    t0 = time.perf_counter()
    rows = []
    for cp in cps:
        headtail = ContextSplit(cp, "headtail").pad_multiple  # what the runtime pads to
        rows.append(balance(lengths, cp, "headtail", headtail)
                    | {"packing": "headtail (2·cp pads)"})
        rows.append(balance(lengths, cp, "none", headtail) | {"packing": "same bins as headtail"})
        plain = ContextSplit(cp, "none").pad_multiple  # 1: the runtime does not pad for `none`
        rows.append(balance(lengths, cp, "none", plain) | {"packing": "runtime (no cp pads)"})
    return rows, time.perf_counter() - t0


# --------------------------------------------------------------------------- 2. step time

BARRIER_TIMEOUT = 900.0  # seconds; a crashed process breaks the turn-taking barrier


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (all bound at once, then released)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _plan_text(rotate: str) -> str:
    text = PLAN.read_text(encoding="utf-8")
    text = re.sub(r"^\s*mixed_precision\s*\{[^}]*\}.*$", "", text, flags=re.M)  # fp32
    if rotate != "allgather":
        text, n = re.subn(r"(context_parallel on cp \{\n)", rf"\1  rotate = {rotate}\n", text)
        assert n == 1, "plans/llama.plan has no `context_parallel on cp {` block"
    return text


def _programs(world: int, seq_len: int) -> dict[str, str]:
    """Variant name -> compiled Program (JSON) for a group of `world` processes."""
    from meshplan.planner.compile import compile_plan

    overrides = ["tp=1", f"mesh.cp={world}", f"seq_len={seq_len}"]
    rotates = ("allgather",) if world == 1 else ("allgather", "ring")
    names = {"allgather": "plan" if world == 1 else "allgather", "ring": "ring"}
    return {names[r]: compile_plan(_plan_text(r), MODEL, world, overrides).program.to_json()
            for r in rotates}


def _worker(index: int, sizes: list[int], ports: list[int], turns: Any, args: dict[str, Any],
            result_dir: str) -> None:
    """Process `index` of all groups: group g holds sizes[g] processes (cp = sizes[g])."""
    import torch.distributed as dist

    group = next(g for g in range(len(sizes)) if index < sum(sizes[:g + 1]))
    rank = index - sum(sizes[:group])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{ports[group]}", rank=rank,
                            world_size=sizes[group])
    try:
        times = _measure(group, len(sizes), turns, args)
        if rank == 0:
            Path(result_dir, f"{group}.json").write_text(json.dumps(times), encoding="utf-8")
    finally:
        dist.destroy_process_group()


def _measure(group: int, groups: int, turns: Any, args: dict[str, Any]) -> dict[str, list[float]]:
    """Build this group's models, then take turns with the other groups: at each step every
    group in turn (order reversed every other step) runs one step of each of its variants
    while the others wait on `turns`, a barrier of all processes."""
    import torch.distributed as dist

    from meshplan.planner.program import Program
    from meshplan.runtime.attention import forward_kwargs
    from meshplan.runtime.train.build import build_applied, build_model, prepare
    from meshplan.runtime.train.data import PackedData
    from meshplan.runtime.train.loss import loss_sum_and_count

    seqs = [np.asarray(s, dtype=np.int64) for s in args["sequences"]]
    data = PackedData.build(seqs, args["seq_len"], algorithm="ffd",
                            context=ContextSplit(args["collate_cp"]))
    r = data.result
    steps = args["warmup"] + args["steps"]
    assert r.n_bins >= steps, f"{r.n_bins} bins for {steps} steps"
    full = [data.collate(np.arange(r.offsets[b], r.offsets[b + 1])) for b in range(steps)]
    counts = [int((batch["labels"] != -100).sum()) for batch in full]

    models: dict[str, tuple[torch.nn.Module, list[dict[str, Any]]]] = {}
    if dist.get_world_size() == 1:
        plain = build_model(MODEL, seed=0)
        prepare(plain)
        models["plain"] = (plain, full)
    for name, program in args["programs"][group].items():
        applied = build_applied(Program.from_json(program), MODEL, seed=0).applied
        models[name] = (applied.model, [applied.shard_batch(batch) for batch in full])

    def step(model: torch.nn.Module, batch: dict[str, Any], count: int) -> float:
        dist.barrier()
        start = time.perf_counter()
        logits = model(**forward_kwargs(batch)).logits
        total, _ = loss_sum_and_count(logits, batch["labels"])
        (total / count).backward()  # the loss over the whole row, as training divides it
        dist.barrier()
        seconds = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        return seconds

    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for i in range(steps):
        for g in range(groups) if i % 2 == 0 else reversed(range(groups)):
            turns.wait(BARRIER_TIMEOUT)
            if g != group:
                continue
            for name in names if i % 2 == 0 else names[::-1]:
                model, batches = models[name]
                seconds = step(model, batches[i], counts[i])
                if i >= args["warmup"]:
                    times[name].append(seconds)
    turns.wait(BARRIER_TIMEOUT)
    return times


def run_steps(histogram: Path, cps: tuple[int, ...], seq_len: int, steps: int,
              warmup: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import torch.multiprocessing as mp

    sizes = [1, *cps]
    collate_cp = max(cps)
    # SQuAD lengths (seed 0), random ids of the tiny vocabulary; enough for the bins used.
    lengths = load_lengths(histogram)
    rng = np.random.default_rng(0)
    n = int((steps + warmup + 2) * seq_len / lengths.mean() * 1.3)
    sample = rng.choice(lengths, size=n, replace=False)
    sequences = [rng.integers(0, 256, size=int(k)).tolist() for k in sample]
    args = {"sequences": sequences, "seq_len": seq_len, "collate_cp": collate_cp, "steps": steps,
            "warmup": warmup, "programs": [_programs(world, seq_len) for world in sizes]}
    turns = mp.get_context("spawn").Barrier(sum(sizes))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(sizes, _free_ports(len(sizes)), turns, args, tmp),
                           nprocs=sum(sizes), start_method="spawn")
        measured = [json.loads(Path(tmp, f"{g}.json").read_text(encoding="utf-8"))
                    for g in range(len(sizes))]
    wall = time.perf_counter() - t0
    plain, plan = measured[0]["plain"], measured[0]["plan"]
    reference, same_plan = statistics.median(plain), statistics.median(plan)
    cores = os.cpu_count() or 1
    rows = []
    for world, variants in zip(sizes, measured, strict=True):
        for name, seconds in variants.items():
            med = statistics.median(seconds)
            rows.append({
                "cp": world,
                "variant": name,
                "processes": world,
                "oversubscribed": world > cores,
                "step_s_median": med,
                "step_s": seconds,
                "ratio_to_cp1_plain": med / reference,
                "ratio_to_cp1_same_plan": med / same_plan,
                # Step i of every variant is the same bin, in neighbouring turns: the median
                # of the per-step ratios cancels both the bins' differences and slow load.
                "paired_ratio_to_cp1_plain": statistics.median(
                    a / b for a, b in zip(seconds, plain, strict=True)),
                "paired_ratio_to_cp1_same_plan": statistics.median(
                    a / b for a, b in zip(seconds, plan, strict=True)),
                "ideal_ratio": 1.0 / world,
            })
    meta = {"seq_len": seq_len, "collated_for_cp": collate_cp, "warmup_steps": warmup,
            "timed_steps": steps, "sequences_sampled": n, "wall_seconds": wall,
            "schedule": "one process group per cp size, all alive at once, taking turns: at "
                        "each step every group in turn (order reversed every other step) "
                        "runs one step of each of its variants while the others wait"}
    return rows, meta


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="step time on bins of 1024 with 4 timed steps (smoke test)")
    parser.add_argument("--histogram", type=Path, default=HISTOGRAM)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seq-len", type=int, default=None,
                        help="step-time bin length (default 2048, --quick 1024)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps (default 12, --quick 4)")
    parser.add_argument("--step-cp", type=int, nargs="+", default=None,
                        help="cp sizes of the step-time runs (default: 2, and 4 with ≥ 4 cores)")
    parser.add_argument("--skip-steps", action="store_true", help="only the balance part")
    args = parser.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 150))
    cores = os.cpu_count() or 1
    load_before = os.getloadavg()[0]
    seq_len = args.seq_len or (1024 if args.quick else 2048)
    steps = args.steps or (4 if args.quick else 12)
    step_cps = tuple(sorted(set(args.step_cp or ((2, 4) if cores >= 4 else (2,)))))
    if step_cps[0] < 2:
        parser.error("--step-cp: context-parallel sizes must be >= 2 (cp 1 always runs)")

    rows, balance_seconds = run_balance(args.histogram, BALANCE_CP)
    for r in rows:  # positions per rank are equal by construction: check it
        assert r["token_balance_worst"] == 1.0, r
    table = Table(title=f"CP attention work per rank, max / mean over ranks: SQuAD 1.1 packed "
                        f"at {BALANCE_SEQ_LEN} (ffd), {rows[0]['real_tokens']:,} tokens")
    for col in ("cp", "split", "packing", "bins", "work bal. mean", "worst bin",
                "incl. tail mean", "incl. tail worst", "useful mean", "tokens",
                "real tokens mean"):
        table.add_column(col, justify="left" if col in ("split", "packing") else "right")
    for r in rows:
        goal = ""
        if r["load_balance"] == "headtail":
            ok = r["work_balance_mean"] <= BALANCE_GOAL
            goal = f" ({'≤' if ok else '>'} {BALANCE_GOAL} goal{'' if ok else ' MISSED'})"
        table.add_row(str(r["cp"]), r["load_balance"], r["packing"], f"{r['bins']:,}",
                      f"{r['work_balance_mean']:.4f}{goal}", f"{r['work_balance_worst']:.4f}",
                      f"{r['work_balance_incl_tail_mean']:.4f}",
                      f"{r['work_balance_incl_tail_worst']:.4f}",
                      f"{r['useful_work_balance_mean']:.4f}",
                      f"{r['token_balance_mean']:.3f}", f"{r['real_token_balance_mean']:.4f}")
    console.print(table)
    console.print(
        "work = causal (query, key) pairs inside each segment, summed over the positions a rank "
        "holds (runtime.parallel.context.owners); counted: the packed sequences with their per-sequence cp "
        "pads; not counted: the tail padding of the row ('incl. tail' counts it; 'useful' "
        "counts only real-token queries, no pad of any kind). Balance per bin = max / mean "
        "over ranks; 'mean' is over bins, 'worst' the worst bin. tokens = positions per rank "
        f"(1.0 by construction, checked). Balance part: {balance_seconds:.1f} s.")

    step_rows: list[dict[str, Any]] = []
    step_meta: dict[str, Any] = {}
    if not args.skip_steps:
        step_rows, step_meta = run_steps(args.histogram, step_cps, seq_len, steps, warmup=2)
        st = Table(title=f"{MODEL} training step (forward + backward, fp32) on one packed bin of "
                         f"{seq_len} tokens: median of {steps} steps")
        for col in ("cp", "variant", "step time", "÷ cp1 plain", "paired", "÷ cp1 same plan",
                    "paired (plan)", "ideal"):
            st.add_column(col, justify="left" if col == "variant" else "right")
        labels = {"plain": "plain model (reference)", "plan": "same plan, 1 rank",
                  "allgather": "rotate = allgather", "ring": "rotate = ring"}
        for r in step_rows:
            note = " (oversubscribed)" if r["oversubscribed"] else ""
            st.add_row(str(r["cp"]), labels[r["variant"]] + note,
                       f"{r['step_s_median'] * 1000:.1f} ms", f"{r['ratio_to_cp1_plain']:.3f}",
                       f"{r['paired_ratio_to_cp1_plain']:.3f}",
                       f"{r['ratio_to_cp1_same_plan']:.3f}",
                       f"{r['paired_ratio_to_cp1_same_plan']:.3f}", f"{r['ideal_ratio']:.3f}")
        console.print(st)
        console.print(
            f"{cores} cores (1-min load average {load_before:.1f} before the bench, "
            f"{os.getloadavg()[0]:.1f} now); every process runs 1 thread (cp 1 included: a "
            "per-core comparison); gloo on 127.0.0.1; plan = plans/llama.plan --set tp=1 "
            "mesh.cp=N (fp32, full activation checkpointing, FSDP2 over cp); batches cut by "
            "applied.shard_batch outside the timing; 'paired' = median of the per-step ratios "
            "(same bin, neighbouring turns); ideal = 1/cp.")

    report = {
        "meta": {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "quick": args.quick,
            "cores": cores,
            # Other processes share the cores: the 1-minute load average before and after.
            "load_average_1min": [load_before, os.getloadavg()[0]],
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "numpy": np.__version__,
            "machine": platform.machine(),
            "processor": platform.processor(),
            "histogram": str(args.histogram),
        },
        "balance": {
            "seq_len": BALANCE_SEQ_LEN,
            "algorithm": "ffd",
            "goal_headtail_work_balance_mean": BALANCE_GOAL,
            "work": "causal (query, key) pairs within each segment, per cp rank, tail padding "
                    "excluded (work_balance_incl_tail_* include it); per-sequence cp pads counted "
                    "(useful_work_balance_* count real-token queries only)",
            "balance": "max over ranks / mean over ranks, per bin; mean and worst over bins",
            "seconds": balance_seconds,
            "rows": rows,
        },
        "step_time": None if args.skip_steps else {
            "model": MODEL,
            "plan": "plans/llama.plan --set tp=1 mesh.cp=N seq_len=S (mixed_precision removed)",
            "threads_per_process": 1,
            "backend": "gloo",
            **step_meta,
            "rows": step_rows,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
