"""ParallelStyles torch lacks, and the helpers their steps need.

This module imports nothing but torch: `plan compile --emit python` writes its body
into the standalone script, so the script and the runtime run the very same code. The
emitter does not read this file: it writes `planner.emitted_styles.SOURCE`, a copy
of the body checked in as a string, which a test holds equal to this file
(`MESHPLAN_UPDATE_GOLDEN=1` rewrites it). Which style is built by which class is the
style registry's business (`meshplan.dsl.styles`, `runtime.parallel.registry`).

- `FusedColwiseParallel`: a Linear whose output packs `parts` equal projections
  (Phi-3's `qkv_proj`, `gate_up_proj`). Plain colwise would hand rank r a slice that
  mixes them; this style gives rank r shard r of *each* part, concatenated, so code
  that `chunk`s the output into `parts` pieces gets the right local pieces. It does so
  by storing the weight's rows rank-major ([p0_r0, p1_r0, …, p0_r1, …]) as a plain
  Shard(0) DTensor; `output = replicate` gathers and restores the packed order.
  Checkpoints see the rank-major order: use `fused_row_order` to map rows.
- `Conv1DColwiseParallel` / `Conv1DRowwiseParallel`: GPT-2's `Conv1D` computes
  `x @ W + b` with W stored [in, out] — the transpose of a Linear — so the sharded
  weight dimension is swapped. A fused Conv1D (`c_attn`, `parts = 3`) is handled as
  above, and the parent's `split_size` (the part width GPT-2 splits by) is divided by
  the tensor-parallel size, since the code splits the local output.
- `selective_checkpoint_context`: the op policy of `activation_checkpoint { mode =
  selective }`: matmul and attention outputs are saved, cheap ops recomputed.
- `ReplicateParallel`: keep a module's parameters as replicated DTensors (their
  gradients are then summed over the tensor-parallel ranks) and declare its input and
  output layouts — e.g. Qwen3's per-head q/k norms, which see head-sharded values.
- `TensorParallelExperts`: transformers' fused experts (`gate_up_proj` [E, 2I, H],
  `down_proj` [E, H, I]; or stored transposed, [E, H, 2I] / [E, I, H]; or separate 3-D
  `gate_proj` and `up_proj`) with every expert sharded on its intermediate features: rank r
  holds shard r of the gate and of the up rows (rank-major, as `FusedColwiseParallel`)
  and the matching down columns. The module's own forward runs on the local shards
  (routing included, on replicated inputs), so its output is this rank's partial sum:
  it is summed over the ranks, and the gradients of the replicated inputs (hidden
  states, routing weights), partial on each rank, are summed in backward.
- `HeadParamsParallel`: an attention module's own per-head parameters (attention sinks,
  a per-head gate bias: 1-D, one entry per query head) sharded with the heads: rank r
  holds the entries of its heads, and the module's forward sees them as plain tensors,
  as its head-sharded projections hand it this rank's heads.
- `SharedTailParallel`: latent attention's kv_a projection (DeepSeek-V2/V3, MiniCPM3).
  Its output's last `rope` features are the rotary key that every head shares; with the
  heads split over the ranks, each rank's backward gives that part the gradient of its
  own heads only, so it is summed over the ranks (the weight stays plain and replicated).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import (
    DTensor,
    Placement,
    Replicate,
    Shard,
    distribute_module,
    distribute_tensor,
)
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
from torch.distributed.tensor.parallel.style import ParallelStyle
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts


def fused_row_order(out_features: int, parts: int, tp: int) -> torch.Tensor:
    """Row permutation from packed order ([part][rank][row]) to rank-major ([rank][part][row])."""
    if out_features % (parts * tp):
        raise ValueError(f"{out_features} features are not {parts} parts divisible by tp {tp}")
    rows = torch.arange(out_features).view(parts, tp, out_features // (parts * tp))
    return rows.transpose(0, 1).reshape(-1)


def _param(module: nn.Module, name: str) -> nn.Parameter | None:
    value = getattr(module, name, None)
    return value if isinstance(value, nn.Parameter) else None


def _hook(fn: Any) -> Any:
    """distribute_module's callbacks may return new inputs/outputs; torch types them as None."""
    return cast(Any, fn)


def _rank_major(t: torch.Tensor, dim: int, parts: int, tp: int) -> torch.Tensor:
    order = fused_row_order(t.shape[dim], parts, tp).to(t.device) if t.device.type != "meta" else None
    if order is None:  # meta tensors have no values to move: only the shape matters
        return t
    return t.index_select(dim, order)


def _packed_from_rank_major(local_full: torch.Tensor, parts: int, tp: int) -> torch.Tensor:
    """A gathered rank-major last dim [rank][part][c] back to packed [part][rank][c]."""
    *lead, width = local_full.shape
    c = width // (parts * tp)
    return local_full.reshape(*lead, tp, parts, c).transpose(-3, -2).reshape(*lead, width)


class FusedColwiseParallel(ColwiseParallel):
    """ColwiseParallel for a Linear packing `parts` equal projections (see module docs)."""

    def __init__(self, parts: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.parts = parts

    def _partition_linear_fn(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        tp = device_mesh.size()
        for pname, param in list(module.named_parameters()):
            reordered = _rank_major(param.data, 0, self.parts, tp)
            dist = distribute_tensor(reordered, device_mesh, [Shard(0)])
            module.register_parameter(pname, nn.Parameter(dist, requires_grad=param.requires_grad))

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, nn.Linear):
            raise NotImplementedError("FusedColwiseParallel shards nn.Linear modules only")
        return distribute_module(
            module, device_mesh, self._partition_linear_fn,
            _hook(partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts)),
            _hook(partial(_fused_output, self.output_layouts, self.use_local_output, self.parts)),
        )


def _fused_output(output_layouts: tuple[Placement, ...], use_local_output: bool, parts: int,
                  mod: nn.Module, outputs: DTensor, device_mesh: DeviceMesh) -> torch.Tensor | DTensor:
    if isinstance(output_layouts[0], Replicate):
        # Gathering a rank-major tensor yields [r0: p0 p1 …][r1: …]: restore [p0: r0 r1 …][p1: …].
        full = outputs.redistribute(placements=[Replicate()]).to_local()
        full = _packed_from_rank_major(full, parts, device_mesh.size())
        return full if use_local_output else DTensor.from_local(full, device_mesh, [Replicate()], run_check=False)
    if outputs.placements != output_layouts:
        outputs = outputs.redistribute(placements=output_layouts)
    return outputs.to_local() if use_local_output else outputs


class Conv1DColwiseParallel(FusedColwiseParallel):
    """Colwise for transformers' Conv1D (weight [in, out]): shard the out dimension."""

    def __init__(self, parts: int = 1, **kwargs: Any) -> None:
        super().__init__(parts, **kwargs)

    def _partition_linear_fn(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        tp = device_mesh.size()
        weight, bias = _param(module, "weight"), _param(module, "bias")
        if weight is None:
            raise ValueError("a Conv1D without a weight")
        w = distribute_tensor(_rank_major(weight.data, 1, self.parts, tp), device_mesh, [Shard(1)])
        module.register_parameter("weight", nn.Parameter(w, requires_grad=weight.requires_grad))
        if bias is not None:
            b = distribute_tensor(_rank_major(bias.data, 0, self.parts, tp), device_mesh, [Shard(0)])
            module.register_parameter("bias", nn.Parameter(b, requires_grad=bias.requires_grad))

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if type(module).__name__ != "Conv1D":
            raise NotImplementedError("Conv1DColwiseParallel shards transformers' Conv1D modules only")
        return distribute_module(
            module, device_mesh, self._partition_linear_fn,
            _hook(partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts)),
            _hook(partial(_fused_output, self.output_layouts, self.use_local_output, self.parts)),
        )


class Conv1DRowwiseParallel(RowwiseParallel):
    """Rowwise for transformers' Conv1D (weight [in, out]): shard the in dimension."""

    def _partition_linear_fn(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        weight, bias = _param(module, "weight"), _param(module, "bias")
        if weight is None:
            raise ValueError("a Conv1D without a weight")
        w = distribute_tensor(weight.data, device_mesh, [Shard(0)])
        module.register_parameter("weight", nn.Parameter(w, requires_grad=weight.requires_grad))
        if bias is not None:
            b = distribute_tensor(bias.data, device_mesh, [Replicate()])
            module.register_parameter("bias", nn.Parameter(b, requires_grad=bias.requires_grad))

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if type(module).__name__ != "Conv1D":
            raise NotImplementedError("Conv1DRowwiseParallel shards transformers' Conv1D modules only")
        self.desired_input_layouts: tuple[Placement, ...] = (Shard(-1),)  # x @ W contracts the last dim
        return distribute_module(
            module, device_mesh, self._partition_linear_fn,
            _hook(partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts)),
            _hook(partial(self._prepare_output_fn, self.output_layouts, self.use_local_output)),
        )


class ReplicateParallel(ParallelStyle):
    """Parameters become replicated DTensors; input/output layouts are declared."""

    def __init__(self, *, input_layouts: Placement | None = None, output_layouts: Placement | None = None,
                 use_local_output: bool = True) -> None:
        super().__init__()
        self.input_layouts = (input_layouts or Replicate(),)
        self.output_layouts = (output_layouts or Replicate(),)
        self.use_local_output = use_local_output

    @staticmethod
    def _prepare_input(layouts: tuple[Placement, ...], mod: nn.Module, inputs: tuple[Any, ...],
                       device_mesh: DeviceMesh) -> tuple[Any, ...]:
        first = inputs[0]
        if not isinstance(first, DTensor):
            first = DTensor.from_local(first, device_mesh, layouts, run_check=False)
        elif first.placements != layouts:
            first = first.redistribute(placements=layouts)
        return (first, *inputs[1:])

    @staticmethod
    def _prepare_output(layouts: tuple[Placement, ...], use_local: bool, mod: nn.Module, outputs: DTensor,
                        device_mesh: DeviceMesh) -> torch.Tensor | DTensor:
        if outputs.placements != layouts:
            outputs = outputs.redistribute(placements=layouts)
        return outputs.to_local() if use_local else outputs

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(
            module, device_mesh, None,  # None: every parameter becomes a replicated DTensor
            _hook(partial(self._prepare_input, self.input_layouts)),
            _hook(partial(self._prepare_output, self.output_layouts, self.use_local_output)),
        )


class _SumForward(torch.autograd.Function):
    """Sum a partial value over `group`; its gradient, replicated, passes unchanged."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _SumBackward(torch.autograd.Function):
    """A replicated value used on local shards: unchanged forward, its partial gradient
    summed over `group` in backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        out = grad.contiguous().clone()
        dist.all_reduce(out, group=ctx.group)
        return out, None


# A fused experts module's parameters and the dimension holding the intermediate
# features, on which each is sharded: transformers' layout, and the transposed one.
_EXPERT_DIMS = {"gate_up_proj": 1, "gate_proj": 1, "up_proj": 1, "down_proj": 2}
_TRANSPOSED_EXPERT_DIMS = {"gate_up_proj": 2, "gate_proj": 2, "up_proj": 2, "down_proj": 1}
# The parameter sets a fused experts module may have (gate and up fused or apart).
_EXPERT_PARAMS = ({"gate_up_proj", "down_proj"}, {"up_proj", "down_proj"}, {"gate_proj", "up_proj", "down_proj"})


def experts_transposed(module: nn.Module) -> bool | None:
    """Are the experts stored transposed ([E, H, 2I] / [E, I, H], what `grouped_mm` reads)
    rather than as transformers' default ([E, 2I, H] / [E, H, I])? transformers'
    `is_transposed` says so; a class without it, the shapes (None: they do not tell)."""
    flag = getattr(module, "is_transposed", None)
    if isinstance(flag, bool):
        return flag
    up = next((getattr(module, n) for n in ("gate_up_proj", "up_proj") if isinstance(getattr(module, n, None),
                                                                                    torch.Tensor)), None)
    down = getattr(module, "down_proj", None)
    if not isinstance(up, torch.Tensor) or not isinstance(down, torch.Tensor) or not up.dim() == down.dim() == 3:
        return None
    fused = 2 if isinstance(getattr(module, "gate_up_proj", None), torch.Tensor) else 1
    if up.shape[1] == fused * down.shape[2] and up.shape[2] == down.shape[1]:
        return False
    if up.shape[2] == fused * down.shape[1] and up.shape[1] == down.shape[2]:
        return True
    return None


def expert_shard_dims(module: nn.Module) -> dict[str, int]:
    """Each of a fused experts module's parameters → the dimension `TensorParallelExperts`
    shards (its intermediate features), for the layout the module stores."""
    return dict(_TRANSPOSED_EXPERT_DIMS if experts_transposed(module) else _EXPERT_DIMS)


class TensorParallelExperts(ParallelStyle):
    """Every expert of a fused experts module sharded on its intermediate features."""

    def __init__(self, parts: int = 2) -> None:
        super().__init__()
        self.parts = parts

    def _partition(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        tp = device_mesh.size()
        dims = expert_shard_dims(module)
        for pname, param in list(module.named_parameters(recurse=False)):
            dim = dims[pname]
            data = _rank_major(param.data, dim, self.parts, tp) if pname == "gate_up_proj" else param.data
            dt = distribute_tensor(data, device_mesh, [Shard(dim)])
            module.register_parameter(pname, nn.Parameter(dt, requires_grad=param.requires_grad))

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        own = dict(module.named_parameters(recurse=False))
        if set(own) not in _EXPERT_PARAMS or any(p.dim() != 3 for p in own.values()):
            raise NotImplementedError(f"TensorParallelExperts shards fused experts with 3-D gate_up_proj (or "
                                      f"gate_proj and up_proj, or up_proj) and down_proj only, not "
                                      f"{type(module).__name__} ({', '.join(sorted(own))})")
        if experts_transposed(module) is None or getattr(module, "has_post_expert_norm", False):
            raise NotImplementedError(f"TensorParallelExperts shards experts laid out [E, 2I, H] / [E, H, I] "
                                      f"(or transposed) without a per-expert norm, not {type(module).__name__}")
        distribute_module(module, device_mesh, self._partition)
        group = device_mesh.get_group()
        if any(isinstance(child, nn.Identity) for child in module.children()):
            # An identity expert (LongCat's zero experts) would hand back its input whole on
            # every rank, and the sum over the ranks would count it tp times.
            raise NotImplementedError(f"TensorParallelExperts does not split {type(module).__name__}'s "
                                      "identity experts")
        inner = module.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            # The routing weights' gradient is partial too: each rank weighs its partial outputs.
            args = tuple(_SumBackward.apply(a, group) if isinstance(a, torch.Tensor) and a.is_floating_point()
                         else a for a in args)
            kwargs = {k: _SumBackward.apply(v, group) if isinstance(v, torch.Tensor) and v.is_floating_point()
                      else v for k, v in kwargs.items()}
            with _local_parameters(module):
                out = inner(*args, **kwargs)
            return _SumForward.apply(out, group)

        module.forward = forward
        return module


@contextmanager
def _local_parameters(module: nn.Module) -> Iterator[None]:
    """Within: `module`'s own DTensor parameters read as this rank's plain local shards
    (their gradients still reach the DTensors)."""
    table = module._parameters
    whole = dict(table)
    for pname, value in whole.items():
        if isinstance(value, DTensor):
            table[pname] = cast(nn.Parameter, value.to_local())
    try:
        yield
    finally:
        table.update(whole)


class HeadParamsParallel(ParallelStyle):
    """An attention module's own per-head parameters sharded with its heads (dim 0); the
    module's forward sees this rank's entries as plain tensors."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        # Only the module's own parameters: its projections have their own rules.
        bad = [n for n, p in module.named_parameters(recurse=False) if p.dim() != 1]
        if bad:
            raise NotImplementedError(f"HeadParamsParallel shards 1-D per-head parameters, not "
                                      f"{type(module).__name__}'s {', '.join(bad)}")
        for pname, param in list(module.named_parameters(recurse=False)):
            dt = distribute_tensor(param.data, device_mesh, [Shard(0)])
            module.register_parameter(pname, nn.Parameter(dt, requires_grad=param.requires_grad))
        inner = module.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            with _local_parameters(module):
                return inner(*args, **kwargs)

        module.forward = forward
        return module


class SharedTailParallel(ParallelStyle):
    """Latent attention's kv_a projection: the weight stays a plain (replicated) tensor and
    the gradient of the last `rope` output features is summed over the ranks."""

    def __init__(self, rope: int) -> None:
        super().__init__()
        self.rope = rope

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        width = getattr(module, "out_features", None)
        if not isinstance(module, nn.Linear) or not isinstance(width, int) or not 0 < self.rope < width:
            raise NotImplementedError(f"SharedTailParallel({self.rope}) needs a Linear with more than "
                                      f"{self.rope} output features, not {type(module).__name__}")
        group, rope = device_mesh.get_group(), self.rope

        def hook(mod: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            # Every rank's heads read the same rotary key; each backward gives the gradient
            # of its own heads only, so that part's gradient is summed (the rest reaches
            # head-sharded projections, whose input gradient is summed already).
            head, tail = output.split([output.shape[-1] - rope, rope], dim=-1)
            return torch.cat([head, _SumBackward.apply(tail, group)], dim=-1)

        module.register_forward_hook(hook)
        return module


def rescale_split_sizes(parent: nn.Module, child: nn.Module, parts: int, tp: int) -> None:
    """After a fused Conv1D is sharded, GPT-2-style parents split its *local* output by
    `split_size`: divide the attribute by the tensor-parallel size to match."""
    width = getattr(child, "nf", None)
    size = getattr(parent, "split_size", None)
    if isinstance(width, int) and isinstance(size, int) and size * parts == width:
        setattr(parent, "split_size", size // tp)  # noqa: B010 (an attribute torch's typing does not know)


def selective_checkpoint_context() -> Any:
    """Selective AC: keep matmul and attention outputs, recompute the cheap ops."""
    save = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
            torch.ops.aten._scaled_dot_product_efficient_attention.default,
            torch.ops.aten._scaled_dot_product_flash_attention.default}

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)
