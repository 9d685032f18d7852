"""One traced training step: activations, live memory and the collectives DTensor issues.

`trace_step` runs one training step (forward, loss, backward) of the reduced model with
the Program's tensor-parallel and checkpointing steps, on fake tensors (nothing is
allocated, only shapes flow) at the plan's sequence length and micro-batch, as rank 0.
A first forward without checkpointing tracks the live bytes of every storage it creates
and what autograd saves, per block (activations); the step as the Program runs it
records every collective DTensor issues (tensor/sequence parallel, loss parallel, and
the all-reduce of gradients left partial; `runtime.explain.comm.CommCounter`).
Attention runs as the model's SDPA call without a mask (`DRYRUN_ATTENTION`: causal, as a
varlen/flash kernel runs it), since masks cannot be built from tensors without data.
FSDP and context parallelism are not traced: their collectives follow from the unit
sizes and the attention shapes (`runtime.explain.comm`); the attention is traced over
the rank's seq_len / cp tokens.

A model that fails on the way is a `TraceFailure` naming the module that was running
and the line of the model's source that raised (`runtime.explain.failure`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from meshplan.planner.program import Checkpoint, ContextParallel, Parallelize, Program

from ..parallel.apply import DTYPES
from .comm import CommCounter, CommEvent, group_names
from .failure import ModuleStack, TraceFailure, apply_each
from .reduction import Reduction
from .world import fake_world

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from meshplan.planner.models import ModelSource

DRYRUN_ATTENTION = "meshplan_dryrun"
T = TypeVar("T")


@dataclass(frozen=True)
class BlockTrace:
    """Activations of one kept block, traced without checkpointing (bytes on rank 0)."""

    saved: int  # saved for backward by the block
    inputs: int  # its hidden-state input (what full checkpointing keeps of it)
    selective: int  # saved outputs of matmuls and attention (selective checkpointing keeps them)
    retained: int  # live growth across the block: what stays alive after it (≈ saved)
    transient: int  # live high-water mark during the block, above the live memory at its entry
    # Its hidden-state input's own bytes (the local tensor, not its storage): what a
    # pipeline stage boundary sends per microbatch (`runtime.explain.stages`).
    boundary: int = 0


@dataclass(frozen=True)
class StepTrace:
    """What one traced training step of the reduced model held and communicated.

    Live memory is tracked per tensor storage created during the forward (weights and
    the input ids excluded): `before` is what is live when the first block starts
    (embeddings, rotary tables), `after` the high-water mark from the last block's end
    through the loss, above the live memory at that point (final norm, logits, loss).
    """

    blocks: dict[int, BlockTrace]  # kept full-model layer → its activations
    before: int
    after: int
    outside: int  # saved for backward outside the blocks
    events: tuple[CommEvent, ...]
    seq_len: int  # tokens per rank per micro-batch (after the context-parallel split)
    micro_batch: int
    dtype: str


_SELECTIVE_OPS = ("aten.mm", "aten.addmm", "aten.bmm", "aten._scaled_dot_product")


def _storage(t: torch.Tensor) -> Any:
    return (t._local_tensor if isinstance(t, DTensor) else t).untyped_storage()


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    st = _storage(t)
    return st._cdata, st.nbytes()


class _LiveMemory:
    """Live bytes of the storages created by local ops while active (a dispatch mode
    below DTensor), with a resettable high-water mark; also notes which storages the ops
    selective checkpointing keeps produced."""

    def __init__(self, ignore: set[int]) -> None:
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode

        self.live = 0
        self.peak = 0
        self.paused = 0
        self.selective: set[int] = set()
        self._known: dict[int, Any] = {}
        tracker = self

        def forget(key: int, nbytes: int) -> Callable[[Any], None]:
            def callback(_: Any) -> None:
                tracker.live -= nbytes
                tracker._known.pop(key, None)
                # A later storage may get this one's address: it is not this one's kind.
                tracker.selective.discard(key)

            return callback

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                if any(t is DTensor for t in types):
                    return NotImplemented
                out = func(*args, **(kwargs or {}))
                if tracker.paused:
                    return out
                keep = str(func).startswith(_SELECTIVE_OPS)
                for t in out if isinstance(out, tuple | list) else (out,):
                    if not isinstance(t, torch.Tensor):
                        continue
                    st = t.untyped_storage()
                    key = st._cdata
                    if keep:
                        tracker.selective.add(key)
                    if key in ignore or key in tracker._known:
                        continue
                    nbytes = st.nbytes()
                    tracker._known[key] = weakref.ref(st, forget(key, nbytes))
                    tracker.live += nbytes
                    tracker.peak = max(tracker.peak, tracker.live)
                return out

        self._mode = Mode()

    def reset_peak(self) -> int:
        self.peak = self.live
        return self.live

    def __enter__(self) -> _LiveMemory:
        # DTensor infers output shapes by running each op on fake tensors of the *global*
        # shape; those are not allocations of the step.
        from torch.distributed.tensor._sharding_prop import ShardingPropagator

        original = ShardingPropagator._propagate_tensor_meta_non_cached
        tracker = self

        def propagate(prop: Any, op_schema: Any) -> Any:
            tracker.paused += 1
            try:
                return original(prop, op_schema)
            finally:
                tracker.paused -= 1

        self._restore = original
        ShardingPropagator._propagate_tensor_meta_non_cached = propagate  # type: ignore[method-assign,assignment]
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        from torch.distributed.tensor._sharding_prop import ShardingPropagator

        self._mode.__exit__(*exc)
        ShardingPropagator._propagate_tensor_meta_non_cached = self._restore  # type: ignore[method-assign]


def register_dryrun_attention() -> str:
    """Register the dry run's attention with transformers (idempotent): the model's own
    SDPA call with no mask (causal, as a varlen/flash kernel runs it), so that no mask of
    the sequence length is built from a tensor whose data does not exist. On meta
    tensors SDPA picks its kernel as on CPU (`_CpuAttentionKernel`)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any) -> Any:
        kwargs.pop("is_causal", None)
        kwargs.pop("softcap", None)  # logit soft-capping (Gemma-2) costs no memory or traffic
        if query.device.type == "meta":
            with _CpuAttentionKernel():
                return sdpa_attention_forward(module, query, key, value, None, **kwargs)
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)

    def no_mask(*args: Any, **kwargs: Any) -> None:
        return None

    AttentionInterface.register(DRYRUN_ATTENTION, attention)
    AttentionMaskInterface.register(DRYRUN_ATTENTION, no_mask)
    return DRYRUN_ATTENTION


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_CPU_FLASH: dict[tuple[Any, ...], bool] = {}


class _CpuAttentionKernel(torch.overrides.TorchFunctionMode):
    """SDPA as it runs on CPU, for meta tensors: on meta it always takes the math kernel
    (an s × s score matrix saved for backward), on CPU (the fake tensors the dry run's
    figures are defined on) the fused flash kernel wherever that applies. Which kernel
    CPU takes is asked once per call signature, of fake CPU tensors of the same shapes,
    with every mode of the step (memory and traffic counters) switched off."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **kwargs)
        call = {**dict(zip(_SDPA_ARGS, args, strict=False)), **kwargs}
        q, k, v, mask = call["query"], call["key"], call["value"], call.get("attn_mask")
        dropout, causal, scale = call.get("dropout_p", 0.0), call.get("is_causal", False), call.get("scale")
        if mask is not None or not all(t.device.type == "meta" for t in (q, k, v)):
            return func(*args, **kwargs)
        key = (*(tuple(t.shape) + tuple(t.stride()) for t in (q, k, v)), q.dtype, dropout, causal, scale,
               call.get("enable_gqa", False))
        if key not in _CPU_FLASH:
            _CPU_FLASH[key] = _cpu_takes_flash(q, k, v, call)
        if not _CPU_FLASH[key]:
            return func(*args, **kwargs)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout, causal, attn_mask=None, scale=scale)[0]


def _cpu_takes_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: dict[str, Any]) -> bool:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

    seen: list[str] = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    # No grad: the probe's tensors must not reach the step's saved-tensor hooks (CPU's
    # kernel choice does not depend on autograd).
    with _disable_current_modes(), FakeTensorMode(), torch.no_grad():
        def cpu(t: torch.Tensor) -> torch.Tensor:
            return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu")

        rest = {n: call[n] for n in _SDPA_ARGS[3:] if n in call}
        with Ops():
            torch.nn.functional.scaled_dot_product_attention(cpu(q), cpu(k), cpu(v), **rest)
    return any(op.startswith("aten._scaled_dot_product_flash_attention_for_cpu") for op in seen)


@contextmanager
def _quiet_fake_tensors() -> Iterator[None]:
    """Fake tensors log the traceback of an op that fails before raising it; a failure is
    the dry run's error to report (`TraceFailure`), once."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _fake_model(source: ModelSource, reduction: Reduction, dtype: torch.dtype) -> nn.Module:
    """The reduced model with the dry run's attention, built inside `step_tensors`."""
    import copy

    from meshplan.planner.models import reduced_config

    if source.config is None or source.model_class is None:
        raise TraceFailure("", None, "building the model", ValueError(
            f"model {source.spec!r} has no transformers config: it cannot be rebuilt on fake tensors"))
    config = (reduced_config(source.config, list(reduction.kept)) if reduction.reduced
              else copy.deepcopy(source.config))
    config.use_cache = False
    config._attn_implementation = register_dryrun_attention()
    with _default_dtype(dtype):
        return source.model_class(config)


@contextmanager
def step_tensors(*, meta: bool) -> Iterator[None]:
    """Where a dry-run step's tensors live: meta tensors (`meta=True`: ops dispatch in
    C++, a third of the fake tensors' time on a decoder step) or fake CPU tensors.
    Transformers tells fake tensors from data (`is_tracing`) and skips data-dependent
    checks for them: its masks are told meta tensors are traced too; any other such
    check raises on meta, so a step runs on meta first and, where it fails, again on
    fake tensors (`meta_first`): only a failure on fake tensors is the model's."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with (torch.device("meta") if meta else FakeTensorMode(allow_non_fake_inputs=True)), _quiet_fake_tensors(), \
            _grouped_experts_any_dtype(), _masks_trace_meta_tensors(meta):
        yield


@contextmanager
def _masks_trace_meta_tensors(meta: bool) -> Iterator[None]:
    """Transformers' mask preparation skips its data-dependent checks (the packed-sequence
    test on position ids) for traced tensors, fake ones included: on meta tensors it
    takes the same path, so the step computes what it computes on fake tensors."""
    from transformers import masking_utils

    original = getattr(masking_utils, "is_tracing", None)
    if not meta or original is None:
        yield
        return

    def is_tracing(tensor: Any = None) -> bool:
        return bool(original(tensor)) or (isinstance(tensor, torch.Tensor) and tensor.device.type == "meta")

    setattr(masking_utils, "is_tracing", is_tracing)  # noqa: B010 (not an export of the module)
    try:
        yield
    finally:
        setattr(masking_utils, "is_tracing", original)  # noqa: B010


@contextmanager
def _grouped_experts_any_dtype() -> Iterator[None]:
    """Transformers' grouped experts call `torch._grouped_mm`, whose CPU kernel takes any
    float dtype but whose meta/fake kernel only bf16: an fp32 MoE plan, exact on real
    ranks, failed the dry run. For other dtypes the dry run takes transformers' own
    fallback op (the same shapes, saved tensors and gradients; a shape stub on fake and
    meta tensors), as transformers itself does where grouped_mm cannot run."""
    try:
        from transformers.integrations import moe
    except ImportError:
        yield
        return
    original = getattr(moe, "_can_use_grouped_mm", None)
    if original is None:
        yield
        return

    def can_use(input: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> bool:
        return weight.dtype == torch.bfloat16 and bool(original(input, weight, offs))

    moe._can_use_grouped_mm = can_use
    try:
        yield
    finally:
        moe._can_use_grouped_mm = original


def meta_first(step: Callable[[bool], T]) -> T:
    """`step(True)` (on meta tensors); if it raises, `step(False)` (on fake tensors)."""
    try:
        return step(True)
    except Exception:
        return step(False)


def trace_step(program: Program, source: ModelSource, reduction: Reduction, *, seq_len: int,
               micro_batch: int, dtype: str, mesh: DeviceMesh | None = None) -> StepTrace:
    """Trace one forward/backward of the reduced model as rank 0 (see the module docstring).

    `program` is the full Program (for the mesh); the reduced Program's tensor-parallel
    and checkpointing steps are applied. `seq_len` is the sequence of one sample; with
    context parallelism each rank holds `seq_len / cp` of it. `mesh`: rank 0's mesh in
    the open fake world (else the trace opens its own). Raises `TraceFailure` when the
    model fails on the way.
    """
    if mesh is None:
        with fake_world(program.mesh, 0) as own:
            return trace_step(program, source, reduction, seq_len=seq_len, micro_batch=micro_batch,
                              dtype=dtype, mesh=own)
    # On fake tensors, where the figures are defined: on meta some families' steps save
    # other bytes (GPT-2's attention, MoE routing), though the dry-run net runs there.
    return _trace_step(program, source, reduction, seq_len=seq_len, micro_batch=micro_batch, dtype=dtype,
                       mesh=mesh, meta=False)


def _trace_step(program: Program, source: ModelSource, reduction: Reduction, *, seq_len: int,
                micro_batch: int, dtype: str, mesh: DeviceMesh, meta: bool) -> StepTrace:
    from ..train.loss import causal_lm_loss, vocab_parallel

    cp_steps = program.steps_of(ContextParallel)
    cp = program.mesh.size(cp_steps[0].mesh_dim) if cp_steps else 1
    local_seq = max(1, seq_len // cp)
    kept = reduction.kept if reduction.reduced else ()
    with step_tensors(meta=meta):
        model = _fake_model(source, reduction, DTYPES[dtype])
        apply_each(reduction.program, reduction.program.steps_of(Parallelize), model, mesh, reduction)
        ids = torch.zeros(micro_batch, local_seq, dtype=torch.long)
        positions = torch.arange(local_seq).expand(micro_batch, local_seq)
        ignore = {_storage_key(t)[0] for t in (*model.parameters(), *model.buffers(), ids, positions)}
        # 1. Forward without checkpointing: live memory and what autograd saves, per block.
        with ModuleStack(model, reduction) as running:
            try:
                first = _forward_memory(model, reduction, ids, positions, ignore,
                                        loss=lambda logits: causal_lm_loss(logits, ids), context=vocab_parallel)
            except Exception as e:
                raise running.failure(e, "forward") from e
        # 2. The step as the Program runs it (checkpointing included): collectives.
        apply_each(reduction.program, reduction.program.steps_of(Checkpoint), model, mesh, reduction)
        counter = CommCounter(group_names(mesh, program.mesh), reduction)
        stack = _stack_module(model, reduction)
        handles = counter.watch(stack or (), kept or range(len(stack or ())))
        try:
            run_step(model, reduction, ids, positions, watch=counter)
        finally:
            for h in handles:
                h.remove()
        counter.grad_reductions(model)
    blocks = {(kept[j] if kept else j): b for j, b in first.blocks.items()}
    return dataclasses.replace(first, blocks=blocks, events=tuple(counter.events), seq_len=local_seq,
                               micro_batch=micro_batch, dtype=dtype)


def run_step(model: nn.Module, reduction: Reduction, ids: torch.Tensor, positions: torch.Tensor, *,
             watch: contextlib.AbstractContextManager[Any] | None = None) -> None:
    """One forward, loss and backward of the dry-run model (under `watch`, if given); a
    failure is the `TraceFailure` of the module that was running."""
    from ..train.loss import causal_lm_loss, vocab_parallel

    phase = "forward"
    with ModuleStack(model, reduction) as running, watch or contextlib.nullcontext(), vocab_parallel():
        try:
            logits = model(input_ids=ids, position_ids=positions).logits
            loss = causal_lm_loss(logits, ids)
            phase = "backward"
            loss.backward()
        except Exception as e:
            raise running.failure(e, phase) from e


def _forward_memory(model: nn.Module, reduction: Reduction, ids: torch.Tensor, positions: torch.Tensor,
                    ignore: set[int], *, loss: Callable[[Any], Any],
                    context: Callable[[], contextlib.AbstractContextManager[Any]]) -> StepTrace:
    live = _LiveMemory(ignore)
    saved: dict[int, int] = {}
    per_block: dict[int, dict[str, int]] = {}
    current: list[int | None] = [None]
    outside = 0
    edges: dict[str, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal outside
        key, nbytes = _storage_key(t)
        if key in ignore or key in saved:
            return t
        saved[key] = nbytes
        j = current[0]
        if j is None:
            outside += nbytes
        else:
            entry = per_block[j]
            entry["saved"] += nbytes
            if key in live.selective:
                entry["selective"] += nbytes
        return t

    def enter(j: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            current[0] = j
            first = args[0] if args else kwargs.get("hidden_states")
            entry = per_block.setdefault(j, {"saved": 0, "selective": 0, "inputs": 0})
            if isinstance(first, torch.Tensor):
                entry["inputs"] = _storage_key(first)[1]
                local = first._local_tensor if isinstance(first, DTensor) else first
                entry["boundary"] = local.numel() * local.element_size()
            entry["entry"] = live.reset_peak()
            edges.setdefault("first", entry["entry"])

        return hook

    def leave(j: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            current[0] = None
            entry = per_block[j]
            entry["retained"] = live.live - entry["entry"]
            entry["transient"] = live.peak - entry["entry"]
            edges["last"] = live.reset_peak()

        return hook

    hooks = []
    for j, block in enumerate(_stack_module(model, reduction) or ()):
        hooks.append(block.register_forward_pre_hook(enter(j), with_kwargs=True))
        hooks.append(block.register_forward_hook(leave(j)))
    try:
        with live, context(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model(input_ids=ids, position_ids=positions).logits
            result = loss(logits)
            after = live.peak - edges.get("last", 0)
            if "first" not in edges:  # no stack: everything is outside the blocks
                after = live.peak
        del logits, result
    finally:
        for h in hooks:
            h.remove()
    blocks = {j: BlockTrace(saved=e["saved"], inputs=e["inputs"], selective=e["selective"],
                            retained=e.get("retained", 0), transient=e.get("transient", 0),
                            boundary=e.get("boundary", 0))
              for j, e in per_block.items()}
    return StepTrace(blocks=blocks, before=edges.get("first", 0), after=after, outside=outside,
                     events=(), seq_len=0, micro_batch=0, dtype="")


def _stack_module(model: nn.Module, reduction: Reduction) -> nn.ModuleList | None:
    if not reduction.stack:
        return None
    module = model.get_submodule(reduction.stack)
    return module if isinstance(module, nn.ModuleList) else None
