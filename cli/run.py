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
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from meshplan.dsl.errors import PlanRejected

from .console import Terminal
from .options import positive_int


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
    p.add_argument("--seq-len", type=positive_int, metavar="N",
                   help="tokens per packed bin (default: the plan's, at most the model's maximum positions)")
    p.add_argument("--micro-batch", type=positive_int, default=1, metavar="K",
                   help="bins per data-parallel rank per step (default 1)")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (default 3e-4)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip gradients to this norm (0: never)")
    p.add_argument("--seed", type=int, default=0, help="weights, data and shuffling seed")
    p.add_argument("--log-every", type=positive_int, default=1, metavar="N")
    p.add_argument("--checkpoint-dir", metavar="DIR",
                   help="save checkpoints here, and resume from the latest complete one")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="K",
                   help="save every K steps (and after the last; 0: after the last only)")


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

    from meshplan.runtime.train.environment import init

    env = init()
    try:
        return _run(args, term, env)
    except _Stop as stop:
        if env.is_main and str(stop):
            term.note(f"plan run: {stop}")
        return stop.code
    finally:
        if env.initialised_here and dist.is_initialized():
            dist.destroy_process_group()


def _run(args: argparse.Namespace, term: Terminal, env: Any) -> int:
    from meshplan.cli.progress import ProgressDisplay
    from meshplan.planner.program import Program
    from meshplan.runtime.packing import PackingError
    from meshplan.runtime.parallel.apply import StepError, context_step
    from meshplan.runtime.train.build import build_applied
    from meshplan.runtime.train.data import DataError, PackedData, load_sequences
    from meshplan.runtime.train.environment import TrainError
    from meshplan.runtime.train.loop import TrainConfig, make_optimizer, resume, train
    from meshplan.runtime.train.topology import Topology
    from meshplan.runtime.weights.loading import LoadError

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
    say = term.note if env.is_main else (lambda *a, **k: None)

    try:
        applied, backend, weights = build_applied(program, args.model, seed=args.seed,
                                                  device=env.device)
        topology = Topology.of(applied)
    except (StepError, TrainError) as e:
        raise _Stop(1, str(e)) from None
    except LoadError as e:
        raise _Stop(2, f"--model {args.model}: {e}") from None
    model = applied.model
    config = getattr(model, "config", None)
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
        start = resume(args.checkpoint_dir, applied, optimizer, loader)
        if start:
            say(f"  resumed from step {start} in {args.checkpoint_dir}")
    if start >= args.steps:
        say(f"nothing to do: the checkpoint is at step {start}, --steps is {args.steps}")
        return 0
    with ProgressDisplay(total=args.steps, stream=term.err.file, log_every=args.log_every,
                         enabled=env.is_main) as display:
        history = train(applied, optimizer, loader, topology, train_config, start_step=start,
                        on_step=display, checkpoint_root=args.checkpoint_dir)
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
