"""`plan run FILE --model M`: compile, build, apply and train, under torchrun.

    torchrun --nproc_per_node 4 -m meshplan.cli.main run plans/llama.plan --model tiny-llama \\
        --set tp=2 --steps 5

The world size comes from torchrun's environment (one process without it). Rank 0
compiles the plan for that world size and sends the Program to the other ranks; every
rank then builds the model on the meta device, applies the Program, allocates and fills
its shards (`runtime.train.build_applied`), and trains on packed batches
(`runtime.train.data`) with the reference loop (`runtime.train`). Rank 0 prints everything;
exit codes: 0 trained (finite loss), 1 plan rejected, a step failed or the loss is not
finite, 2 usage (file, model, data).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from meshplan.dsl.errors import PlanRejected

from .console import Terminal
from .options import micro_batch_arg, positive_int, seq_len_arg


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="the plan")
    p.add_argument("--model", required=True, metavar="M",
                   help="a preset (see plans/models) or a Hugging Face directory (config.json, and "
                        "safetensors weights if any: without, weights are seeded random)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                   help="override a param (or a mesh dimension: mesh.DIM=N); repeatable")
    p.add_argument("--data", default="synthetic", metavar="PATH",
                   help="a JSONL of token-id lists, a JSONL of text (with --tokenizer), or `synthetic` "
                        "(default: seeded random sequences)")
    p.add_argument("--tokenizer", metavar="DIR", help="a local tokenizer directory, for text data")
    p.add_argument("--steps", type=positive_int, default=10, metavar="N", help="optimizer steps (default 10)")
    p.add_argument("--seq-len", type=seq_len_arg, metavar="N",
                   help="tokens per packed bin (default: the plan's, at most the model's maximum positions)")
    p.add_argument("--micro-batch", type=micro_batch_arg, default=1, metavar="K",
                   help="bins per data-parallel rank per step (default 1)")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (default 3e-4)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip gradients to this norm (0: never)")
    p.add_argument("--seed", type=int, default=0, help="weights, data and shuffling seed")
    p.add_argument("--log-every", type=positive_int, default=1, metavar="N", help="print the loss every N steps")
    p.add_argument("--checkpoint-dir", metavar="DIR",
                   help="save checkpoints here, and resume from the latest complete one")
    p.add_argument("--checkpoint-every", type=_count, default=0, metavar="K",
                   help="save every K steps (and after the last; 0: after the last only)")
    p.add_argument("--metrics", metavar="FILE",
                   help="append one JSON line per step (loss, grad norm, tokens, seconds; exact floats) "
                        "to FILE, on rank 0")


def _count(text: str) -> int:
    """argparse type: an integer ≥ 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 0, got {value}")
    return value


def _writable_dir(path: Path, option: str) -> str | None:
    """Why `path` cannot be (or become) a directory to write in; None when it can."""
    if path.exists():
        if not path.is_dir():
            return f"{option} {path}: exists and is not a directory"
        return None if os.access(path, os.W_OK | os.X_OK) else f"{option} {path}: not writable"
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{option} {path}: {parent} is not a directory"
    return None if os.access(parent, os.W_OK | os.X_OK) else f"{option} {path}: {parent} is not writable"


def _check_arguments(args: argparse.Namespace) -> str | None:
    """What is wrong with the numbers and paths given, before any work (None: nothing)."""
    for option, value, low in (("--lr", args.lr, 0.0), ("--weight-decay", args.weight_decay, 0.0),
                               ("--max-grad-norm", args.max_grad_norm, 0.0)):
        if not math.isfinite(value) or value < low:
            return f"{option} {value}: expected a finite number ≥ {low:g}"
    if args.checkpoint_dir:
        problem = _writable_dir(Path(args.checkpoint_dir), "--checkpoint-dir")
        if problem:
            return problem
    if args.checkpoint_every and not args.checkpoint_dir:
        return "--checkpoint-every needs --checkpoint-dir"
    if args.metrics:
        metrics = Path(args.metrics)
        if metrics.is_dir():
            return f"--metrics {metrics}: is a directory"
        problem = _writable_dir(metrics.parent, "--metrics")
        if problem:
            return problem
    return None


class _Stop(Exception):
    """A problem every rank runs into alike: rank 0 prints `message`, all exit with `code`."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message)
        self.code = code


def _compile(args: argparse.Namespace, term: Terminal, world: int) -> dict[str, Any]:
    """On rank 0: resolve the sequence length, compile, report; what the other ranks need."""
    from meshplan.dsl import load
    from meshplan.planner.mesh_facts import plan_seq_len, program_sequence_multiple
    from meshplan.planner.models import ModelSpecError, resolve_model

    from .compile import compile_for_cli

    if not Path(args.file).exists():
        raise _Stop(term.usage_error("run", f"no such file: {args.file}"))
    problem = _check_arguments(args)
    if problem:
        raise _Stop(term.usage_error("run", problem))
    overrides = list(args.overrides)
    if args.seq_len and any(o.split("=", 1)[0].strip() == "seq_len" for o in overrides):
        raise _Stop(term.usage_error("run", "give --seq-len or --set seq_len=…, not both"))
    try:
        spec, _ = load(Path(args.file), overrides)
        source = resolve_model(args.model)
    except PlanRejected as e:
        term.diagnostics(e.diagnostics)
        raise _Stop(1, "plan rejected") from None
    except ModelSpecError as e:
        raise _Stop(term.usage_error("run", f"--model {args.model}: {e}")) from None
    found = plan_seq_len(spec)
    planned = found[0] if found else None
    seq_len = args.seq_len or planned or 2048
    limit = getattr(source.config, "max_position_embeddings", None)
    if not args.seq_len and isinstance(limit, int) and seq_len > limit:
        term.note(f"seq_len {seq_len} is longer than {args.model}'s {limit} positions: using {limit} "
                  "(--seq-len to choose)")
        seq_len = limit
    if seq_len != planned and "seq_len" in spec.params:
        overrides.append(f"seq_len={seq_len}")  # so that the compiler checks it divides
    compile_args = argparse.Namespace(file=args.file, model=args.model, world_size=world,
                                      overrides=overrides, json=False)
    compiled, code = compile_for_cli(compile_args, term, "run")
    if compiled is None:
        raise _Stop(code)
    program = compiled.program  # type: ignore[attr-defined]
    term.diagnostics(compiled.warnings)  # type: ignore[attr-defined]
    multiple = program_sequence_multiple(program)
    if seq_len % multiple:  # checked by the compiler too when the plan has `param seq_len`
        raise _Stop(term.usage_error("run", f"--seq-len {seq_len} must be a multiple of {multiple} "
                                             "(the sequence is split over tp and cp)"))
    packing = asdict(spec.packing) if spec.packing is not None else {}
    packing.pop("span", None)
    packing["seq_len"] = seq_len
    return {"program": program.to_json(), "packing": packing}


def _share(payload: list[Any]) -> list[Any]:
    import torch.distributed as dist

    if dist.get_world_size() > 1:
        dist.broadcast_object_list(payload, src=0)
    return payload


def run(args: argparse.Namespace, term: Terminal) -> int:
    import torch.distributed as dist

    from meshplan.runtime.train.environment import init, is_peer_failure

    env = init()
    try:
        return _run(args, term, env)
    except _Stop as stop:
        if env.is_main and str(stop):
            term.note(f"plan run: {stop}")
        return stop.code
    except Exception as e:
        if not is_peer_failure(e):
            raise
        # Every survivor says it: rank 0 may be the one that died.
        term.note(_peer_failure(args, env, e))
        return 1
    finally:
        if env.initialised_here and dist.is_initialized():
            dist.destroy_process_group()


def _peer_failure(args: argparse.Namespace, env: Any, error: BaseException) -> str:
    """What a surviving rank says when a collective broke because another rank went away."""
    from meshplan.runtime.train.environment import failed_ranks
    from meshplan.runtime.weights.checkpoint import latest

    gone = failed_ranks()
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    who = (f"rank{'s' if len(gone) > 1 else ''} {', '.join(map(str, gone))} failed (the process exited)"
           if gone else f"another rank failed ({first[:200]})")
    if args.checkpoint_dir:
        found = latest(args.checkpoint_dir)
        where = f"the newest complete checkpoint, {found}" if found else f"the start ({args.checkpoint_dir} holds no checkpoint yet)"
        how = (f"run the same command again to resume from {where}; under torchrun "
               "--max-restarts N this happens by itself")
    else:
        how = "nothing was checkpointed: give --checkpoint-dir DIR (and torchrun --max-restarts N) to resume after a failure"
    return f"plan run (rank {env.rank}): {who}; {how}"


def _metrics_writer(path: str | None, enabled: bool) -> Any:
    """A step callback appending exact figures as JSON lines (rank 0), or None."""
    if not path or not enabled:
        return None

    def write(stats: Any) -> None:
        record = {"step": stats.step, "loss": stats.loss, "grad_norm": stats.grad_norm,
                  "tokens": stats.tokens, "targets": stats.targets, "seconds": stats.seconds}
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    return write


def _run(args: argparse.Namespace, term: Terminal, env: Any) -> int:
    from meshplan.cli.progress import Phases, ProgressDisplay
    from meshplan.planner.program import Program
    from meshplan.runtime.explain.net import not_fitting_at_run
    from meshplan.runtime.packing import PackingError
    from meshplan.runtime.parallel.apply import StepError, context_step
    from meshplan.runtime.parallel.pipeline import PipelineError
    from meshplan.runtime.train.build import build_applied
    from meshplan.runtime.train.data import DataError, PackedData, load_sequences
    from meshplan.runtime.train.environment import TrainError, is_peer_failure
    from meshplan.runtime.train.loop import TrainConfig, make_optimizer, resume, train
    from meshplan.runtime.train.topology import Topology
    from meshplan.runtime.weights.checkpoint import CheckpointError
    from meshplan.runtime.weights.loading import LoadError

    say = term.note if env.is_main else (lambda *a, **k: None)
    phases = Phases(say)
    phases(f"compiling {args.file} for {args.model} on {env.world_size} rank{'s' if env.world_size != 1 else ''}")
    payload: list[Any] = [None, None]
    if env.is_main:
        try:
            payload = [0, _compile(args, term, env.world_size)]
        except _Stop as stop:
            payload = [stop.code, str(stop)]
    code, shared = _share(payload)
    if code:
        raise _Stop(code, shared if env.is_main else "")
    program = Program.from_json(shared["program"])
    packing = shared["packing"]
    seq_len = int(packing["seq_len"])

    phases("building the model: meta device, the plan's parallelism, local shards, weights")
    try:
        applied, backend, weights = build_applied(program, args.model, seed=args.seed,
                                                  device=env.device)
        topology = Topology.of(applied)
    except (StepError, TrainError, PipelineError) as e:
        raise _Stop(1, str(e)) from None
    except LoadError as e:
        raise _Stop(2, f"--model {args.model}: {e}") from None
    cut = applied.pipeline
    if cut is not None and args.micro_batch % cut.step.microbatches:
        # The schedule cuts each rank's step into the plan's microbatches (checked here,
        # before any data is read, rather than as a failure inside the first step).
        raise _Stop(2, f"--micro-batch {args.micro_batch}: the plan's pipeline cuts each step into "
                       f"{cut.step.microbatches} microbatches (line {cut.step.span.line}); give a "
                       f"multiple of {cut.step.microbatches}")
    model = applied.model
    config = getattr(model, "config", None)
    phases(f"loading and packing the data ({args.data})")
    try:
        sequences = load_sequences(args.data, vocab_size=int(getattr(config, "vocab_size", 0)),
                                   seq_len=seq_len, tokenizer=args.tokenizer, seed=args.seed)
        data = PackedData.build(sequences, seq_len, algorithm=packing.get("algorithm", "ffd"),
                                format=packing.get("format", "varlen"),
                                overlong=packing.get("overlong", "error"),
                                max_per_bin=packing.get("max_per_bin"), seed=packing.get("seed", 0),
                                context=topology.context)
        loader = data.loader(topology.dp_rank, topology.dp_size, micro_batch=args.micro_batch,
                             seed=args.seed, cp_rank=topology.cp_rank if topology.context else None)
    except (DataError, PackingError) as e:
        raise _Stop(2, str(e)) from None

    mesh = " × ".join(f"{n} {s}" for n, s in zip(program.mesh.names, program.mesh.shape, strict=True)
                      if s > 1) or "1 rank"
    say(f"plan run: {args.file} for {args.model} on {env.world_size} rank"
        f"{'s' if env.world_size != 1 else ''} ({env.backend}, {env.device.type}): {mesh}; "
        f"attention {backend}")
    cp_step = context_step(program)
    if topology.context is not None and cp_step is not None:
        say(f"  context parallel: {topology.context.size} ranks per sequence, "
            f"{topology.context.load_balance} split, {cp_step.rotate} attention; "
            f"each sequence padded to a multiple of {topology.context.pad_multiple}")
    r = data.result
    say(f"  data: {args.data}: {r.n_input:,} sequences in {r.n_bins:,} bins of {seq_len} tokens "
        f"({100 * r.efficiency:.1f} % full); global batch {topology.dp_size} × {args.micro_batch} "
        f"bin{'s' if args.micro_batch != 1 else ''}; {loader.steps_per_epoch:,} steps per epoch")
    say(f"  weights: {weights}")

    train_config = TrainConfig(steps=args.steps, lr=args.lr, weight_decay=args.weight_decay,
                               max_grad_norm=args.max_grad_norm or None, log_every=args.log_every,
                               checkpoint_every=args.checkpoint_every if args.checkpoint_dir else 0)
    if args.checkpoint_dir and not train_config.checkpoint_every:
        train_config = TrainConfig(**{**asdict(train_config), "checkpoint_every": args.steps})
    optimizer = make_optimizer(model, train_config)
    start = 0
    if args.checkpoint_dir:
        phases(f"looking for a checkpoint in {args.checkpoint_dir}")
        try:
            start = resume(args.checkpoint_dir, applied, optimizer, loader,
                           on_warning=lambda message: say(f"  warning: {message}"))
        except TrainError as e:
            raise _Stop(1, str(e)) from None
        if start:
            say(f"  resumed from step {start} in {args.checkpoint_dir}")
    if start >= args.steps:
        say(f"nothing to do: the checkpoint is at step {start}, --steps is {args.steps}")
        return 0
    phases(f"step {start + 1}: the first step also warms up (allocations, kernels)")
    metrics = _metrics_writer(args.metrics, env.is_main)
    with ProgressDisplay(total=args.steps, stream=term.err.file, log_every=args.log_every,
                         enabled=env.is_main) as display:
        def on_step(stats: Any) -> None:
            display(stats)
            if metrics is not None:
                metrics(stats)

        try:
            history = train(applied, optimizer, loader, topology, train_config, start_step=start,
                            on_step=on_step, checkpoint_root=args.checkpoint_dir,
                            on_checkpoint=display.checkpoint)
        except (TrainError, CheckpointError, PipelineError) as e:
            raise _Stop(1, str(e)) from None
        except Exception as e:  # the model's own code failing under the plan is the user's error
            # (the dry-run net of `plan compile` finds it earlier; it needs a process without
            # a process group, and here torchrun's is already up)
            message = None if is_peer_failure(e) else not_fitting_at_run(e, model, program)
            if message is None:
                raise
            raise _Stop(1, message) from None
    if not history:
        raise _Stop(1, "no step ran")
    timed = history[1:] or history  # the first step pays for warm-up
    rate = sum(s.tokens for s in timed) / max(sum(s.seconds for s in timed), 1e-9)
    first, last = history[0].loss, history[-1].loss
    say(f"trained {len(history)} step{'s' if len(history) != 1 else ''}: loss {first:.4f} → {last:.4f}, "
        f"{rate:,.0f} tokens/s" + (f"; checkpoints in {args.checkpoint_dir}" if args.checkpoint_dir else ""))
    if not all(math.isfinite(s.loss) for s in history):
        raise _Stop(1, "the loss is not finite")
    return 0
