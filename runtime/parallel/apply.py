"""Apply a Program to a model: one function per step kind, walked in program order.

Before any collective, every rank checks the world size and that each module a step
names exists. A failing step is re-raised as `StepError` naming the plan line the step
came from. Step order is the compiler's (see planner/lower.py); nothing is reordered
here. Under context parallelism, batches go through `Applied.shard_batch` (each rank
keeps its part of the sequence; see `runtime.parallel.context`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from meshplan.dsl.styles import STYLES
from meshplan.planner.program import (
    Adapters,
    Checkpoint,
    ContextParallel,
    ExpertParallel,
    FullyShard,
    MixedPrecision,
    Parallelize,
    Pipeline,
    Program,
    S,
    Step,
    StyleCall,
)

from ..attention.context import CP_ATTRIBUTE, ContextParallelAttention
from .adapters import AdapterError, adapted_modules, adapter_matrices, base_kind, install_adapters
from .context import ContextSplit, shard_batch
from .mesh import build_mesh, submesh
from .pipeline import Pipelined, apply_pipelined, pipeline_step
from .registry import make_style, resolve
from .styles import selective_checkpoint_context
from .ties import retie, tied_groups

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


class StepError(RuntimeError):
    """A step failed; the message starts with the plan line it came from."""


@dataclass
class Applied:
    model: nn.Module
    mesh: DeviceMesh
    program: Program
    # Under pipeline parallelism: this rank's stages and their schedule (`model` then
    # holds the stages' parameters under their Hugging Face names).
    pipeline: Pipelined | None = None

    @property
    def context_split(self) -> ContextSplit | None:
        """How the Program cuts sequences over context-parallel ranks (None: it does not)."""
        return context_split(self.program)

    @property
    def cp_rank(self) -> int:
        step = context_step(self.program)
        return submesh(self.mesh, (step.mesh_dim,)).get_local_rank() if step else 0

    def shard_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """This rank's part of a full-row collated batch under the plan's context
        parallelism (`runtime.parallel.context.shard_batch`); the batch itself without it."""
        split = self.context_split
        return batch if split is None else shard_batch(batch, split, self.cp_rank)


def context_split(program: Program) -> ContextSplit | None:
    """How the Program cuts sequences over its context-parallel ranks (None: it does not)."""
    step = context_step(program)
    return ContextSplit(program.mesh.size(step.mesh_dim), step.load_balance) if step else None


def context_step(program: Program) -> ContextParallel | None:
    """The Program's context-parallel step, if it splits sequences (cp > 1)."""
    return next((s for s in program.steps_of(ContextParallel) if program.mesh.size(s.mesh_dim) > 1), None)


def apply(program: Program, model: nn.Module, *, mesh: DeviceMesh | None = None,
          device_type: str = "cpu") -> Applied:
    """Parallelise `model` in place as `program` says; returns the model and the mesh."""
    _check_modules(program, model)
    mesh = mesh if mesh is not None else build_mesh(program.mesh, device_type)
    cut = pipeline_step(program)
    if cut is not None:  # the stages first, then every other step on each stage
        held, pipelined = apply_pipelined(program, cut, model, mesh, torch.device(device_type),
                                          lambda steps, stage: _apply_steps(steps, stage, mesh))
        return Applied(held, mesh, program, pipelined)
    _apply_steps(program.steps, model, mesh)
    return Applied(model, mesh, program)


def _apply_steps(steps: Sequence[Step], model: nn.Module, mesh: DeviceMesh) -> None:
    ties = tied_groups(model)  # parallelize_module unties them: put them back after each step
    for step in steps:
        try:
            STEPS[type(step)](step, model, mesh)
        except StepError:
            raise
        except Exception as e:
            raise StepError(f"{_where(step)}: {step.kind} failed: {type(e).__name__}: {e}") from e
        retie(ties)


def _where(step: Step) -> str:
    return str(step.span) if step.span.line else f"<{step.kind} step>"


def _module(model: nn.Module, fqn: str) -> nn.Module:
    return model if not fqn else model.get_submodule(fqn)


def _check_modules(program: Program, model: nn.Module) -> None:
    # A checkpointed block's modules keep their names (the dry run applies a step at a
    # time, so later steps see the wrapper a checkpoint step put in).
    names = {name.replace("._checkpoint_wrapped_module", "") for name, _ in model.named_modules()}
    for step in program.steps:
        missing = [f for f in step.modules() if f and f not in names]
        if missing:
            raise StepError(f"{_where(step)}: the model has no module `{missing[0]}`: was the program "
                            f"compiled for another model than {type(model).__name__}?")


def _adapters(step: Adapters, model: nn.Module, mesh: DeviceMesh) -> None:
    try:
        install_adapters(model, step)
    except AdapterError as e:
        raise StepError(f"{_where(step)}: {e}") from None


def _parallelize(step: Parallelize, model: nn.Module, mesh: DeviceMesh) -> None:
    from torch.distributed.tensor.parallel import parallelize_module

    root = _module(model, step.fqn)
    tp_mesh = submesh(mesh, (step.mesh_dim,))
    # torch's styles make each sharded parameter a new nn.Parameter that requires a
    # gradient: a frozen base (LoRA) would train. Each keeps its own flag (names stay).
    trainable = {name: p.requires_grad for name, p in root.named_parameters()}
    adapted = set(adapted_modules(root))
    styled = [(key, style) for rel, call in step.plan
              for key, style in _styles_at(step, root, rel, call, rel in adapted)]
    for _, style in (entry for entry in styled if entry[0] == ""):  # a style on the block module itself
        parallelize_module(root, tp_mesh, style)
    plan = {key: style for key, style in styled if key}
    if plan:
        parallelize_module(root, tp_mesh, plan)
    for name, p in root.named_parameters():
        if name in trainable and p.requires_grad != trainable[name]:
            p.requires_grad_(trainable[name])
    for rel, call in step.plan:
        after = STYLES[call.style].after
        if after is not None and call.parts > 1 and "." in rel:
            parent = root.get_submodule(rel.rsplit(".", 1)[0])
            resolve(after)(parent, root.get_submodule(rel), call.parts, tp_mesh.size())


def _styles_at(step: Parallelize, root: nn.Module, rel: str, call: StyleCall,
               adapted: bool) -> list[tuple[str, Any]]:
    """The (name relative to the block, ParallelStyle) pairs a plan entry becomes.

    On a module carrying a LoRA adapter (the Adapters step ran first), the style shards
    the base (`<rel>.base_layer`) and the style registry's adapter layout shards
    `<rel>.lora_A.default` / `<rel>.lora_B.default`, so the adapter's output lies as the
    base's and the wrapper adds the two locally. A style that only converts layouts
    (prepare_input / prepare_output) stays on the wrapper: it sees what the model sees."""
    record = STYLES[call.style]
    if record.conversions or not adapted:
        return [(rel, make_style(call))]
    wrapper = _module(root, rel)
    base = wrapper.get_submodule("base_layer")
    kind = base_kind(base)
    layout_of = record.adapter.get(kind)
    if layout_of is None:
        fqn = ".".join(p for p in (step.fqn, rel) if p)
        able = [name for name, r in STYLES.items() if kind in r.adapter]
        raise StepError(f"{_where(step)}: `{fqn}` carries a LoRA adapter, which style {call.style} cannot "
                        f"lay out beside its {type(base).__name__} base" +
                        (f" (styles that can: {', '.join(able)})" if able else
                         f" (no style can: leave the {type(base).__name__} out of tensor_parallel)"))
    layout = layout_of(call)
    names = {id(m): n for n, m in wrapper.named_modules()}
    adapter_a, adapter_b = (names[id(m)] for m in adapter_matrices(wrapper))
    prefix = f"{rel}." if rel else ""
    return [(f"{prefix}base_layer", make_style(call)),
            (f"{prefix}{adapter_a}", make_style(layout.a)),
            (f"{prefix}{adapter_b}", make_style(layout.b))]


def _checkpoint(step: Checkpoint, model: nn.Module, mesh: DeviceMesh) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    parent_name, _, child = step.fqn.rpartition(".")
    parent = _module(model, parent_name)
    module = parent.get_submodule(child)
    if step.mode == "full":
        wrapped = checkpoint_wrapper(module, preserve_rng_state=False)
    else:
        wrapped = checkpoint_wrapper(module, preserve_rng_state=False, context_fn=selective_checkpoint_context)
    parent.register_module(child, wrapped)


def _context_parallel(step: ContextParallel, model: nn.Module, mesh: DeviceMesh) -> None:
    try:
        install_context_parallel(model, mesh, step.fqns, step.mesh_dim, load_balance=step.load_balance,
                                 rotate=step.rotate)
    except ValueError as e:
        raise StepError(f"{_where(step)}: {e}") from None


def install_context_parallel(model: nn.Module, mesh: DeviceMesh, fqns: tuple[str, ...], mesh_dim: str, *,
                             load_balance: str = "headtail", rotate: str = "allgather") -> None:
    """Install meshplan's context-parallel attention (`runtime.parallel.context`) on the attention
    modules `fqns`, over `mesh[mesh_dim]`.

    Their attention function must be one of meshplan's backends (they hand the call to
    the installed `ContextParallelAttention`); a model on another implementation is
    switched to the best meshplan backend for the mesh's device."""
    from ..attention import BACKENDS, select_backend, use_backend

    cp_mesh = submesh(mesh, (mesh_dim,))
    configs: list[Any] = [getattr(m, "config", None) for m in model.modules()]
    configs = [c for c in configs if hasattr(c, "_attn_implementation")]
    if not configs:
        raise ValueError(f"{type(model).__name__} has no transformers config: context parallelism "
                         "replaces attention through transformers' AttentionInterface")
    if configs[0]._attn_implementation not in BACKENDS:
        use_backend(model, select_backend(mesh.device_type), check_device=False)
    for fqn in fqns:
        setattr(_module(model, fqn), CP_ATTRIBUTE, ContextParallelAttention(
            group=cp_mesh.get_group(), size=cp_mesh.size(), rank=cp_mesh.get_local_rank(),
            rotate=rotate, load_balance=load_balance, fqn=fqn))  # type: ignore[arg-type]


def _expert_parallel(step: ExpertParallel, model: nn.Module, mesh: DeviceMesh) -> None:
    from .experts import ExpertParallelError, install_expert_parallel

    try:
        install_expert_parallel(model, mesh, step.fqns, step.size, dispatch=step.dispatch,
                                replicas=step.replicas, fsdp=step.fsdp, hsdp=step.hsdp,
                                reshard_after_forward=step.reshard_after_forward,
                                gradient_divide_factor=step.gradient_divide_factor,
                                mp_policy=mixed_precision_policy(step.mixed_precision))
    except ExpertParallelError as e:
        raise StepError(f"{_where(step)}: {e}") from None


def mixed_precision_policy(mp: MixedPrecision | None) -> Any:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mp is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(
        param_dtype=DTYPES.get(mp.param or ""), reduce_dtype=DTYPES.get(mp.reduce or ""),
        output_dtype=DTYPES.get(mp.output or ""), cast_forward_inputs=mp.cast_forward_inputs,
    )


def _fully_shard(step: FullyShard, model: nn.Module, mesh: DeviceMesh) -> None:
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    modules = [_module(model, f) for f in step.fqns] if step.fqns else [model]
    target: nn.Module | list[nn.Module] = modules[0] if len(modules) == 1 else modules
    offload = CPUOffloadPolicy(pin_memory=step.offload.pin_memory) if step.offload else OffloadPolicy()
    group = submesh(mesh, step.mesh_dims)
    fully_shard(target, mesh=group, reshard_after_forward=step.reshard_after_forward,
                mp_policy=mixed_precision_policy(step.mixed_precision), offload_policy=offload,
                # FSDP2 all-gathers over the last dimension (HSDP replicates over the first)
                ignored_params=_unshardable(modules) if submesh(mesh, step.mesh_dims[-1:]).size() == 1
                else None)


def _unshardable(modules: list[nn.Module]) -> set[nn.Parameter] | None:
    """Parameters FSDP2 cannot hold when it shards over one rank: torch 2.13's single-rank
    all-gather path copies a tensor subclass's first all-gather input only, and an NF4
    base has three (codes, scalers, scales). Over one rank FSDP2 shards nothing, and a
    frozen base has no gradient to reduce, so leaving these to their own module changes
    nothing else (QLoRA on one GPU, or HSDP with a shard dimension of 1)."""
    from .quantize import is_quantized

    found = {p for m in modules for p in m.parameters() if is_quantized(p)}
    return found or None


def _pipeline(step: Pipeline, model: nn.Module, mesh: DeviceMesh) -> None:
    # `apply` cuts the model before any other step; a pipeline step reaching the table
    # is one of size 1 (nothing to cut) or one out of place.
    if mesh.size() > 1 and step.mesh_dim in (mesh.mesh_dim_names or ()) and \
            submesh(mesh, (step.mesh_dim,)).size() > 1:
        raise StepError(f"{_where(step)}: the pipeline step must be the Program's first step")


Applier = Callable[[Step, nn.Module, DeviceMesh], None]


def _applier(fn: Callable[[S, nn.Module, DeviceMesh], None]) -> Applier:
    """A step kind's applier, as the table holds it (the table's key picks the kind, so
    the applier is only called on steps of its own kind)."""
    held: Any = fn
    applier: Applier = held
    return applier


# How the runtime applies each step kind (the step protocol: planner/program.py `Step`).
STEPS: dict[type[Step], Applier] = {
    Adapters: _applier(_adapters),
    Parallelize: _applier(_parallelize),
    Checkpoint: _applier(_checkpoint),
    ContextParallel: _applier(_context_parallel),
    ExpertParallel: _applier(_expert_parallel),
    FullyShard: _applier(_fully_shard),
    Pipeline: _applier(_pipeline),
}
