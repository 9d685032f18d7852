"""The reference training loop behind `plan run`, shared by single-process and parallel runs.

    init()                       process group from torchrun's environment (or a 1-rank one)
    prepare(model)               meshplan's packed attention backend for the device
    apply(program, model)        the plan's parallelism (runtime/apply.py)
    Topology.of(applied)         where this rank sits: dp coordinate, loss group, grad divisor
    train(model, opt, loader, topology, config)   AdamW steps over packed batches

Guarantees (what the equivalence tests check against a single process):

- The loss is the token-weighted mean over the GLOBAL batch: every rank sums the
  cross-entropy of its tokens (labels are already shifted, see `runtime.loss`), the token
  count is all-reduced over the `loss` group (the plan's `loss` submesh when declared,
  else the data-parallel and context-parallel dimensions) BEFORE the forward, and each
  rank backpropagates `sum * grad_divisor / global_count`, where `grad_divisor` is the
  number of ranks FSDP averages gradients over. The reduced gradients are therefore the
  gradients of the global mean, however the global batch is split into ranks and
  micro-batches (gradient accumulation included). A plan whose FSDP mesh does not cover
  the loss group (replicas nobody synchronises) is refused with `TrainError`.
- Tensor-parallel runs compute the loss from vocabulary-sharded DTensor logits with
  `loss_parallel()`, forward and backward inside it, never gathering the vocabulary.
- `grad_norm` is the norm of the FULL gradient, for plain tensors and DTensors on any
  mix of meshes: each local shard's sum of squares is all-reduced over exactly the mesh
  dimensions the gradient is sharded on (replicated dimensions are counted once), so FSDP
  + TP parameters on different meshes are handled. `clip_grad_norm` scales in place by
  `min(1, max_norm / (norm + 1e-6))`, as `torch.nn.utils.clip_grad_norm_`.
- Under sequence parallelism a Hugging Face model sees a sharded sequence after its
  embedding and would build positions and masks from that length: the batches carry
  full-length `position_ids` and packing boundaries, and `prepare` selects meshplan's
  packed attention backend, which builds the mask from them and ignores the model's.
- Every rank runs the same number of steps and collectives (empty padding bins included).

- With `checkpoint_root`, `train` saves model, optimizer and data-loader state every
  `config.checkpoint_every` steps and after the last (`runtime.checkpoint`: DCP, atomic),
  and `resume` restores the latest complete checkpoint: the resumed run continues with
  the very batches and optimizer state the uninterrupted run would have had.

Model building (`build_applied`): meta device → Program → local shards allocated →
weights read per shard from safetensors, or seeded random weights that do not depend on
the layout (`runtime.loading`), so no rank ever holds the whole model.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TextIO

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate

from meshplan.planner.program import FullyShard, Parallelize, Program

from .apply import Applied, apply, context_split, context_step
from .attention import forward_kwargs, select_backend, use_backend
from .cp import ContextSplit
from .loading import init_random, load_broadcast, load_sharded, materialize, meta_model
from .loss import IGNORE_INDEX, loss_sum_and_count, vocab_parallel
from .mesh import submesh

if TYPE_CHECKING:
    from meshplan.planner.models import ModelSource

__all__ = [
    "Built",
    "Environment",
    "ProgressDisplay",
    "StepStats",
    "Topology",
    "TrainConfig",
    "TrainError",
    "build_applied",
    "build_model",
    "clip_grad_norm",
    "grad_norm",
    "init",
    "load_weights",
    "make_optimizer",
    "prepare",
    "resume",
    "save_checkpoint",
    "train",
    "train_step",
]

Batch = dict[str, Any]


class TrainError(RuntimeError):
    """The run cannot train correctly as set up; the message says why."""


# --------------------------------------------------------------------------- process group


@dataclass(frozen=True)
class Environment:
    """This process in the job: rank, world size, local rank, device, backend."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    initialised_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(backend: str | None = None, *, timeout: float = 1800.0) -> Environment:
    """Initialise `torch.distributed` from torchrun's environment; idempotent, optional.

    NCCL when CUDA is available (each rank on `cuda:LOCAL_RANK`), else gloo. Without
    torchrun's variables (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`) a one-rank
    group is created in-process, so the same code runs as a plain script.
    """
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if dist.is_initialized():
        return Environment(dist.get_rank(), dist.get_world_size(), local_rank, device,
                           str(dist.get_backend()))
    backend = backend or ("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(device)
    wait = datetime.timedelta(seconds=timeout)
    if all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        dist.init_process_group(backend, timeout=wait)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=wait)
    return Environment(dist.get_rank(), dist.get_world_size(), local_rank, device, backend, True)


def prepare(model: nn.Module, device: torch.device | str | None = None) -> str:
    """Select meshplan's packed-sequence attention backend for `device` (flash-attn or
    Transformer Engine on CUDA when installed, the exact PyTorch one otherwise) and
    install it in `model`; returns its name. Call before `apply`."""
    name = select_backend(device if device is not None else _device_of(model))
    use_backend(model, name)
    return name


def _source(source: str | nn.Module | ModelSource) -> ModelSource:
    from meshplan.planner.models import resolve_model

    src = resolve_model(source)
    if src.config is None or src.model_class is None:
        raise TrainError(f"--model {src.spec}: the training loop needs a transformers causal LM "
                         "(a preset or a Hugging Face directory)")
    return src


def load_weights(model: nn.Module | Applied, source: str | nn.Module | ModelSource, *,
                 seed: int = 0) -> str:
    """Fill a materialised model's weights; returns what was done, in words.

    A Hugging Face directory with safetensors: each rank reads only its shards
    (`loading.load_sharded`); with one `.bin`/`.pt` file: rank 0 reads it and broadcasts
    (`loading.load_broadcast`); otherwise seeded random weights that do not depend on
    the layout (`loading.init_random`)."""
    src = _source(source)
    sharded = [w for w in src.weights if w.suffix == ".safetensors"]
    pickled = [w for w in src.weights if w.suffix in (".bin", ".pt", ".pth")]
    if sharded and src.path is not None:
        load_sharded(model, src.path)
        return f"weights from {src.path} (each rank reads its shards)"
    if len(pickled) == 1:
        first = dist.is_initialized() and dist.get_rank() == 0
        load_broadcast(model, pickled[0] if first or not dist.is_initialized() else None)
        return f"weights from {pickled[0]} (read on rank 0, broadcast)"
    if pickled:
        raise TrainError(f"--model {src.spec}: {len(pickled)} torch weight files; convert them to "
                         "safetensors (one file, or shards with model.safetensors.index.json)")
    init_random(model, seed)
    return f"random weights (seed {seed})"


def build_model(source: str | nn.Module | ModelSource, *, seed: int = 0,
                device: torch.device | str = "cpu") -> nn.Module:
    """A single-process model on `device` with the weights `load_weights` gives: the
    same values `build_applied` puts in every shard, whatever the layout."""
    src = _source(source)
    model = meta_model(src)
    materialize(model, device)
    load_weights(model, src, seed=seed)
    return model


class Built(NamedTuple):
    """What `build_applied` made: the applied model, its attention backend, its weights."""

    applied: Applied
    attention: str
    weights: str


def build_applied(program: Program, source: str | nn.Module | ModelSource, *, seed: int = 0,
                  device: torch.device | str | None = None, mesh: DeviceMesh | None = None,
                  backend: str | None = None) -> Built:
    """Build on meta, select the attention backend, apply the Program, allocate the local
    shards and fill them (`load_weights`): no rank ever holds the full model."""
    src = _source(source)
    target = torch.device(device) if device is not None else init().device
    model = meta_model(src)
    name = backend or select_backend(target)
    use_backend(model, name)
    applied = apply(program, model, mesh=mesh, device_type=target.type)
    materialize(applied, target)
    return Built(applied, name, load_weights(applied, src, seed=seed))


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# --------------------------------------------------------------------------- topology


@dataclass(frozen=True)
class Topology:
    """Where this rank sits in the Program's mesh, for data and loss.

    `dp_rank`/`dp_size`: this rank's data-parallel coordinate (the `dp` submesh, else the
    product of `dp_replicate` and `dp_shard`); tensor-parallel peers share it and so read
    the same batches. `context`/`cp_rank`: the plan's context-parallel split and this
    rank's place in it (its peers read the same batches, each keeps its part of the
    sequence). `loss_group`: the ranks whose tokens make up the global batch (None
    when there is one). `grad_divisor`: the ranks FSDP averages gradients over.
    """

    dp_rank: int = 0
    dp_size: int = 1
    loss_group: dist.ProcessGroup | None = None
    loss_size: int = 1
    grad_divisor: int = 1
    vocab_parallel: bool = False
    rank: int = 0
    context: ContextSplit | None = None  # the plan's context-parallel split, if any
    cp_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def of(cls, applied: Applied) -> Topology:
        return cls.from_mesh(applied.program, applied.mesh)

    @classmethod
    def from_mesh(cls, program: Program, mesh: DeviceMesh) -> Topology:
        layout = program.mesh
        names = tuple(mesh.mesh_dim_names or ())
        subs = dict(layout.submeshes)
        dp_dims = subs.get("dp") or tuple(d for d in ("dp_replicate", "dp_shard") if d in names)
        loss_dims = subs.get("loss") or (*dp_dims, *(("cp",) if "cp" in names else ()))
        coord = mesh.get_coordinate() or (0,) * len(names)
        dp_rank = 0
        for d in dp_dims:
            dp_rank = dp_rank * layout.size(d) + coord[names.index(d)]
        dp_size = math.prod(layout.size(d) for d in dp_dims)
        loss_size = math.prod(layout.size(d) for d in loss_dims)
        group = _group(mesh, "loss" if "loss" in subs else None, loss_dims) if loss_size > 1 else None
        roots = [s for s in program.steps if isinstance(s, FullyShard) and not s.fqns]
        divisor = math.prod(layout.size(d) for d in roots[-1].mesh_dims) if roots else 1
        if loss_size > 1 and divisor != loss_size:
            what = (f"fully_shard averages gradients over {divisor}" if roots
                    else "no fully_shard synchronises their gradients")
            raise TrainError(f"the global batch is spread over {loss_size} data-parallel ranks "
                             f"({' × '.join(loss_dims)}) but {what}")
        tp = any(isinstance(s, Parallelize) for s in program.steps)
        cp = context_step(program)
        cp_rank = coord[names.index(cp.mesh_dim)] if cp is not None else 0
        return cls(dp_rank, dp_size, group, loss_size, divisor, tp, dist.get_rank(), context_split(program),
                   cp_rank)


def _group(mesh: DeviceMesh, name: str | None, dims: tuple[str, ...]) -> dist.ProcessGroup:
    if name is not None:
        return submesh(mesh, (name,)).get_group()
    if len(dims) == 1:
        return submesh(mesh, dims).get_group()
    return submesh(mesh, dims)._flatten("_".join(("loss", *dims))).get_group()


# --------------------------------------------------------------------------- gradients


def _grads(parameters: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [p.grad for p in parameters if p.grad is not None]


def grad_norm(parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all gradients together, as a float32 scalar on every rank."""
    buckets: dict[Any, torch.Tensor] = {}
    for g in _grads(parameters):
        key: Any = None
        local = g
        if isinstance(g, DTensor):
            if any(isinstance(p, Partial) for p in g.placements):  # pending sums: do them first
                g = g.redistribute(placements=[Replicate() if isinstance(p, Partial) else p
                                               for p in g.placements])
            # Shard, and _StridedShard (FSDP over TP), which is not a Shard subclass.
            dims = tuple(i for i, p in enumerate(g.placements) if not p.is_replicate())
            key = (g.device_mesh, dims) if dims else None
            local = g.to_local()
        square = local.detach().float().pow(2).sum()
        buckets[key] = buckets[key] + square if key in buckets else square
    total = torch.zeros((), dtype=torch.float32)
    for key, square in buckets.items():
        if key is not None:
            mesh, dims = key
            for d in dims:  # sum over every dimension the gradient is sharded on
                dist.all_reduce(square, group=mesh.get_group(d))
        total = total + square.cpu()
    return total.sqrt()


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Scale gradients so their total norm is at most `max_norm`; returns the norm before."""
    params = list(parameters)
    norm = grad_norm(params)
    if max_norm is not None:
        coef = min(1.0, max_norm / (float(norm) + 1e-6))
        if coef < 1.0:
            with torch.no_grad():
                for g in _grads(params):
                    g.mul_(coef)
    return norm


# --------------------------------------------------------------------------- the loop


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float | None = 1.0
    log_every: int = 1
    checkpoint_every: int = 0  # 0: never


@dataclass(frozen=True)
class StepStats:
    """One optimizer step, as every rank sees it (global figures)."""

    step: int
    loss: float  # token-weighted mean over the global batch
    grad_norm: float  # before clipping
    tokens: int  # real tokens in the global batch
    targets: int  # tokens with a label (what the loss averages over)
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def _set_sync(model: nn.Module, sync: bool) -> None:
    """FSDP2: reduce gradients only on the last micro-batch of a step."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over every trainable parameter (DTensors after `apply`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=config.lr, betas=config.betas,
                             weight_decay=config.weight_decay)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: Sequence[Batch],
               topology: Topology, *, step: int = 0, max_grad_norm: float | None = None,
               device: torch.device | None = None) -> StepStats:
    """Forward and backward every micro-batch of this rank, clip, and step the optimizer."""
    start = time.perf_counter()
    device = device or _device_of(model)
    model.train()
    batches = [_to(b, device) for b in micro_batches]
    counts = torch.tensor([sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches),
                           sum(int(b.get("num_tokens", b["input_ids"].numel())) for b in batches)],
                          dtype=torch.float64, device=device)
    if topology.loss_group is not None:
        dist.all_reduce(counts, group=topology.loss_group)
    targets, tokens = int(counts[0]), int(counts[1])
    scale = topology.grad_divisor / max(targets, 1)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i, batch in enumerate(batches):
        _set_sync(model, i == len(batches) - 1)
        with vocab_parallel() if topology.vocab_parallel else contextlib.nullcontext():
            logits = model(**forward_kwargs(batch)).logits
            total, _ = loss_sum_and_count(logits, batch["labels"])
            (total * scale).backward()
        loss_sum += total.detach().double()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = clip_grad_norm(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if topology.loss_group is not None:
        dist.all_reduce(loss_sum, group=topology.loss_group)
    loss = float(loss_sum) / max(targets, 1)
    return StepStats(step, loss, float(norm), tokens, targets, time.perf_counter() - start)


def train(model: nn.Module | Applied, optimizer: torch.optim.Optimizer,
          batches: Iterable[Sequence[Batch]], topology: Topology, config: TrainConfig, *,
          start_step: int = 0, on_step: Callable[[StepStats], None] | None = None,
          checkpoint_root: str | Path | None = None) -> list[StepStats]:
    """Run steps `start_step + 1 … config.steps`; returns their statistics.

    `batches` yields, per step, this rank's micro-batches (e.g. a `data.PackedLoader`,
    whose state is checkpointed with the model). `on_step` sees every step's statistics
    (rank 0 shows them). With `checkpoint_root` and `config.checkpoint_every`, a
    checkpoint is saved every that many steps and after the last one.
    """
    module = model.model if isinstance(model, Applied) else model
    history: list[StepStats] = []
    source: Iterator[Sequence[Batch]] = iter(batches)
    for step in range(start_step + 1, config.steps + 1):
        try:
            micro = next(source)
        except StopIteration:
            break
        stats = train_step(module, optimizer, micro, topology, step=step,
                           max_grad_norm=config.max_grad_norm)
        history.append(stats)
        if on_step is not None:
            on_step(stats)
        every = config.checkpoint_every
        if checkpoint_root is not None and every and (step % every == 0 or step == config.steps):
            save_checkpoint(checkpoint_root, model, optimizer, step, batches)
    return history


def save_checkpoint(root: str | Path, model: nn.Module | Applied, optimizer: torch.optim.Optimizer,
                    step: int, loader: Any = None) -> Path:
    """Save model, optimizer and the loader's state as `root/step-XXXXXXXX` (a collective)."""
    from .checkpoint import checkpoint_dir, save

    state = loader.state_dict() if hasattr(loader, "state_dict") else None
    return save(checkpoint_dir(root, step), model, optimizer, step, state, overwrite=True)


def resume(root: str | Path, model: nn.Module | Applied, optimizer: torch.optim.Optimizer,
           loader: Any = None) -> int:
    """Restore the latest complete checkpoint under `root` into model, optimizer and
    loader; returns its step (0 when there is none). A collective."""
    from .checkpoint import latest, load

    directory = latest(root)
    if directory is None:
        return 0
    step, state = load(directory, model, optimizer)
    if state is not None and hasattr(loader, "load_state_dict"):
        loader.load_state_dict(state)
    return step


# --------------------------------------------------------------------------- display


@dataclass
class ProgressDisplay:
    """Rank 0's view of a run: a rich progress bar with loss and tokens/s on a terminal,
    and one plain line per logged step (on a terminal above the bar; in logs alone)."""

    total: int
    stream: TextIO | None = None
    log_every: int = 1
    enabled: bool = True
    _progress: Any = field(default=None, repr=False)
    _task: Any = field(default=None, repr=False)

    def __enter__(self) -> ProgressDisplay:
        if not self.enabled:
            return self
        import sys

        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        stream = self.stream or sys.stderr
        tty = stream.isatty()
        console = Console(file=stream, soft_wrap=True, highlight=False, force_terminal=tty,
                          color_system="auto" if tty else None)
        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} tokens/s"),
            TimeElapsedColumn(), console=console, disable=not tty, transient=False,
        )
        self._task = self._progress.add_task("train", total=self.total, loss="-", rate="-")
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def __call__(self, stats: StepStats) -> None:
        if self._progress is None:
            return
        self._progress.update(self._task, completed=stats.step, loss=f"{stats.loss:.4f}",
                              rate=f"{stats.tokens_per_second:,.0f}")
        if stats.step % self.log_every == 0 or stats.step == self.total:
            self._progress.console.print(
                f"step {stats.step}/{self.total}  loss {stats.loss:.4f}  "
                f"grad-norm {stats.grad_norm:.3f}  tokens {stats.tokens:,}  "
                f"{stats.tokens_per_second:,.0f} tokens/s  {stats.seconds * 1000:.0f} ms",
                markup=False, highlight=False)
